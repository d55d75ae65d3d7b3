"""Submit a galaxydist training run, a sweep of them, or a catalogue inference to SLURM with submitit.

    python launch/submit.py --partition gpu --gpus-per-node 4 --config configs/galaxy10.yaml [key=value ...]
    python launch/submit.py --partition gpu --gpus-per-node 0 --tasks-per-node 2 --wait   # CPU ranks
    python launch/submit.py --partition gpu --sweep seed=0,1,2 --sweep stages.0.lr=1e-3,3e-4 [--max-parallel N]
    python launch/submit.py --cluster local --sweep seed=0,1 ...      # the same grid on this machine
    python launch/submit.py --partition gpu --nodes 2 --gpus-per-node 4 infer RUN CATALOGUE --out OUT [...]

Everything after `infer` is galaxydist.infer's own command line; the job's ranks shard the catalogue,
a preempted job requeues and skips the parts already written.

A sweep is ONE SLURM job array: each task its own run folder under the sweep folder (output_dir)
and its own W&B run in one W&B group; tasks requeue and resume like single jobs; a failed task
does not stop the others and is listed at the end (`python -m galaxydist.report SWEEP_DIR`).

One task per GPU (or --tasks-per-node CPU ranks); each task exports the torch.distributed variables
and calls galaxydist.train.main, the entry point torchrun runs. On preemption (SIGTERM) or the
time-limit warning (USR2, 90 s before the limit) training saves last.pt and the job requeues itself,
at most --max-requeues times, then resumes from last.pt in the same run folder.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python launch/submit.py` from a checkout where galaxydist is not installed
    sys.path.insert(0, str(REPO))

from galaxydist import sweep  # noqa: E402
from galaxydist.config import load_config  # noqa: E402
from galaxydist.errors import UserError, run_cli  # noqa: E402


class Requeueable:
    """A submitted callable, run once per task. It is checkpointable in submitit's sense (it has
    `checkpoint`): when the job is preempted or nears its time limit, submitit pickles it again and
    requeues the job; the command resumes by itself from what it wrote.

    A plain class rather than a submitit.helpers.Checkpointable subclass, so that this module imports
    without submitit (submitit only looks for the `checkpoint` attribute).
    """

    def __init__(self, argv: list[str], max_requeues: int) -> None:
        self.argv = argv
        self.max_requeues = max_requeues
        self.requeues = 0

    def checkpoint(self) -> Any:
        """Called by submitit on rank 0 before requeueing: the same callable, or None, which stops
        the requeues, once max_requeues are used."""
        import submitit

        if self.requeues >= self.max_requeues:
            return None
        self.requeues += 1
        return submitit.helpers.DelayedSubmission(self)


def rendezvous_port(environ: Mapping[str, str]) -> int:
    """RDZV_PORT, or 29500 + job id mod 1000, as slurm/train.sbatch picks it: below Linux's
    ephemeral range (32768-60999), where submitit's own pick (20000-60000) can find a port an
    outgoing connection holds (EADDRINUSE), and distinct for concurrent jobs on one node."""
    chosen = environ.get("RDZV_PORT")
    if not chosen:
        return 29500 + int(environ["SLURM_JOB_ID"]) % 1000
    if not chosen.isdigit() or not 0 < int(chosen) < 65536:
        raise UserError(f"RDZV_PORT={chosen!r} is not a port number (1-65535)")
    return int(chosen)


def export_distributed_environment() -> None:
    """The torch.distributed variables torchrun would set, from SLURM's. CUDA_VISIBLE_DEVICES stays
    as SLURM set it: galaxydist selects cuda:LOCAL_RANK, as under torchrun. A MASTER_PORT the job
    inherited from the submitting shell is replaced (submitit would keep it)."""
    import submitit

    os.environ["MASTER_PORT"] = str(rendezvous_port(os.environ))
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


class TrainTask(Requeueable):
    """galaxydist.train in each task; training saves last.pt when signalled and requeues here."""

    def __call__(self) -> int:
        import signal

        import submitit

        from galaxydist import train

        export_distributed_environment()
        usr_sig = submitit.JobEnvironment._usr_sig()
        requeue = signal.getsignal(usr_sig)  # submitit's checkpoint-and-requeue handler; train overrides it
        code = train.main(self.argv)
        if code == train.EXIT_INTERRUPTED and cancelled_by_user():
            print("stopped by scancel: last.pt saved, not requeued (submit again to resume)", flush=True)
            raise SystemExit(0)
        if code == train.EXIT_INTERRUPTED:
            # Training stopped on a signal and saved last.pt. Take submitit's own path: on global rank 0
            # it calls self.checkpoint(), requeues the job (or raises once requeues are used up) and
            # exits; on other ranks it returns, and the task leaves without a result for this attempt,
            # with status 0: a non-zero one would make srun (--kill-on-bad-exit) end rank 0 mid-requeue.
            requeue(usr_sig, None)
            raise SystemExit(0)
        if code:
            raise RuntimeError(f"galaxydist.train exited with code {code}; see this task's log")
        return code


class InferTask(Requeueable):
    """galaxydist.infer in each task, in the directory it was submitted from (its paths are the
    user's, relative to it). submitit's own signal handler requeues the job; the parts are written
    atomically, so a requeued run skips the finished ones and redoes only the rest."""

    def __init__(self, argv: list[str], max_requeues: int) -> None:
        super().__init__(argv, max_requeues)
        self.directory = os.getcwd()

    def __call__(self) -> int:
        from galaxydist import infer

        os.chdir(self.directory)
        export_distributed_environment()
        code = infer.main(self.argv)
        if code:
            raise RuntimeError(f"galaxydist.infer exited with code {code}; see this task's log")
        return code


def cancelled_by_user() -> bool:
    """Whether this job was scancel'ed: its SIGTERM reaches the tasks once SLURM has moved the job
    to COMPLETING (or CANCELLED), while a preemption's SIGTERM (or the time-limit warning) finds it
    still RUNNING (measured with SLURM 22.05). A user's cancel stops the job for good; only the
    others requeue it."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True)
    return re.search(r"\bJobState=(CANCELLED|COMPLETING)\b", shown.stdout) is not None


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum`."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


VALUE_OPTIONS = (
    "partition", "cluster", "sweep", "max-parallel", "nodes", "gpus-per-node", "tasks-per-node",
    "cpus-per-task", "mem", "time", "account", "qos", "constraint", "job-name", "config", "log-dir",
    "max-requeues",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python launch/submit.py", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--partition", help="the SLURM partition (required with --cluster slurm)")
    add(
        "--cluster",
        choices=("slurm", "local"),
        default="slurm",
        help="local: run a sweep's tasks on this machine",
    )
    add("--sweep", action="append", default=[], metavar="KEY=V1,V2", help="a grid axis (repeat for more)")
    add("--max-parallel", type=_count(1), help="tasks of a sweep running at once (default: all; local: 1)")
    add("--nodes", type=_count(1), default=1)
    add("--gpus-per-node", type=_count(0), default=1, help="one task per GPU; 0 for CPU ranks (gloo)")
    add("--tasks-per-node", type=_count(1), help="CPU ranks per node, with --gpus-per-node 0 (default 1)")
    add("--cpus-per-task", type=_count(1))
    add("--mem", help="memory per node, e.g. 64G")
    add("--time", default="04:00:00", help="time limit: minutes, HH:MM:SS or D-HH:MM:SS")
    add("--account")
    add("--qos")
    add("--constraint")
    add("--job-name", default="galaxydist")
    add("--config", help="YAML recipe (default: the packaged galaxy10.yaml)")
    add("--log-dir", help="submitit logs and pickles (default: RUN_FOLDER/slurm)")
    add("--max-requeues", type=_count(0), default=3, help="requeues after preemption or time limit")
    add("--dry-run", action="store_true", help="print the sbatch script and exit without submitting")
    add("--wait", action="store_true", help="follow the job to its end and print the summary")
    add("overrides", nargs="*", metavar="key=value", help="config overrides, as for galaxydist.train")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_intermixed_args(argv)
    if args.cluster == "slurm" and not args.partition:
        raise UserError("--partition is required to submit to SLURM (or --cluster local for a sweep here)")
    if args.cluster == "local" and not args.sweep:
        raise UserError("--cluster local runs sweeps (--sweep KEY=V1,V2); for one run use torchrun")
    if args.gpus_per_node and args.tasks_per_node not in (None, args.gpus_per_node):
        raise UserError("--tasks-per-node: with GPUs there is one task per GPU; set --gpus-per-node instead")
    return args


def minutes(limit: str) -> int:
    """SLURM time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) as whole minutes, rounded up:
    submitit needs the limit as a number to tell a time-out from a preemption."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", limit.strip())
    if not match:
        raise UserError(f"--time {limit!r}: expected minutes, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = (int(g) if g else 0 for g in match.groups())
    if match.group(1):  # D-H[:M[:S]]
        seconds = ((days * 24 + a) * 60 + b) * 60 + c
    elif match.group(4):  # H:M:S
        seconds = (a * 60 + b) * 60 + c
    else:  # M[:S]
        seconds = a * 60 + b
    if seconds <= 0:
        raise UserError(f"--time {limit!r}: must be positive")
    return -(-seconds // 60)


def sbatch_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The job's sbatch settings, named as submitit's SlurmExecutor names them."""
    tasks = args.gpus_per_node or args.tasks_per_node or 1
    params: dict[str, Any] = {
        "job_name": args.job_name,
        "partition": args.partition,
        "nodes": args.nodes,
        "ntasks_per_node": tasks,
        "time": minutes(args.time),
        "setup": [
            # the job runs the submitter's python (sys.executable); this makes galaxydist importable
            f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}",
            "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
        ],
        # One task is one rank: when a rank dies (a crash, an out-of-memory kill), SLURM ends
        # the others at once instead of leaving them in a collective until distributed.timeout_s
        # (NCCL does not notice a dead peer by itself).
        "srun_args": ["--kill-on-bad-exit=1"],
    }
    optional = {
        "gpus_per_node": args.gpus_per_node or None,  # no GPU request at all for CPU runs
        "cpus_per_task": args.cpus_per_task,
        "mem": args.mem,
        "account": args.account,
        "qos": args.qos,
        "constraint": args.constraint,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def render_sbatch(folder: Path, params: dict[str, Any]) -> str:
    """The script SlurmExecutor would submit: its own template and its own python command."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, **params)


def sbatch_error(err: Exception) -> str:
    """sbatch's own error lines, without their prefixes, as one line."""
    lines = [re.sub(r"^sbatch: error: ", "", ln.strip()) for ln in str(err).splitlines() if "error" in ln]
    return "; ".join(dict.fromkeys(lines)) or str(err).strip()


def submit(args: argparse.Namespace, task: Requeueable, folder: Path, params: dict[str, Any]) -> Any:
    import submitit
    from submitit.core.utils import FailedJobError

    try:
        executor = submitit.AutoExecutor(folder, cluster="slurm", slurm_max_num_timeout=args.max_requeues)
    except RuntimeError as err:  # no srun on this machine
        raise UserError(f"cannot submit: {err} (--dry-run prints the script without SLURM)") from None
    executor.update_parameters(**{f"slurm_{k}": v for k, v in params.items()})
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's stderr; we say it once
            return executor.submit(task)
    except FailedJobError as err:
        raise UserError(f"sbatch rejected the job: {sbatch_error(err)}") from None


def job_error(err: Exception) -> str:
    """The exception line of the job's traceback (submitit wraps it in a long message)."""
    lines = str(err).strip().splitlines()
    raised = [ln for ln in lines if re.match(r"[\w.]+(Error|Exception)\b", ln)]
    return raised[-1] if raised else lines[0]


def follow(job: Any) -> None:
    """Print each state change until the job ends (through requeues)."""
    last = None
    while not job.done():
        state = job.state
        if state not in (last, "UNKNOWN"):  # UNKNOWN: not in accounting yet
            print(f"job {job.job_id}: {state}", flush=True)
            last = state
        time.sleep(2)


def completed(job: Any) -> bool:
    """Follow the job to its end; whether it completed (if not, say why and where to look)."""
    from submitit.core.utils import UncompletedJobError

    follow(job)
    try:
        job.results()
    except UncompletedJobError as err:
        print(f"job {job.job_id} did not complete: {job_error(err)}", file=sys.stderr)
        print(f"see {job.paths.stderr}", file=sys.stderr)
        return False
    return True


def task_argv(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """What each task passes to galaxydist.train.main: the config pinned to an absolute path."""
    return [*(["--config", str(Path(args.config).resolve())] if args.config else []), *overrides]


def run_local(args: argparse.Namespace, tasks: list[sweep.Task], sweep_dir: Path) -> dict[str, str]:
    """Each task as a torchrun (or plain) process here, --max-parallel at a time; its log in
    SWEEP/logs/. Returns each task's status."""
    from concurrent.futures import ThreadPoolExecutor

    ranks = args.tasks_per_node or 1
    logs = sweep_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]

    def run(task: sweep.Task) -> str:
        command = [
            *(launcher if ranks > 1 else [sys.executable]),
            "-m",
            "galaxydist.train",
            *task_argv(args, task.overrides),
        ]
        with (logs / f"{task.name}.log").open("w") as log:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
        print(f"task {task.name}: {'completed' if code == 0 else f'failed (exit {code})'}", flush=True)
        return "completed" if code == 0 else f"failed (exit {code}; see {logs / task.name}.log)"

    with ThreadPoolExecutor(max_workers=args.max_parallel or 1) as pool:
        return dict(zip((t.name for t in tasks), pool.map(run, tasks), strict=True))


def submit_array(
    args: argparse.Namespace, tasks: list[sweep.Task], folder: Path, params: dict[str, Any]
) -> list[Any]:
    """The grid as one SLURM job array (submitit's batch), throttled by --max-parallel."""
    import submitit
    from submitit.core.utils import FailedJobError

    try:
        executor = submitit.AutoExecutor(folder, cluster="slurm", slurm_max_num_timeout=args.max_requeues)
    except RuntimeError as err:
        raise UserError(f"cannot submit: {err} (--dry-run prints the grid without SLURM)") from None
    array = {"array_parallelism": args.max_parallel} if args.max_parallel else {}
    executor.update_parameters(**{f"slurm_{k}": v for k, v in {**params, **array}.items()})
    try:
        with contextlib.redirect_stderr(io.StringIO()), executor.batch():
            jobs = [
                executor.submit(TrainTask(task_argv(args, t.overrides), args.max_requeues)) for t in tasks
            ]
    except FailedJobError as err:
        raise UserError(f"sbatch rejected the job array: {sbatch_error(err)}") from None
    return jobs


def array_status(tasks: list[sweep.Task], jobs: list[Any]) -> dict[str, str]:
    """Each task's outcome once its array task has ended."""
    from submitit.core.utils import UncompletedJobError

    status = {}
    for task, job in zip(tasks, jobs, strict=True):
        try:
            job.results()
            status[task.name] = "completed"
        except UncompletedJobError as err:
            status[task.name] = f"failed ({job_error(err)}; see {job.paths.stderr})"
    return status


def run_sweep(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    sweep_dir = Path(cfg.output_dir).resolve()
    tasks = sweep.plan(args.config, args.overrides, args.sweep, sweep_dir)  # every config checked first
    print(f"sweep of {len(tasks)} tasks in {sweep_dir}:\n{sweep.grid_table(tasks)}", flush=True)
    if args.dry_run:
        if args.cluster == "slurm":
            print(render_sbatch(sweep_dir / "slurm", sbatch_parameters(args)))
        return 0
    if not Path(cfg.data.path).exists():
        raise UserError(f"{cfg.data.path}: prepared data not found (every task would fail at once)")
    sweep.write_manifest(sweep_dir, tasks)
    if args.cluster == "local":
        status = run_local(args, tasks, sweep_dir)
    else:
        jobs = submit_array(args, tasks, sweep_dir / "slurm", sbatch_parameters(args))
        print(f"job array:  {jobs[0].job_id.split('_')[0]} ({len(jobs)} tasks)")
        for task, job in zip(tasks, jobs, strict=True):
            print(f"task {task.name}: job {job.job_id}")
        sys.stdout.flush()
        if not args.wait:
            return 0
        for job in jobs:
            follow(job)
        status = array_status(tasks, jobs)
    sweep.write_manifest(sweep_dir, tasks, status)
    failed = {name: why for name, why in status.items() if why != "completed"}
    print(
        f"{len(tasks) - len(failed)} of {len(tasks)} tasks completed; report: python -m galaxydist.report {sweep_dir}"
    )
    for name, why in failed.items():
        print(f"failed: {name}: {why}", file=sys.stderr)
    return 1 if failed else 0


def split_command(parser_argv: list[str]) -> tuple[list[str], list[str] | None]:
    """submit.py's own arguments, and galaxydist.infer's after the word `infer` (None: training).
    `infer` as the value of an option (`--job-name infer`) is not the command."""
    with_value = {"--" + a for a in VALUE_OPTIONS}
    for i, token in enumerate(parser_argv):
        if token == "infer" and (i == 0 or parser_argv[i - 1] not in with_value):
            return parser_argv[:i], parser_argv[i + 1 :]
    return parser_argv, None


def submit_infer(args: argparse.Namespace, infer_argv: list[str]) -> int:
    """Check the inference's inputs here (as infer does before any work), then submit it."""
    import torch

    from galaxydist import infer
    from galaxydist.inference.batch import check_output, manifest_for

    if args.sweep or args.config or args.overrides or args.cluster == "local":
        raise UserError("infer takes no --sweep, --config, --cluster local or key=value overrides")
    parsed = infer.parse_args(infer_argv)
    _, meta, catalogue = infer.check_inputs(parsed, torch.device("cpu"))
    out = Path(parsed.out).resolve()
    if check_output(out, manifest_for(meta, catalogue, infer.options_of(parsed)), parsed.force) == "complete":
        print(f"{out}: already complete for this checkpoint and catalogue; nothing to submit")
        return 0
    folder = Path(args.log_dir).resolve() if args.log_dir else out.with_name(out.name + ".slurm")
    params = sbatch_parameters(args)
    if args.dry_run:
        print(render_sbatch(folder, params))
        print(f"# each task runs, in {Path.cwd()}: galaxydist.infer.main({infer_argv!r})", file=sys.stderr)
        return 0
    job = submit(args, InferTask(infer_argv, args.max_requeues), folder, params)
    print(f"job id:     {job.job_id}")
    print(f"logs:       {job.paths.stdout} (task 0; one .out/.err pair per task)")
    print(f"output:     {out}", flush=True)
    if not args.wait:
        return 0
    if not completed(job):
        return 1
    print(f"job {job.job_id} completed; predictions in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    own, infer_argv = split_command(sys.argv[1:] if argv is None else argv)
    args = parse_args(own)
    if infer_argv is not None:
        return submit_infer(args, infer_argv)
    if args.sweep:
        return run_sweep(args)
    cfg = load_config(args.config, args.overrides)  # a bad config fails here, not in the queue
    run_folder = Path(cfg.output_dir).resolve()
    # Pin absolute paths so that the job and its requeues find the same files from any directory.
    overrides = [o for o in args.overrides if not o.startswith("output_dir=")]
    train_argv = [*task_argv(args, overrides), f"output_dir={run_folder}"]
    folder = Path(args.log_dir).resolve() if args.log_dir else run_folder / "slurm"
    params = sbatch_parameters(args)

    if args.dry_run:
        print(render_sbatch(folder, params))
        print(f"# each task runs: galaxydist.train.main({train_argv!r})", file=sys.stderr)
        return 0

    if not Path(cfg.data.path).exists():
        raise UserError(f"{cfg.data.path}: prepared data not found (the job would fail at once)")
    job = submit(args, TrainTask(train_argv, args.max_requeues), folder, params)
    print(f"job id:     {job.job_id}")
    print(f"logs:       {job.paths.stdout} (task 0; one .out/.err pair per task)")
    print(f"            {job.paths.stderr}")
    print(f"run folder: {run_folder}", flush=True)
    if not args.wait:
        return 0
    if not completed(job):
        return 1
    summary = json.loads((run_folder / "summary.json").read_text())
    print(f"job {job.job_id} completed; summary ({run_folder / 'summary.json'}):")
    for key, value in summary.items():
        print(f"  {key}: {json.dumps(value)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
