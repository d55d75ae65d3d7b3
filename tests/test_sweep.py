"""Sweeps through launch/submit.py --cluster local, and the comparison report."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, read_metrics, tiny_overrides

from galaxydist.errors import UserError
from galaxydist.models.cnn import GalaxyCNN
from galaxydist.sweep import parse_sweeps, split_values

SUBMIT = ROOT / "launch" / "submit.py"
TWO_EPOCHS = "[{name: t, lr: 0.003, max_epochs: 2, patience: 5}]"
GRID = ["--sweep", "seed=0,1", "--sweep", "stages.0.lr=0.003,0.001"]


def submit(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SUBMIT), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "galaxydist.report", *args], capture_output=True, text=True, cwd=ROOT
    )


def plant_a_checkpoint_of_another_model(run: Path) -> None:
    """A run folder whose last.pt is for another model: that task fails with exit 2 at its start."""
    (run / "checkpoints").mkdir(parents=True)
    state = {
        "model": GalaxyCNN([4], 10).state_dict(),
        "config": {"model": {"channels": [4]}},
        "class_names": [],
    }
    torch.save(state, run / "checkpoints" / "last.pt")


def test_values_split_at_top_level_commas_only():
    assert split_values("1,2,[3,4],{a: 1, b: 2}") == ["1", "2", "[3,4]", "{a: 1, b: 2}"]
    assert parse_sweeps(["seed=0,1", "model.channels=[8,8],[16,16]"]) == {
        "seed": [0, 1],
        "model.channels": [[8, 8], [16, 16]],
    }


def test_a_local_sweep_with_one_failing_task_runs_the_others_and_reports_the_failure(tiny_prepared, tmp_path):
    sweep = tmp_path / "sweep"
    plant_a_checkpoint_of_another_model(sweep / "seed=1,stages.0.lr=0.001")
    overrides = tiny_overrides(tiny_prepared, sweep, stages=TWO_EPOCHS)
    proc = submit("--cluster", "local", "--max-parallel", "2", *GRID, *overrides)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "3 of 4 tasks completed" in proc.stdout
    assert "failed: seed=1,stages.0.lr=0.001: failed (exit 2" in proc.stderr
    done = sorted(p.parent.name for p in sweep.glob("*/summary.json"))
    assert done == ["seed=0,stages.0.lr=0.001", "seed=0,stages.0.lr=0.003", "seed=1,stages.0.lr=0.003"]
    manifest = json.loads((sweep / "sweep.json").read_text())
    assert [t["status"].split(" ")[0] for t in manifest["tasks"]] == ["completed"] * 3 + ["failed"]
    configs = [(sweep / name / "config.yaml").read_text() for name in done]
    assert all(f"group: {sweep.name}" in c for c in configs)  # one W&B group for the sweep

    result = report(str(sweep))
    assert result.returncode == 0, result.stderr
    table = (sweep / "report.md").read_text()
    assert "| stages.0.lr=0.003 | 2 |" in table and "| stages.0.lr=0.001 | 1 |" in table
    assert "seed=1,stages.0.lr=0.001: failed (exit 2" in table
    rows = (sweep / "report.csv").read_text().splitlines()
    assert rows[0].startswith("setting,n,test_accuracy_mean,test_accuracy_std") and len(rows) == 3
    accuracies = [json.loads((sweep / n / "summary.json").read_text())["test_accuracy"] for n in done]
    mean_003 = (accuracies[1] + accuracies[2]) / 2
    assert f"{mean_003:.4f} ±" in table
    rates = [np.mean([r["images_per_second"] for r in read_metrics(sweep / n)]) for n in done[1:]]
    (line,) = [ln for ln in table.splitlines() if ln.startswith("| stages.0.lr=0.003 |")]
    assert line.endswith(f"| {np.mean(rates):.1f} ± {np.std(rates, ddof=1):.1f} |")  # train img/s
    assert (sweep / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dry_run_prints_the_grid_and_runs_nothing(tiny_prepared, tmp_path):
    sweep = tmp_path / "sweep"
    proc = submit("--cluster", "local", "--dry-run", *GRID, *tiny_overrides(tiny_prepared, sweep))
    assert proc.returncode == 0, proc.stderr
    assert "sweep of 4 tasks" in proc.stdout and "| seed=1,stages.0.lr=0.001 | 1 | 0.001 |" in proc.stdout
    assert not sweep.exists()


@pytest.mark.parametrize(
    "sweep, message",
    [
        ("stages.0.lrate=1,2", "unknown config key 'stages.0.lrate'"),
        ("data.batch_size=32,big", "config key 'data.batch_size': expected int, got 'big'"),
        ("seed=", "--sweep seed: an empty list of values"),
        ("augment.mirror_swap=[[1,1]]", "must pair two different classes"),
    ],
)
def test_bad_sweep_is_one_line_exit_2_nothing_submitted(tiny_prepared, tmp_path, sweep, message):
    out = tmp_path / "sweep"
    proc = submit("--cluster", "local", "--sweep", sweep, *tiny_overrides(tiny_prepared, out))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not out.exists()


def test_report_compares_ordinary_run_folders_too(tiny_prepared, tmp_path):
    """Named by the keys that differ, or by --row labels (a row's runs are seeds of one setting)."""
    from conftest import run_train

    for name, dropout, seed in (("a", 0.0, 0), ("a1", 0.0, 1), ("b", 0.2, 0)):
        overrides = {"model.dropout": dropout, "seed": seed, "stages": TWO_EPOCHS}
        result = run_train(0, tiny_overrides(tiny_prepared, tmp_path / name, **overrides))
        assert result.returncode == 0, result.stderr[-2000:]
    a, a1, b = (str(tmp_path / name) for name in ("a", "a1", "b"))
    out = tmp_path / "cmp"
    result = report(a, a1, b, "--out", str(out))
    assert result.returncode == 0, result.stderr
    table = (out / "report.md").read_text()
    assert "| model.dropout=0.0 | 2 |" in table and "| model.dropout=0.2 | 1 |" in table

    result = report("--row", "no dropout", a, a1, "--row", "dropout 0.2", b, "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = [line.split(" | ")[:2] for line in (out / "report.md").read_text().splitlines()[2:]]
    assert rows == [["| no dropout", "2"], ["| dropout 0.2", "1"]]

    mixed = report("--row", "mixed", a, b)
    assert mixed.returncode == 2 and mixed.stderr.count("\n") == 1, mixed.stderr
    assert "--row 'mixed': its runs differ in config key 'model.dropout' (0.0 vs 0.2)" in mixed.stderr
    assert not (tmp_path / "a" / "report.md").exists()
    both = report(a, "--row", "x", b)
    assert both.returncode == 2 and "not both" in both.stderr
    twice = report("--row", "x", a, "--row", "y", a1, a)
    assert twice.returncode == 2 and f"--row 'y': {a} is in an earlier row too" in twice.stderr


def test_report_of_a_folder_without_runs_is_one_line_exit_2(tmp_path):
    result = report(str(tmp_path))
    assert result.returncode == 2 and "no finished run" in result.stderr


def load_submit():
    spec = importlib.util.spec_from_file_location("submit", ROOT / "launch" / "submit.py")
    submit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(submit)
    return submit


def test_submitted_ranks_meet_on_a_port_below_the_ephemeral_range(monkeypatch):
    """submitit alone would pick 20000-60000 from the job id: job 1 got 51342, which an outgoing
    connection held once (EADDRINUSE). The port slurm/train.sbatch uses instead, unless RDZV_PORT."""
    submit = load_submit()
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {submit.rendezvous_port({"SLURM_JOB_ID": str(job)}) for job in range(1, 1001)}
    assert len(ports) == 1000 and max(ports) < ephemeral_low  # concurrent jobs differ; none ephemeral
    slurm = {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "MASTER_PORT": "51342",
             "SUBMITIT_EXECUTOR": "slurm"}  # fmt: skip
    exported = ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    for name, value in {**dict.fromkeys(exported, ""), **slurm}.items():
        monkeypatch.setenv(name, value)  # so that the ones export() writes are undone too
    submit.export_distributed_environment()
    assert os.environ["MASTER_PORT"] == "29501"  # what train.sbatch says for job 1; the inherited one goes
    monkeypatch.setenv("RDZV_PORT", "40000")
    submit.export_distributed_environment()
    assert os.environ["MASTER_PORT"] == "40000"
    monkeypatch.setenv("RDZV_PORT", "4e4")
    with pytest.raises(UserError, match="RDZV_PORT='4e4' is not a port number"):
        submit.export_distributed_environment()


def test_submit_splits_off_the_infer_command_line():
    submit = load_submit()
    parser = submit.build_parser()
    with_value = {o for a in parser._actions for o in a.option_strings if a.nargs != 0 and o.startswith("--")}
    assert with_value == {f"--{name}" for name in submit.VALUE_OPTIONS}  # the list follows the parser
    own, rest = submit.split_command(
        ["--job-name", "infer", "--wait", "infer", "run", "cat.csv", "--out", "o"]
    )
    assert own == ["--job-name", "infer", "--wait"] and rest == ["run", "cat.csv", "--out", "o"]
    assert submit.split_command(["--partition", "gpu", "seed=1"]) == (["--partition", "gpu", "seed=1"], None)
