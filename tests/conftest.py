"""Shared fixtures: small synthetic Galaxy10 files, prepared files, and a real torchrun launcher."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from galaxydist import synthetic
from galaxydist.data.galaxy10 import prepare

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def require(condition: bool, reason: str) -> None:
    """Skip a test whose prerequisite is missing here; under CI (env CI set) fail instead: CI must
    run every test but the CUDA ones, not skip them silently."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: CI must run this test")
    pytest.skip(reason)


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (real images): skipped on a user's machine without it, required in CI."""
    require(SHARED_DATA.exists(), "../shared/data is not present")
    return SHARED_DATA


def pytest_terminal_summary(terminalreporter) -> None:
    """How many tests of each kind (test file) passed, failed or skipped: CI's log shows what ran."""
    counts: dict[str, dict[str, int]] = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            kind = report.nodeid.split("::")[0].removeprefix("tests/")
            counts.setdefault(kind, {}).setdefault(outcome, 0)
            counts[kind][outcome] += 1
    terminalreporter.write_sep("-", "tests by kind")
    for kind in sorted(counts):
        line = ", ".join(f"{n} {outcome}" for outcome, n in counts[kind].items())
        terminalreporter.write_line(f"{kind}: {line}")


@pytest.fixture(scope="session")
def raw_small(tmp_path_factory) -> Path:
    """A synthetic Galaxy10-format file: 600 images of 48×48."""
    path = tmp_path_factory.mktemp("raw") / "galaxy10_small.h5"
    synthetic.generate(path, n=600, seed=1, size=48)
    return path


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory, raw_small) -> Path:
    """A prepared file at 32×32 (the centre of the 48×48 synthetic images)."""
    path = tmp_path_factory.mktemp("prepared") / "tiny.h5"
    prepare(str(raw_small), str(path), crop=32, seed=0)
    return path


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.2)


def wait_for_epochs(run: Path, count: int, timeout: float = 240) -> None:
    """Until `run`'s metrics.jsonl has `count` epochs."""
    metrics = run / "metrics.jsonl"
    wait_for(
        lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= count,
        timeout,
        f"{count} epochs",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_overrides(data: Path, out: Path, **extra: object) -> list[str]:
    """A config small enough for a test: tiny model, no workers, W&B off."""
    values = {
        "data.path": str(data),
        "output_dir": str(out),
        "data.batch_size": 32,
        "data.num_workers": 0,
        "model.channels": "[8,8,16,16,16]",
        "model.dropout": 0.0,
        "tracking.wandb": "disabled",
        "stages": "[{name: train, lr: 0.003, max_epochs: 2, patience: 5}]",
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def run_train(nproc: int, overrides: list[str], timeout: float = 300, extra_env: dict | None = None):
    """`torchrun --nproc_per_node=N -m galaxydist.train` (or plain python for N=0) as a subprocess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    if nproc == 0:
        cmd = [sys.executable, "-m", "galaxydist.train", *overrides]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}",
            "-m", "galaxydist.train", *overrides,
        ]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def assert_bad_train_input(data: Path, run: Path, extra: dict, message: str) -> None:
    """One process trained with `extra`: one error line holding `message`, exit 2, no run folder."""
    result = run_train(0, tiny_overrides(data, run, **extra))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not run.exists()


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(records: list[dict]) -> list[dict]:
    """Metrics records without their wall-clock fields, for comparing two runs."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in records]


# Runs compared parameter for parameter across world sizes or nodes train at this rate. At 3e-3
# Adam turns float rounding, which changes with the batch split, the thread count and the CPU's
# kernels, into steps of ±lr within two epochs: on an AMX Xeon one process on 1 and on 2 threads
# ends 1.5e-3 apart. At 1e-4 that noise stays under 1e-6, while ranks that skip BatchNorm's
# backward all-reduce end 1.3e-3 away from one process.
COMPARED_LR = 1e-4

REFERENCE_STAGES = "[{name: t, lr: 0.003, max_epochs: 4, patience: 9}]"


def reference_overrides(data: Path, out: Path) -> list[str]:
    """The 4-epoch, 2-rank run that fault tests disturb and compare against (dropout on)."""
    return tiny_overrides(data, out, stages=REFERENCE_STAGES, **{"model.dropout": 0.3})


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, tiny_prepared) -> Path:
    """An undisturbed 2-rank run of `reference_overrides`."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = run_train(2, reference_overrides(tiny_prepared, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


# --- tracking and reports: W&B confined to a temporary folder, a run shared by those tests -------
WANDB_SECRET = "secret-sentinel-123"


def wandb_env(root: Path) -> dict[str, str]:
    """W&B kept inside `root` and off the network: offline, no user settings or netrc, and an API
    key that must never be written anywhere."""
    home = root / "wandb_home"
    return {
        "WANDB_MODE": "offline",
        "WANDB_API_KEY": WANDB_SECRET,
        "WANDB_DIR": str(home / "dir"),
        "WANDB_CONFIG_DIR": str(home / "config"),
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_DATA_DIR": str(home / "data"),
        "WANDB_ARTIFACT_DIR": str(home / "artifacts"),
        "NETRC": str(home / "netrc"),
        "WANDB_BASE_URL": "http://127.0.0.1:9",  # should anything try the network, it fails at once
    }


@dataclass(frozen=True)
class TrainedRun:
    run: Path  # the run folder
    home: Path  # the temporary folder W&B's own settings and caches were confined to
    output: str  # stdout and stderr of the training


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_prepared) -> TrainedRun:
    """A tiny 2-rank run logged to W&B offline (with a sentinel API key in the environment);
    read, never modified, by the tracking, evaluate and predict tests. It trains under bf16
    autocast, as on a GPU, so evaluate must reproduce a run whose validation was bf16."""
    root = tmp_path_factory.mktemp("trained")
    overrides = tiny_overrides(
        tiny_prepared,
        root / "run",
        **{
            "tracking.wandb": "offline",
            "tracking.group": "tests",
            "tracking.tags": "[tiny,ci]",
            "speed.bf16": "true",
        },
    )
    result = run_train(2, overrides, extra_env=wandb_env(root))
    assert result.returncode == 0, result.stderr[-3000:]
    return TrainedRun(root / "run", root / "wandb_home", result.stdout + result.stderr)
