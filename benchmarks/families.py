"""Training-step and inference img/s of each model family (one process), at the same image size
and batch, on the CPU or a GPU.

    .venv/bin/python benchmarks/families.py [--size 128] [--batch 64] [--steps 5] [--device cuda] [--out F]

A step is what the Trainer does: forward (channels_last; bf16 autocast on a GPU), class-weighted
cross-entropy, backward, Adam; inference is a no_grad forward of the same batch. On the CPU the
memory column is the process's peak RSS after each family (it only grows: read the increments);
on a GPU, each family's own peak allocated memory. A family whose library is missing (timm or
e2cnn on a bare GPU image) is listed as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time
from pathlib import Path

import common
import torch
import torch.nn.functional as F

from galaxydist.config import ModelConfig
from galaxydist.errors import UserError
from galaxydist.models import build_model

FAMILIES = {
    "cnn (seed, galaxy10 widths)": ModelConfig(),
    "cnn, no pooling in blocks 1-2": ModelConfig(pool=[False, False, True, True, True]),
    "timm resnet18": ModelConfig(name="timm", arch="resnet18"),
    "timm efficientnet_lite0": ModelConfig(name="timm", arch="efficientnet_lite0"),
    "e2cnn C8 [6,12,24,32]": ModelConfig(name="e2cnn", group="C8", channels=[6, 12, 24, 32]),
}


def rates(cfg: ModelConfig, size: int, batch: int, steps: int, device: torch.device) -> tuple[float, float]:
    torch.manual_seed(0)
    model = build_model(cfg, 10).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    on_gpu = device.type == "cuda"
    autocast = torch.autocast("cuda", torch.bfloat16) if on_gpu else contextlib.nullcontext()

    def clock() -> float:
        if on_gpu:
            torch.cuda.synchronize()
        return time.perf_counter()

    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = clock()
        with autocast:
            loss = F.cross_entropy(model.train()(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(clock() - start)
    train = batch / statistics.median(times[1:])
    with torch.no_grad(), autocast:
        model.eval()(x)
        start = clock()
        for _ in range(steps):
            model(x)
        infer = batch * steps / (clock() - start)
    return train, infer


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, help="JSON (default: benchmarks/results/families.json)")
    args = parser.parse_args()
    device = torch.device(args.device)
    memory = "peak GPU MiB" if device.type == "cuda" else "peak RSS MiB"
    rows = {}
    print(f"| family | train img/s | inference img/s | {memory} |\n|---|---:|---:|---:|")
    for name, cfg in FAMILIES.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            train, infer = rates(cfg, args.size, args.batch, args.steps, device)
        except UserError as err:  # its library is not installed here
            rows[name] = {"skipped": str(err)}
            print(f"| {name} | skipped: {err} | | |", flush=True)
            continue
        peak = peak_memory_mib(device)
        rows[name] = {"train_img_per_s": train, "infer_img_per_s": infer, "peak_memory_mib": peak}
        print(f"| {name} | {train:.0f} | {infer:.0f} | {peak:.0f} |", flush=True)
    result = {"machine": common.machine(), "args": vars(args), "families": rows}
    print(common.write_result("families", result, args.out))


if __name__ == "__main__":
    main()
