"""Multi-node on a real 2-node SLURM (slurm/local-cluster.sh up --nodes 2: two slurmd daemons on
this machine, each with its own node-local folder): submit.py and sbatch over 2 nodes, node-local
staging, a run folder that is not shared, the loss of a node, and scancel.

Skipped where no 2-node SLURM answers, except under CI (env CI set), where that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import (
    COMPARED_LR,
    ROOT,
    read_metrics,
    require,
    run_train,
    tiny_overrides,
    wait_for,
    wait_for_epochs,
    without_timing,
)
from test_train import assert_same_state, final_state

pytestmark = pytest.mark.slurm

SUBMIT = ROOT / "launch" / "submit.py"
SLURM_DIR = Path(os.environ.get("GALAXYDIST_SLURM_DIR", "/var/tmp/galaxydist-slurm"))
NODE_LOCAL = Path(os.environ.get("GALAXYDIST_NODE_LOCAL", "/mnt/galaxydist-local"))
TIMEOUT_S = 300
TWO_NODES = [
    "--partition",
    "gpu",
    "--nodes",
    "2",
    "--tasks-per-node",
    "1",
    "--gpus-per-node",
    "0",
    "--time",
    "10",
]
EPOCHS = 4


def nodes() -> int:
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-p", "gpu", "-o", "%D"], capture_output=True, text=True, timeout=15
        )
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return int(out.stdout.strip() or 0) if out.returncode == 0 else 0


@pytest.fixture(scope="module", autouse=True)
def two_node_cluster() -> None:
    require(nodes() >= 2, "no 2-node SLURM (start one with: bash slurm/local-cluster.sh up --nodes 2)")


def recipe(data: Path, out: Path, **extra: object) -> list[str]:
    return tiny_overrides(
        data, out, stages=f"[{{name: t, lr: {COMPARED_LR}, max_epochs: {EPOCHS}, patience: 9}}]", **extra
    )


def submit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SUBMIT), *args], capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.fixture(scope="module")
def one_node_run(tmp_path_factory, tiny_prepared) -> Path:
    """torchrun --standalone --nproc_per_node 2 on one node: what every 2-node run must equal."""
    out = tmp_path_factory.mktemp("one_node") / "run"
    proc = run_train(2, recipe(tiny_prepared, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def assert_same_as(reference: Path, run: Path) -> None:
    """The same parameters and metrics to 1e-5 (a rank alone on its node may use more threads
    than the reference's, which sums in another order)."""
    assert_same_state(final_state(reference), final_state(run), rtol=1e-5, atol=1e-5)
    ours, theirs = without_timing(read_metrics(run)), without_timing(read_metrics(reference))
    assert [r.keys() for r in ours] == [r.keys() for r in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert a["stage"] == b["stage"]
        numbers = [k for k in a if k != "stage"]
        assert [a[k] for k in numbers] == pytest.approx([b[k] for k in numbers], rel=1e-5), (a, b)


def job_state(jid: str) -> str:
    """The job's state in accounting ('' until it is known)."""
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "State", "-j", jid], capture_output=True, text=True
    )
    return out.stdout.strip()


def nodes_of(run: Path) -> list[str]:
    return [r["node"] for r in json.loads((run / "ranks.json").read_text())]


def test_submit_over_two_nodes_equals_two_ranks_on_one(tmp_path, tiny_prepared, one_node_run):
    out = tmp_path / "run"
    proc = submit(*TWO_NODES, "--wait", *recipe(tiny_prepared, out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert nodes_of(out) == ["n1", "n2"]  # every rank's node logged; two different nodes
    assert_same_as(one_node_run, out)


def test_sbatch_over_two_nodes_equals_two_ranks_on_one(tmp_path, tiny_prepared, one_node_run):
    out = tmp_path / "run"
    proc = subprocess.run(
        ["sbatch", "--parsable", "--wait", "--partition=gpu", "--nodes=2", "--cpus-per-task=1", "--time=10",
         f"--output={tmp_path}/sbatch-%j.out", str(ROOT / "slurm" / "train.sbatch"), *recipe(tiny_prepared, out)],
        capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    log = "".join(p.read_text() for p in tmp_path.glob("sbatch-*.out"))
    assert proc.returncode == 0, log[-3000:] + proc.stderr[-2000:]
    assert "2 node(s) x 1 rank(s)" in log
    assert sorted(nodes_of(out)) == ["n1", "n2"]
    assert_same_as(one_node_run, out)


def test_staging_gives_each_node_its_own_checked_copy(tmp_path, tiny_prepared, one_node_run):
    out = tmp_path / "run"
    for node in ("n1", "n2"):  # no copy left from an earlier test
        subprocess.run(
            ["rm", "-rf", str(SLURM_DIR / "nodes" / node / "local" / "galaxydist-stage")], check=True
        )
    proc = submit(
        *TWO_NODES,
        "--wait",
        *recipe(tiny_prepared, out, **{"data.stage": "auto"}),
        env={"SLURM_TMPDIR": str(NODE_LOCAL)},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    copies = sorted(SLURM_DIR.glob(f"nodes/*/local/galaxydist-stage/*-{tiny_prepared.name}"))
    assert [c.parts[-4] for c in copies] == ["n1", "n2"]  # one copy per node, in its own local folder
    assert all(c.read_bytes() == tiny_prepared.read_bytes() for c in copies)
    ranks = json.loads((out / "ranks.json").read_text())
    assert all(
        r["data"].startswith(str(NODE_LOCAL / "galaxydist-stage")) for r in ranks
    )  # each reads its copy
    assert_same_as(one_node_run, out)
    # A second job reuses the copies (checked, not copied again).
    before = [c.stat().st_mtime_ns for c in copies]
    again = submit(
        *TWO_NODES,
        "--wait",
        *recipe(tiny_prepared, tmp_path / "again", **{"data.stage": "auto"}),
        env={"SLURM_TMPDIR": str(NODE_LOCAL)},
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert [c.stat().st_mtime_ns for c in copies] == before


def test_a_run_folder_the_nodes_do_not_share_is_one_clear_error(tmp_path, tiny_prepared):
    out = NODE_LOCAL / f"not-shared-{os.getpid()}"  # each node sees its own folder at this path
    logs = tmp_path / "slurm"  # submitit's own files must be shared: they are
    proc = submit(*TWO_NODES, "--wait", "--log-dir", str(logs), *recipe(tiny_prepared, out))
    assert proc.returncode == 1
    assert "is not on a file system all nodes share" in proc.stderr, proc.stderr[-2000:]
    assert "rank 1 on n2 does not see what rank 0 wrote" in proc.stderr
    assert not list(SLURM_DIR.glob(f"nodes/*/local/{out.name}"))  # nothing left behind


def node_processes(node: str, marker: str) -> list[psutil.Process]:
    """This test's job processes on one node: the marker and SLURMD_NODENAME in their environment."""
    found = []
    for p in psutil.process_iter():
        try:
            env = p.environ()
        except psutil.Error:
            continue
        if env.get("GALAXYDIST_TEST_RUN") == marker and env.get("SLURMD_NODENAME") == node:
            found.append(p)
    return found


def test_losing_a_node_mid_epoch_ends_every_rank_and_a_resubmission_finishes_the_run(
    tmp_path, tiny_prepared, one_node_run
):
    """kill -9 of every process of n2's job step, as a node failure would: rank 0 on n1 leaves
    (srun ends it) long before distributed.timeout_s, nothing is left, and submitting the same
    command again resumes from last.pt and ends like an undisturbed run."""
    out = tmp_path / "run"
    marker = f"node-loss-{os.getpid()}"
    args = [*TWO_NODES, *recipe(tiny_prepared, out, **{"distributed.timeout_s": 240})]
    first = submit(*args, env={"GALAXYDIST_TEST_RUN": marker})
    assert first.returncode == 0, first.stderr
    jid = re.search(r"^job id:\s+(\d+)$", first.stdout, re.M).group(1)
    wait_for_epochs(out, 1, TIMEOUT_S)
    victims = node_processes("n2", marker)
    assert victims
    started = time.monotonic()
    for victim in victims:
        victim.kill()
    ended = ("FAILED", "CANCELLED", "COMPLETED", "NODE_FAIL")
    wait_for(lambda: job_state(jid).split(" ")[0] in ended, TIMEOUT_S, f"job {jid} to end")
    assert time.monotonic() - started < 120  # not the 240 s collective timeout
    wait_for(
        lambda: not node_processes("n1", marker) and not node_processes("n2", marker), 60, "no process left"
    )
    assert len(read_metrics(out)) < EPOCHS  # it really stopped mid-run
    again = submit(*args, "--wait")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert_same_as(one_node_run, out)


def test_scancel_stops_the_job_for_good_and_a_preemption_would_requeue(tmp_path, tiny_prepared):
    out = tmp_path / "run"
    args = [
        *TWO_NODES,
        *tiny_overrides(tiny_prepared, out, stages="[{name: t, lr: 0.003, max_epochs: 40, patience: 40}]"),
    ]
    proc = submit(*args)
    assert proc.returncode == 0, proc.stderr
    jid = re.search(r"^job id:\s+(\d+)$", proc.stdout, re.M).group(1)
    wait_for_epochs(out, 1, TIMEOUT_S)
    subprocess.run(["scancel", jid], check=True, timeout=30)
    wait_for(
        lambda: (
            job_state(jid).startswith("CANCELLED")
            and not subprocess.run(["squeue", "-h", "-j", jid], capture_output=True, text=True).stdout.strip()
        ),
        TIMEOUT_S,
        "the cancel",
    )
    log = (out / "slurm" / f"{jid}_0_log.out").read_text()
    assert "stopped by scancel: last.pt saved, not requeued" in log, log[-2000:]
    assert "Requeued job" not in log
    assert not (out / "summary.json").exists()
