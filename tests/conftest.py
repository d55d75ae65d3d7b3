"""Shared fixtures: small synthetic Galaxy10 files, prepared files, and a real torchrun launcher."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from galaxydist import synthetic
from galaxydist.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


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


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
