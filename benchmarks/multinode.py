"""Time from `launch/submit.py` to the first training step, on 1 and 2 nodes of the local SLURM
(`bash slurm/local-cluster.sh up --nodes 2`), with CPU ranks (one per node).

    .venv/bin/python benchmarks/multinode.py [--rounds 3]

The first step's time is read back from the run: when the first epoch's line reached
metrics.jsonl, minus that epoch's own seconds. Both include SLURM's scheduling, Python and torch
start-up, the rendezvous, and the model and loaders being built.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

SUBMIT = common.ROOT / "launch" / "submit.py"


def first_step_seconds(nodes: int, data: Path, out: Path) -> float:
    args = [
        "--partition", "gpu", "--nodes", str(nodes), "--tasks-per-node", str(2 // nodes), "--gpus-per-node", "0",
        "--time", "10", f"data.path={data}", f"output_dir={out}", "data.batch_size=32", "model.channels=[8,8,16,16,16]",
        "tracking.wandb=disabled", "stages=[{name: t, lr: 0.003, max_epochs: 1, patience: 5}]",
    ]  # fmt: skip
    started = time.time()
    subprocess.run([sys.executable, str(SUBMIT), *args], check=True, capture_output=True, timeout=120)
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.05)
    line_time = metrics.stat().st_mtime
    epoch = json.loads(metrics.read_text().splitlines()[0])
    while not (out / "summary.json").exists():  # let the job end before the next one starts
        time.sleep(0.2)
    return line_time - epoch["seconds"] - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=common.ROOT / "benchmarks") as tmp:  # shared with the "nodes"
        workdir = Path(tmp)
        data = common.synthetic_prepared(workdir, 600, 48, 32)
        seconds: dict[str, list[float]] = {"1 node x 2 ranks": [], "2 nodes x 1 rank": []}
        for r in range(args.rounds):
            for nodes, key in ((1, "1 node x 2 ranks"), (2, "2 nodes x 1 rank")):
                seconds[key].append(first_step_seconds(nodes, data, workdir / f"run_{nodes}_{r}"))
    medians = {k: statistics.median(v) for k, v in seconds.items()}
    path = common.write_result(
        "multinode", {"machine": common.machine(), "seconds": seconds, "median": medians}
    )
    for key, value in medians.items():
        print(f"{key}: submit to first step {value:.1f} s (median of {args.rounds}; {seconds[key]})")
    print(path)


if __name__ == "__main__":
    main()
