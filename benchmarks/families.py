"""Training-step and inference img/s of each model family on this machine's CPU (one process),
at the same image size and batch.

    .venv/bin/python benchmarks/families.py [--size 128] [--batch 64] [--steps 5]

A step is what the Trainer does: forward (channels_last), class-weighted cross-entropy,
backward, Adam; inference is a no_grad forward of the same batch. Peak RSS is the process's
high-water mark after each family (it only grows: read the increments).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import common
import torch
import torch.nn.functional as F

from galaxydist.config import ModelConfig
from galaxydist.models import build_model

FAMILIES = {
    "cnn (seed, galaxy10 widths)": ModelConfig(),
    "cnn, no pooling in blocks 1-2": ModelConfig(pool=[False, False, True, True, True]),
    "timm resnet18": ModelConfig(name="timm", arch="resnet18"),
    "timm efficientnet_lite0": ModelConfig(name="timm", arch="efficientnet_lite0"),
    "e2cnn C8 [6,12,24,32]": ModelConfig(name="e2cnn", group="C8", channels=[6, 12, 24, 32]),
}


def rates(cfg: ModelConfig, size: int, batch: int, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = build_model(cfg, 10).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        loss = F.cross_entropy(model.train()(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    train = batch / statistics.median(times[1:])
    with torch.no_grad():
        model.eval()(x)
        start = time.perf_counter()
        for _ in range(steps):
            model(x)
        infer = batch * steps / (time.perf_counter() - start)
    return train, infer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    rows = {}
    print("| family | train img/s | inference img/s | peak RSS MiB |\n|---|---:|---:|---:|")
    for name, cfg in FAMILIES.items():
        train, infer = rates(cfg, args.size, args.batch, args.steps)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows[name] = {"train_img_per_s": train, "infer_img_per_s": infer, "peak_rss_mib": rss}
        print(f"| {name} | {train:.0f} | {infer:.0f} | {rss:.0f} |", flush=True)
    print(
        common.write_result("families", {"machine": common.machine(), "args": vars(args), "families": rows})
    )


if __name__ == "__main__":
    main()
