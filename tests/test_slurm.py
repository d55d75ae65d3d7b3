"""launch/submit.py and slurm/train.sbatch on a real SLURM (slurm/local-cluster.sh up).

Skipped where `sinfo` fails, except under CI (env CI set), where a missing cluster is a failure.
Every run is the demo recipe shrunk to a few hundred 32×32 images and a few epochs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, read_metrics, run_train, tiny_overrides, wait_for, wait_for_epochs, without_timing

from galaxydist import checkpoint

pytestmark = pytest.mark.slurm

SUBMIT = ROOT / "launch" / "submit.py"
CONFIG = ROOT / "configs" / "demo.yaml"
JOB_TIMEOUT_S = 300
EPOCHS = 4  # enough for an interrupt to land mid-training; every run here uses the same recipe
CPU_JOB = ["--partition", "gpu", "--gpus-per-node", "0", "--tasks-per-node", "2", "--time", "10"]


def _sinfo_ok() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster() -> None:
    if not _sinfo_ok():
        reason = "no SLURM reachable (sinfo failed); start one with: sudo bash slurm/local-cluster.sh up"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}. CI must run the SLURM tests.")
        pytest.skip(reason)


def overrides(data: Path, out: Path) -> list[str]:
    return tiny_overrides(
        data, out, stages=f"[{{name: train, lr: 0.003, max_epochs: {EPOCHS}, patience: 10}}]"
    )


def submit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SUBMIT), *args], capture_output=True, text=True, timeout=JOB_TIMEOUT_S, cwd=ROOT
    )


def preempt(jid: str) -> None:
    """What a preemption sends a running job: SIGTERM to every task. Not submitit's `_interrupt`
    (SIGTERM, then USR2): training requeues on the SIGTERM alone, and scancel retries the USR2
    while the job is in transition, so it lands on the requeued job as it starts (a second
    requeue, at times a failed one)."""
    subprocess.run(["scancel", "--signal=TERM", jid], check=True, timeout=30)


def job_id(stdout: str) -> str:
    match = re.search(r"^job id:\s+(\d+)$", stdout, re.M)
    assert match, stdout
    return match.group(1)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_prepared) -> Path:
    """The same recipe with torchrun on this machine: the reference every SLURM run must match."""
    out = tmp_path_factory.mktemp("local") / "run"
    proc = run_train(2, ["--config", str(CONFIG), *overrides(tiny_prepared, out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory, tiny_prepared) -> tuple[Path, subprocess.CompletedProcess]:
    """submit.py --wait with 2 CPU ranks, uninterrupted."""
    out = tmp_path_factory.mktemp("slurm") / "run"
    proc = submit(*CPU_JOB, "--wait", "--config", str(CONFIG), *overrides(tiny_prepared, out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out, proc


def test_submit_wait_completes_like_torchrun(slurm_run, local_run):
    out, proc = slurm_run
    assert f"run folder: {out}" in proc.stdout
    assert "test_accuracy" in proc.stdout  # --wait printed the summary
    assert {"summary.json", "metrics.jsonl", "config.yaml"} <= {p.name for p in out.iterdir()}
    assert (out / "checkpoints" / "last.pt").exists() and (out / "checkpoints" / "best.pt").exists()
    summary = json.loads((out / "summary.json").read_text())
    reference = json.loads((local_run / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["test_accuracy"] == reference["test_accuracy"]
    assert summary["per_class_accuracy"] == reference["per_class_accuracy"]
    assert without_timing(read_metrics(out)) == without_timing(read_metrics(local_run))


def test_preempted_job_requeues_and_resumes(tmp_path, tiny_prepared, slurm_run):
    import submitit

    out = tmp_path / "run"
    proc = submit(*CPU_JOB, "--max-requeues", "2", "--config", str(CONFIG), *overrides(tiny_prepared, out))
    assert proc.returncode == 0, proc.stderr
    job = submitit.SlurmJob(folder=out / "slurm", job_id=job_id(proc.stdout), tasks=(0, 1))
    wait_for_epochs(out, 1, JOB_TIMEOUT_S)
    preempt(job.job_id)
    wait_for(job.done, JOB_TIMEOUT_S, "the requeued job to finish")
    assert job.results() == [0, 0]

    log = job.paths.stdout.read_text()
    assert "Requeued job" in log, f"training ended before the interrupt landed:\n{log[-2000:]}"
    assert re.search(r"resuming from .*last\.pt", log), log[-2000:]
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == list(range(EPOCHS))  # none redone, none missing
    reference, _ = slurm_run
    assert without_timing(records) == without_timing(read_metrics(reference))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] == json.loads((reference / "summary.json").read_text())["test_accuracy"]
    final = checkpoint.load(out / "checkpoints" / "last.pt")["model"]
    expected = checkpoint.load(reference / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def sacct_state(jid: str) -> str:
    """The job's state from accounting (what submitit reads too); '' until the job is known."""
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "State", "-j", jid], capture_output=True, text=True
    )
    return out.stdout.strip().split(" ")[0]


def sbatch(tmp_path: Path, out: Path, data: Path) -> str:
    """slurm/train.sbatch with 2 CPU ranks; its job id."""
    proc = subprocess.run(
        ["sbatch", "--parsable", "--partition=gpu", "--cpus-per-task=2", "--time=10",
         f"--output={tmp_path}/sbatch-%j.out", str(ROOT / "slurm" / "train.sbatch"),
         "--config", str(CONFIG), *overrides(data, out)],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def wait_for_the_end(jid: str, tmp_path: Path) -> str:
    """The job's log once accounting says it ended (sbatch --wait polls too slowly)."""
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    wait_for(lambda: sacct_state(jid) in ended, JOB_TIMEOUT_S, f"sbatch job {jid}")
    return (tmp_path / f"sbatch-{jid}.out").read_text()


def test_plain_sbatch_script_completes(tmp_path, tiny_prepared, local_run):
    out = tmp_path / "run"
    jid = sbatch(tmp_path, out, tiny_prepared)
    log = wait_for_the_end(jid, tmp_path)
    assert sacct_state(jid) == "COMPLETED", log[-3000:]
    assert "1 node(s) x 2 rank(s)" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] == json.loads((local_run / "summary.json").read_text())["test_accuracy"]


def test_plain_sbatch_script_requeues_itself_on_the_time_limit_warning(tmp_path, tiny_prepared, local_run):
    out = tmp_path / "run"
    jid = sbatch(tmp_path, out, tiny_prepared)
    wait_for_epochs(out, 1, JOB_TIMEOUT_S)
    # What `#SBATCH --signal=B:USR2@90` sends 90 s before the time limit: USR2 to the batch script.
    subprocess.run(["scancel", "--batch", "--signal=USR2", jid], check=True, timeout=30)
    log = wait_for_the_end(jid, tmp_path)
    assert sacct_state(jid) == "COMPLETED", log[-3000:]
    assert "requeueing job" in log, f"training ended before the signal landed:\n{log[-2000:]}"
    assert re.search(r"resuming from .*last\.pt", log), log[-2000:]
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == list(range(EPOCHS))  # none redone, none missing
    assert without_timing(records) == without_timing(read_metrics(local_run))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] == json.loads((local_run / "summary.json").read_text())["test_accuracy"]


def test_dry_run_prints_the_script_without_submitting(tmp_path, tiny_prepared):
    out = tmp_path / "run"
    proc = submit(
        "--partition", "debug", "--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "3",
        "--time", "01:30:00", "--dry-run", *overrides(tiny_prepared, out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    for line in ("--partition=debug", "--nodes=2", "--ntasks-per-node=3", "--time=90", "--signal=USR2@90"):
        assert f"#SBATCH {line}" in script
    assert "srun " in script and "submitit.core._submit" in script
    assert re.search(r"^srun .*--kill-on-bad-exit=1", script, re.M)  # a dead rank ends the job
    assert "job id" not in script and not out.exists()


def local_infer(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "galaxydist.infer", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, cwd=ROOT, env=env)


def test_infer_through_submit_requeues_on_preemption_and_equals_one_process(
    tmp_path, tiny_prepared, slurm_run
):
    """`submit.py ... infer` shards over the job's 2 ranks; preempted once it has written a part,
    it requeues, skips the written parts, and ends with the files one local process writes."""
    import submitit

    run, _ = slurm_run
    options = ["--tta", "--part-size", "16", "--workers", "0", "--embeddings"]
    reference = tmp_path / "reference"
    local = local_infer(str(run), str(tiny_prepared), "--out", str(reference), *options)
    assert local.returncode == 0, local.stderr[-2000:]
    out = tmp_path / "predictions"
    proc = submit(
        *CPU_JOB, "--max-requeues", "2", "infer", str(run), str(tiny_prepared), "--out", str(out), *options
    )
    assert proc.returncode == 0, proc.stderr
    assert f"output:     {out}" in proc.stdout
    job = submitit.SlurmJob(folder=tmp_path / "predictions.slurm", job_id=job_id(proc.stdout), tasks=(0, 1))
    wait_for(lambda: any(out.glob("part-*.parquet")), JOB_TIMEOUT_S, "the first part")
    job._interrupt()  # what a preemption sends: SIGTERM, then submitit's USR2
    wait_for(job.done, JOB_TIMEOUT_S, "the requeued job to finish")
    assert job.results() == [0, 0]
    assert "Requeued job" in job.paths.stdout.read_text(), "the job ended before the interrupt landed"
    parts = sorted(p.name for p in reference.glob("part-*.parquet"))
    assert len(parts) > 2 and parts == sorted(p.name for p in out.glob("part-*.parquet"))
    for name in parts:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_infer_is_checked_before_it_is_submitted(tmp_path, tiny_prepared, slurm_run):
    run, _ = slurm_run
    dry = submit(
        *CPU_JOB, "--job-name", "infer", "--dry-run", "infer", str(run), str(tiny_prepared), "--out", "p"
    )
    assert dry.returncode == 0, dry.stderr
    assert "#SBATCH --job-name=infer" in dry.stdout
    assert f"each task runs, in {ROOT}: galaxydist.infer.main(" in dry.stderr  # the user's relative paths
    cases = [
        ([str(tmp_path / "missing.pt"), str(tiny_prepared)], "checkpoint not found"),
        ([str(run), str(tmp_path / "missing.csv")], "not found"),
    ]
    for args, message in cases:
        proc = submit(*CPU_JOB, "infer", *args, "--out", str(tmp_path / "out"))
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.slurm").exists()
    mixed = submit(*CPU_JOB, "--config", str(CONFIG), "infer", str(run), str(tiny_prepared), "--out", "x")
    assert mixed.returncode == 2 and "infer takes no --sweep, --config" in mixed.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--partition", "no-such-partition"], "invalid partition specified: no-such-partition"),
        (["--partition", "gpu", "--tasks-per-node", "64"], "More processors requested than permitted"),
    ],
)
def test_rejected_request_is_one_clear_line(tmp_path, tiny_prepared, args, message):
    proc = submit(*args, "--gpus-per-node", "0", *overrides(tiny_prepared, tmp_path / "run"))
    assert proc.returncode != 0
    assert proc.stderr.startswith("error: sbatch rejected the job:") and message in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_sweep_is_one_job_array_with_a_failure_listed_and_a_preempted_task_requeued(tmp_path, tiny_prepared):
    """2 settings × 2 seeds as one array on the real SLURM: one task fails (a run folder holding
    another model's checkpoint), one is preempted mid-run and requeues; 3 complete run folders,
    the failure listed by submit and by the report. The settings are 3 and 30 epochs, so that
    the preempted task is still running when the interrupt lands."""
    import submitit
    from test_sweep import plant_a_checkpoint_of_another_model

    sweep = tmp_path / "sweep"
    failing, preempted = "seed=1,stages.0.max_epochs=3", "seed=0,stages.0.max_epochs=30"
    plant_a_checkpoint_of_another_model(sweep / failing)
    grid = ["--sweep", "seed=0,1", "--sweep", "stages.0.max_epochs=3,30", "--max-parallel", "2"]
    recipe = tiny_overrides(
        tiny_prepared, sweep, stages="[{name: t, lr: 0.003, max_epochs: 3, patience: 40}]"
    )
    cmd = [sys.executable, str(SUBMIT), *CPU_JOB, *grid, "--wait", "--max-requeues", "2", *recipe]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    jobs = {}
    for line in proc.stdout:
        match = re.match(r"task (\S+): job (\S+)$", line.strip())
        if match:
            jobs[match.group(1)] = match.group(2)
        if len(jobs) == 4:
            break
    assert len(jobs) == 4, proc.stderr.read()[-2000:]
    assert len({jid.split("_")[0] for jid in jobs.values()}) == 1  # one array
    wait_for_epochs(sweep / preempted, 1, JOB_TIMEOUT_S)
    task = submitit.SlurmJob(folder=sweep / "slurm", job_id=jobs[preempted], tasks=(0, 1))
    preempt(jobs[preempted])
    stdout, stderr = proc.communicate(timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 1, stdout[-2000:] + stderr[-2000:]
    assert "3 of 4 tasks completed" in stdout, stdout[-2000:] + stderr[-2000:]
    assert f"failed: {failing}" in stderr
    done = sorted(p.parent.name for p in sweep.glob("*/summary.json"))
    assert done == sorted(set(jobs) - {failing})
    log = task.paths.stdout.read_text()
    assert "Requeued job" in log, f"the task ended before the interrupt landed:\n{log[-2000:]}"
    assert re.search(r"resuming from .*last\.pt", log), log[-2000:]
    assert [r["epoch"] for r in read_metrics(sweep / preempted)] == list(range(30))  # none redone or lost
    result = subprocess.run(
        [sys.executable, "-m", "galaxydist.report", str(sweep)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert f"{failing}: failed" in (sweep / "report.md").read_text()


def test_a_rank_dying_in_a_submitted_job_ends_the_job_long_before_the_collective_timeout(
    tmp_path, tiny_prepared
):
    """One task per rank, rank 1 raises: srun --kill-on-bad-exit=1 ends rank 0 at once, not
    distributed.timeout_s later."""
    out = tmp_path / "run"
    timeout_s = 240
    helper = ROOT / "tests" / "helpers" / "submit_with_a_failing_rank.py"
    args = [*CPU_JOB, "--wait", *overrides(tiny_prepared, out), f"distributed.timeout_s={timeout_s}"]
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(helper), *args], capture_output=True, text=True, timeout=JOB_TIMEOUT_S, cwd=ROOT
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "did not complete" in proc.stderr
    jid = job_id(proc.stdout)
    logs = "".join(p.read_text() for p in (out / "slurm").glob(f"{jid}_*_log.err"))
    assert "injected failure on rank 1" in logs
    assert elapsed < timeout_s / 2, elapsed  # ended by SLURM, not by the collective's timeout
