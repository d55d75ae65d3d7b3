"""Loader throughput: can the data path feed training ten times faster than training eats?

Images/s delivered in random order, batch 64, workers 0 and 2, from
  memmap       the training path: GalaxyDataset (one memmap read per batch) through make_loader
  h5py/item    a Dataset doing f["images"][i] per item, default DataLoader collate (the usual recipe)
  RAM/batch    the split as one uint8 tensor in RAM, one index_select per batch
  RAM/item     the same tensor as a TensorDataset with per-item collate
measured in interleaved rounds (every source once per round), median over rounds. The file is read
from the page cache (it was just written), as it is from the second epoch of a real run on.
On a loaded machine, torch ops in the main process with 2 OpenMP threads stall whenever one thread
is descheduled; `--loader-threads 1` shows the sources without that effect (numpy memmap reads
are single-threaded and immune to it).

Then the rate the real training step consumes (Trainer.train_epoch of the baseline recipe on the
same 128² file, a few steps) and the ratio.

    .venv/bin/python benchmarks/loader.py                    # ~2 min on 2 loaded cores
    .venv/bin/python benchmarks/loader.py --loader-threads 1 --out benchmarks/results/loader_threads1.json
    .venv/bin/python benchmarks/loader.py --n 17736 --rounds 7     # the full-size set
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import common
import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from galaxydist import distributed
from galaxydist.config import load_config
from galaxydist.data.dataset import GalaxyDataset, make_loader
from galaxydist.data.format import PreparedInfo, read_prepared
from galaxydist.data.samplers import TrainBatches
from galaxydist.engine.state import Position

BATCH = 64


class H5Items(Dataset):
    """The per-item h5py recipe: one `f["images"][row]` per sample; the file opens in each worker."""

    def __init__(self, info: PreparedInfo, split: str) -> None:
        self.path, self.rows, self.labels = info.path, info.splits[split], info.labels
        self.file: h5py.File | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "file": None}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.file is None:
            self.file = h5py.File(self.path, "r")
        row = int(self.rows[i])
        return torch.from_numpy(self.file["images"][row]), int(self.labels[row])


class RamBatches(Dataset):
    """The split as one contiguous uint8 N×H×W×C tensor in RAM; a batch is one gather of whole rows,
    returned as N×C×H×W in channels-last memory like GalaxyDataset."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(positions)
        # index_select, not images[index]: advanced indexing of a 4-D uint8 tensor is ~100× slower
        # on this CPU (12 ms vs 0.14 ms for 64 images at 128²)
        return self.images.index_select(0, index).permute(0, 3, 1, 2), self.labels[index]


def loaders(info: PreparedInfo, workers: int, seed: int) -> dict[str, DataLoader]:
    train = GalaxyDataset(info, "train")
    n = len(train)
    ram_images = torch.from_numpy(np.ascontiguousarray(train.images[train.rows]))  # N×H×W×C
    ram_labels = torch.from_numpy(info.labels[train.rows])
    persistent = workers > 0
    return {
        "memmap (make_loader)": make_loader(train, TrainBatches(n, 0, 1, BATCH, seed), workers),
        "h5py per item": DataLoader(
            H5Items(info, "train"),
            batch_size=BATCH,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            persistent_workers=persistent,
        ),
        "RAM tensor, batch gather": DataLoader(
            RamBatches(ram_images, ram_labels),
            sampler=TrainBatches(n, 0, 1, BATCH, seed),
            batch_size=None,
            num_workers=workers,
            persistent_workers=persistent,
        ),
        "RAM TensorDataset per item": DataLoader(
            TensorDataset(ram_images, ram_labels),  # items H×W×C, like the h5py reads
            batch_size=BATCH,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            persistent_workers=persistent,
        ),
    }


def epoch_rate(loader: DataLoader, epoch: int) -> float:
    """Images/s over one epoch. Every source returns materialised uint8 batches (memmap and h5py
    reads copy into fresh arrays, gathers and collate copy), so iterating is the whole cost."""
    sampler = loader.sampler
    if isinstance(sampler, TrainBatches):
        sampler.set_epoch(epoch)
    images = 0
    start = time.perf_counter()
    for batch in loader:
        x = batch[0]
        images += len(x)
        x[:, :, 0, 0].sum()  # touch the batch (cheap)
    return images / (time.perf_counter() - start)


class Limited:
    """The first `steps` batches of a loader: a short train_epoch without changing Trainer."""

    def __init__(self, loader: Any, steps: int) -> None:
        self.loader, self.steps = loader, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.loader), self.steps)


def training_rate(path: Path, workdir: Path, steps: int, repeats: int) -> dict[str, Any]:
    """Images/s of the real Trainer.train_epoch (galaxy10 recipe: baseline channels, batch 64)."""
    cfg = load_config(
        common.ROOT / "configs" / "galaxy10.yaml",
        [f"data.path={path}", f"output_dir={workdir / 'run'}", "tracking.wandb=disabled"],
    )
    trainer = common.make_trainer(cfg, distributed.setup())
    trainer.start_stage(cfg.stages[0])
    full = trainer.parts.train_loader
    rates = []
    for epoch in range(repeats + 1):  # the first is warm-up (oneDNN primitive creation, workers)
        trainer.parts.train_loader = Limited(full, 1 if epoch == 0 else steps)
        _, _, seconds, images = trainer.train_epoch(Position(epoch=epoch))
        if epoch:
            rates.append(images / seconds)
    return {
        "config": "configs/galaxy10.yaml",
        "channels": cfg.model.channels,
        "num_workers": cfg.data.num_workers,
        "steps": steps,
        "rates": rates,
        "images_per_s": common.median(rates),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="synthetic images to generate")
    parser.add_argument("--size", type=int, default=128, help="synthetic image side (prepared crop: 128)")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="timed epochs per source (interleaved)")
    parser.add_argument("--train-steps", type=int, default=2, help="steps per training measurement")
    parser.add_argument("--train-repeats", type=int, default=2)
    parser.add_argument(
        "--loader-threads",
        type=int,
        default=None,
        help="torch threads while timing the loaders (default: torch's); training keeps the default",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON (default: benchmarks/results/loader.json)"
    )
    args = parser.parse_args()
    info_machine = common.machine()
    with tempfile.TemporaryDirectory(prefix="gd_loader_", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        with common.timed() as t:
            path = common.synthetic_prepared(workdir, args.n, args.size, args.crop)
        info = read_prepared(path)
        print(f"prepared {info.shape} in {t[0]:.1f} s: {path.stat().st_size / 1e6:.0f} MB")
        default_threads = torch.get_num_threads()
        if args.loader_threads:
            torch.set_num_threads(args.loader_threads)
        sources = {w: loaders(info, w, seed=0) for w in (0, 2)}
        for group in sources.values():  # warm-up: start the workers, fill the page cache
            for loader in group.values():
                epoch_rate(loader, -1)
        rates: dict[tuple[str, int], list[float]] = {}
        combos = [(name, w) for w, group in sources.items() for name in group]
        for r in range(args.rounds):
            order = combos[r % len(combos) :] + combos[: r % len(combos)]  # rotate: no fixed position
            for name, w in order:
                rates.setdefault((name, w), []).append(epoch_rate(sources[w][name], r))
        del sources
        torch.set_num_threads(default_threads)
        train = training_rate(path, workdir, args.train_steps, args.train_repeats)
    consumed = train["images_per_s"]
    rows, results = [], []
    for (name, w), values in rates.items():
        med = common.median(values)
        rows.append([name, w, med, min(values), max(values), med / consumed])
        results.append({"source": name, "workers": w, "images_per_s": values, "median": med})
    rows.sort(key=lambda row: (row[1], -row[2]))
    info_machine = common.finish_machine(info_machine)
    print(f"\nmachine: {common.describe(info_machine)}")
    print(f"file: {args.n} images, {args.crop}² prepared, train split {len(info.splits['train'])} images")
    headers = ["source", "workers", "median img/s", "min", "max", "× training rate"]
    print(common.markdown_table(headers, rows))
    memmap = {w: common.median(rates[("memmap (make_loader)", w)]) for w in (0, 2)}
    print(
        f"\ntraining consumes {consumed:.0f} img/s (Trainer.train_epoch, galaxy10 recipe, "
        f"{train['steps']}-step epochs, median of {len(train['rates'])}); memmap loader / training = "
        + ", ".join(f"{memmap[w] / consumed:.0f}× (workers {w})" for w in (0, 2))
        + " (target ≥ 10×)"
    )
    out = common.write_result(
        "loader",
        {
            "machine": info_machine,
            "args": vars(args),
            "train_images": len(info.splits["train"]),
            "image_shape": info.shape[1:],
            "batch": BATCH,
            "results": results,
            "training": train,
            "ratio_memmap_over_training": {str(w): memmap[w] / consumed for w in (0, 2)},
            "target_met": min(memmap.values()) >= 10 * consumed,
        },
        args.out,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
