"""Batch inference throughput: `galaxydist.infer` against a bare `model(x)` loop on the same
prepared file, model and batch size, one process on the CPU.

    .venv/bin/python benchmarks/infer.py [--n 4000] [--size 64] [--batch 256] [--rounds 3]

The bare loop reads the same memory-mapped images in the same batches, normalises them and calls
the model under no_grad; infer adds the DataLoader, the per-batch softmax, and the Parquet parts.
Reports the median img/s of each over the rounds and their ratio (goal ≥ 0.9).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import common
import numpy as np
import torch

from galaxydist.config import ModelConfig, dump_config, load_config
from galaxydist.data.augment import normalise
from galaxydist.data.dataset import open_images
from galaxydist.data.format import read_prepared
from galaxydist.infer import main as infer_main
from galaxydist.models import build_model


def checkpoint_for(prepared: Path, workdir: Path) -> Path:
    """A galaxydist checkpoint of the baseline seed CNN (untrained: the speed is the same)."""
    from galaxydist import checkpoint
    from galaxydist.engine.state import Position

    info = read_prepared(prepared)
    cfg = load_config(None, [f"data.path={prepared}", f"output_dir={workdir / 'run'}"])
    model = build_model(cfg.model, info.num_classes).to(memory_format=torch.channels_last)
    path = workdir / "run" / "checkpoints" / "best.pt"
    path.parent.mkdir(parents=True)
    checkpoint.save(checkpoint.training_state(model, cfg.to_dict(), info, Position().to_dict()), path)
    (workdir / "run" / "config.yaml").write_text(dump_config(cfg))
    return path


@torch.no_grad()
def bare(prepared: Path, model: torch.nn.Module, batch: int) -> float:
    info = read_prepared(prepared)
    images = open_images(info)
    mean, std = torch.tensor(info.mean), torch.tensor(info.std)
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch])).permute(0, 3, 1, 2)
        model(normalise(x, mean, std, torch.float32).contiguous(memory_format=torch.channels_last))
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        prepared = common.synthetic_prepared(workdir, args.n, args.size, args.size)
        ckpt = checkpoint_for(prepared, workdir)
        model = build_model(ModelConfig(), read_prepared(prepared).num_classes).eval()
        model = model.to(memory_format=torch.channels_last)
        rates = {"bare": [], "infer": []}
        for r in range(args.rounds + 1):  # the first round warms up
            rate = bare(prepared, model, args.batch)
            out = workdir / f"out{r}"
            start = time.perf_counter()
            infer_main(
                [
                    str(ckpt),
                    str(prepared),
                    "--out",
                    str(out),
                    "--batch-size",
                    str(args.batch),
                    "--workers",
                    "0",
                ]
            )
            infer_rate = args.n / (time.perf_counter() - start)
            if r:
                rates["bare"].append(rate)
                rates["infer"].append(infer_rate)
        medians = {k: statistics.median(v) for k, v in rates.items()}
        result = {
            "machine": common.machine(),
            "args": vars(args),
            "img_per_s": rates,
            "median": medians,
            "ratio": medians["infer"] / medians["bare"],
        }
        path = common.write_result("infer", result)
        print(
            f"bare {medians['bare']:.0f} img/s, infer {medians['infer']:.0f} img/s, ratio {result['ratio']:.3f} → {path}"
        )


if __name__ == "__main__":
    main()
