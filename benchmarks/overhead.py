"""Pipeline overhead: what does the real training loop cost beyond the model's own arithmetic?

For each model config (configs/demo.yaml and the baseline channels of configs/galaxy10.yaml, both
on a small synthetic prepared file, 48² by default), one process on the CPU, time per epoch of
  pipeline     the real Trainer.train_epoch (memmap loader, per-row hashed augmentation draws,
               weighted loss over the global batch, per-step flags, metric sums)
  bare+aug     a plain PyTorch loop of the same GalaxyCNN (nn.BatchNorm2d), same batch and optimiser,
               uint8 split in RAM, the same normalise() and augment() calls (torch.rand draws)
  bare         the same loop with pre-normalised float tensors in RAM and no augmentation
  pipeline+exact-BN  the pipeline with distributed.exact_batchnorm=true (GlobalBatchNorm2d, the
               N-rank BatchNorm arithmetic, in one process): what 1-vs-N-rank parity costs
all measured alternately in each round (order rotated per round), after one warm-up round. The
headline is pipeline/bare+aug (same work), paired per round, median; target ≤ 1.05.
`--profile` adds a torch.profiler table (top ops by self CPU time) of one epoch of pipeline and bare+aug.

    .venv/bin/python benchmarks/overhead.py                       # ~2 min on 2 cores
    .venv/bin/python benchmarks/overhead.py --rounds 7 --crop 64 --profile
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch
import torch.nn.functional as F

from galaxydist import distributed
from galaxydist.allocator import keep_freed_memory
from galaxydist.config import Config, load_config
from galaxydist.data.augment import augment, normalise
from galaxydist.data.dataset import GalaxyDataset
from galaxydist.data.format import read_prepared
from galaxydist.engine.state import Position
from galaxydist.models.cnn import GalaxyCNN

CONFIGS = {"demo": "configs/demo.yaml", "baseline": "configs/galaxy10.yaml"}


class Bare:
    """A plain training loop of the same model, batch, optimiser and memory format; data in RAM."""

    def __init__(self, cfg: Config, path: Path, steps: int, mode: str) -> None:
        info = read_prepared(path)
        train = GalaxyDataset(info, "train")
        nhwc = torch.from_numpy(np.ascontiguousarray(train.images[train.rows]))
        self.images = nhwc.permute(0, 3, 1, 2)  # uint8 N×C×H×W, channels-last memory
        self.labels = torch.from_numpy(info.labels[train.rows])
        self.mean = torch.tensor(info.mean, dtype=torch.float32)
        self.std = torch.tensor(info.std, dtype=torch.float32)
        self.weights = torch.tensor(info.class_weights, dtype=torch.float32)
        if mode == "bare":
            self.floats = normalise(self.images, self.mean, self.std, torch.float32).contiguous(
                memory_format=torch.channels_last
            )
        torch.manual_seed(cfg.seed)
        model = GalaxyCNN(cfg.model.channels, info.num_classes, cfg.model.dropout)
        self.model = model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.stages[0].lr)
        self.cfg, self.steps, self.mode, self.batch = cfg, steps, mode, cfg.data.batch_size

    def epoch(self) -> int:
        self.model.train()
        aug = self.cfg.augment
        order = torch.randperm(len(self.labels))
        for step in range(self.steps):
            index = order[step * self.batch : (step + 1) * self.batch]
            y = self.labels[index]
            if self.mode == "bare":
                x = self.floats[index].contiguous(memory_format=torch.channels_last)
                loss = F.cross_entropy(self.model(x), y, weight=self.weights)
            else:
                x = normalise(self.images[index], self.mean, self.std, torch.float32)
                x = augment(x, torch.rand(len(y), 3), aug.hflip, aug.vflip, aug.rotate)
                x = x.contiguous(memory_format=torch.channels_last)
                w = self.weights[y]
                loss = (w * F.cross_entropy(self.model(x), y, reduction="none")).sum() / w.sum()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return self.steps * self.batch


class Pipeline:
    """The real Trainer.train_epoch, an epoch at a time (a fresh Position each call)."""

    def __init__(self, cfg: Config, exact_batchnorm: bool = False) -> None:
        if exact_batchnorm:
            cfg = dataclasses.replace(
                cfg,
                output_dir=f"{cfg.output_dir}-exact",
                distributed=dataclasses.replace(cfg.distributed, exact_batchnorm=True),
            )
        self.trainer = common.make_trainer(cfg, distributed.setup())
        self.trainer.start_stage(cfg.stages[0])
        self.steps = len(self.trainer.parts.train_batches)
        self.epochs = 0

    def epoch(self) -> int:
        _, _, _, images = self.trainer.train_epoch(Position(epoch=self.epochs))
        self.epochs += 1
        return images


def profile_epoch(run: Callable[[], int], rows: int = 12) -> dict[str, Any]:
    """Top ops by self CPU time over one epoch (torch.profiler), as (name, ms, share)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    top = [
        {
            "op": e.key,
            "self_ms": e.self_cpu_time_total / 1e3,
            "share": e.self_cpu_time_total / total,
            "calls": e.count,
        }
        for e in events[:rows]
    ]
    return {"total_ms": total / 1e3, "top": top}


PYTHON_PARTS = {  # (file suffix, function): what a pipeline step spends its time in
    "loader: next batch": ("dataloader.py", "__next__"),
    "inputs (normalise, augment)": ("augment.py", "__call__"),
    "uniforms (per-row hash, numpy)": ("augment.py", "uniforms"),
    "  augment (affine_grid + grid_sample)": ("augment.py", "augment"),
    "derive_seed (dropout seed)": ("augment.py", "derive_seed"),
    "torch.manual_seed": ("random.py", "manual_seed"),
    "forward (model)": ("module.py", "_call_impl"),
    "  GlobalBatchNorm.forward": ("distributed.py", "forward"),
    "backward": ("__init__.py", "backward"),
    "optimizer.step": ("optimizer.py", "wrapper"),
}


def cprofile_epoch(run: Callable[[], int]) -> dict[str, Any]:
    """Cumulative seconds per part of one pipeline epoch (cProfile; nested parts are indented)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(run)
    total = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    parts = {}
    for label, (suffix, func) in PYTHON_PARTS.items():
        matches = [v for (file, _, name), v in stats.items() if name == func and file.endswith(suffix)]
        # the outermost entry of a recursive function (e.g. Module._call_impl) has the largest cumtime
        parts[label] = max((v[3] for v in matches), default=0.0)
    return {"epoch_s": total, "cumulative_s": parts}


def measure(name: str, path: Path, workdir: Path, rounds: int, profile: bool) -> dict[str, Any]:
    """Alternate the loops epoch by epoch; wall and process-CPU seconds of each epoch."""
    cfg = load_config(
        common.ROOT / CONFIGS[name],
        [f"data.path={path}", f"output_dir={workdir / name}", "tracking.wandb=disabled"],
    )
    pipeline = Pipeline(cfg)
    runners: dict[str, Callable[[], int]] = {"pipeline": pipeline.epoch}
    for mode in ("bare+aug", "bare"):
        runners[mode] = Bare(cfg, path, pipeline.steps, mode).epoch
    runners["pipeline+exact-BN"] = Pipeline(cfg, exact_batchnorm=True).epoch
    names = list(runners)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    images = pipeline.steps * cfg.data.batch_size
    for r in range(rounds + 1):  # round 0 warms up (oneDNN primitives, loader workers, allocator)
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            done = runners[n]()
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            assert done == images, (n, done, images)
            if r:
                wall[n].append(elapsed)
                cpu[n].append(elapsed_cpu)
    loops = {}
    for n in names:
        paired = [a / b for a, b in zip(wall[n], wall["bare+aug"], strict=True)]
        loops[n] = {
            "wall_s": wall[n],
            "cpu_s": cpu[n],
            "images_per_s_median": images / common.median(wall[n]),
            "images_per_s_best": images / min(wall[n]),
            "wall_over_bare_aug_paired_median": common.median(paired),
            "wall_over_bare_aug_best": min(wall[n]) / min(wall["bare+aug"]),
            "cpu_over_bare_aug_median": common.median(cpu[n]) / common.median(cpu["bare+aug"]),
        }
    result: dict[str, Any] = {
        "config": CONFIGS[name],
        "channels": cfg.model.channels,
        "batch": cfg.data.batch_size,
        "num_workers": getattr(pipeline.trainer.parts.train_loader, "num_workers", 0),
        "steps_per_epoch": pipeline.steps,
        "loops": loops,
        "ratio_pipeline_over_bare_aug": loops["pipeline"]["wall_over_bare_aug_paired_median"],
        "ratio_pipeline_over_bare": common.median(
            [a / b for a, b in zip(wall["pipeline"], wall["bare"], strict=True)]
        ),
        "ratio_exact_bn_over_pipeline": common.median(
            [a / b for a, b in zip(wall["pipeline+exact-BN"], wall["pipeline"], strict=True)]
        ),
    }
    if profile:
        result["profile"] = {n: profile_epoch(runners[n]) for n in ("pipeline", "bare+aug")}
        result["cprofile_pipeline"] = cprofile_epoch(runners["pipeline"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--n", type=int, default=1500, help="synthetic images (train split ≈ 70%%)")
    parser.add_argument("--size", type=int, default=64, help="synthetic image side")
    parser.add_argument("--crop", type=int, default=48, help="prepared image side (the demo's 48)")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds after one warm-up round")
    parser.add_argument("--profile", action="store_true", help="torch.profiler and cProfile of one epoch")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON (default: benchmarks/results/overhead.json)"
    )
    args = parser.parse_args()
    keep_freed_memory()  # as galaxydist.train's main does; every loop here gets it
    if args.threads:
        torch.set_num_threads(args.threads)
    info_machine = common.machine()
    results = {}
    with tempfile.TemporaryDirectory(prefix="gd_overhead_", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        path = common.synthetic_prepared(workdir, args.n, args.size, args.crop)
        for name in args.configs:
            results[name] = measure(name, path, workdir, args.rounds, args.profile)
    info_machine = common.finish_machine(info_machine)
    print(f"machine: {common.describe(info_machine)}")
    print(f"file: {args.n} synthetic images, {args.crop}² prepared; {args.rounds} rounds after a warm-up\n")
    rows = []
    for name, res in results.items():
        for n, loop in res["loops"].items():
            rows.append(
                [
                    name,
                    n,
                    loop["images_per_s_median"],
                    loop["images_per_s_best"],
                    f"{loop['wall_over_bare_aug_paired_median']:.3f}",
                    f"{loop['wall_over_bare_aug_best']:.3f}",
                    f"{loop['cpu_over_bare_aug_median']:.3f}",
                ]
            )
    headers = [
        "config",
        "loop",
        "img/s (median)",
        "img/s (best)",
        "wall / bare+aug (paired median)",
        "wall / bare+aug (best)",
        "CPU / bare+aug (median)",
    ]
    print(common.markdown_table(headers, rows))
    print()
    for name, res in results.items():
        print(
            f"{name} ({res['steps_per_epoch']} steps/epoch, workers {res['num_workers']}): "
            f"pipeline/bare+aug = {res['ratio_pipeline_over_bare_aug']:.3f}, "
            f"pipeline/bare = {res['ratio_pipeline_over_bare']:.3f}, "
            f"pipeline+exact-BN/pipeline = {res['ratio_exact_bn_over_pipeline']:.3f} "
            "(paired medians; target pipeline/bare ≤ 1.05)"
        )
        if "cprofile_pipeline" in res:
            cp = res["cprofile_pipeline"]
            print(f"\n{name} pipeline, one epoch under cProfile: {cp['epoch_s']:.2f} s")
            table = [[part, sec, f"{sec / cp['epoch_s']:.1%}"] for part, sec in cp["cumulative_s"].items()]
            print(common.markdown_table(["part", "cumulative s", "share"], table))
        for loop, prof in res.get("profile", {}).items():
            print(f"\n{name} {loop}: one epoch, {prof['total_ms']:.0f} ms self CPU in ops")
            table = [[t["op"], t["calls"], t["self_ms"], f"{t['share']:.1%}"] for t in prof["top"]]
            print(common.markdown_table(["op", "calls", "self ms", "share"], table))
    out = common.write_result(
        "overhead",
        {
            "machine": info_machine,
            "args": vars(args),
            "results": results,
            "target_met": all(r["ratio_pipeline_over_bare_aug"] <= 1.05 for r in results.values()),
        },
        args.out,
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
