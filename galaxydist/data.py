"""The prepared data set: its on-disk layout, a memory-mapped Dataset, and rank-aware samplers.

A prepared file holds every image once, contiguous and unfiltered, so that each rank and loader
worker maps the same bytes with `np.memmap`: one copy in the page cache, none per process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from .errors import UserError
from .layout import FORMAT_VERSION, SPLITS


@dataclass(frozen=True)
class PreparedInfo:
    """What a prepared file says about itself; read once, small, picklable."""

    path: str
    offset: int
    shape: tuple[int, int, int, int]
    labels: np.ndarray
    splits: dict[str, np.ndarray]
    class_names: tuple[str, ...]
    class_weights: np.ndarray
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop: int  # side of the source's central square that became image_size

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return self.shape[1]


def read_prepared(path: str | os.PathLike) -> PreparedInfo:
    """Open and check a prepared file: format version, contiguous layout, size on disk."""
    path = str(path)
    if not os.path.exists(path):
        raise UserError(f"{path}: prepared data file not found (make it with `python -m galaxydist.prepare`)")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise UserError(f"{path}: not a readable HDF5 file ({err})") from None
    with f:
        version = f.attrs.get("galaxydist_format")
        if version is None:
            raise UserError(f"{path}: not a prepared galaxydist file (run `python -m galaxydist.prepare`)")
        if int(version) != FORMAT_VERSION:
            raise UserError(f"{path}: prepared with format {version}, this version reads {FORMAT_VERSION}")
        images = f["images"]
        if images.chunks is not None or images.compression is not None:
            raise UserError(f"{path}: 'images' is chunked or compressed, cannot be memory-mapped; re-prepare")
        offset = images.id.get_offset()
        if offset is None:
            raise UserError(f"{path}: 'images' was never written")
        shape = tuple(int(s) for s in images.shape)
        end = offset + int(np.prod(shape))
        if os.path.getsize(path) < end:
            raise UserError(f"{path}: truncated ({os.path.getsize(path)} bytes, images end at {end})")
        labels = f["labels"][()].astype(np.int64)
        splits = {name: f["splits"][name][()].astype(np.int64) for name in SPLITS}
        class_names = tuple(str(n) for n in f.attrs["class_names"])
        info = PreparedInfo(
            path=path,
            offset=int(offset),
            shape=shape,  # type: ignore[arg-type]
            labels=labels,
            splits=splits,
            class_names=class_names,
            class_weights=f["class_weights"][()].astype(np.float64),
            mean=tuple(float(v) for v in f.attrs["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in f.attrs["std"]),  # type: ignore[arg-type]
            crop=int(f.attrs.get("crop", shape[1])),
        )
    if len(labels) != shape[0] or labels.min(initial=0) < 0 or labels.max(initial=0) >= len(class_names):
        raise UserError(f"{path}: labels do not match the images or the class list; re-prepare")
    for name, rows in splits.items():
        if len(rows) and (rows.min() < 0 or rows.max() >= shape[0]):
            raise UserError(f"{path}: split {name!r} indexes past the images; re-prepare")
    return info


class GalaxyDataset(Dataset):
    """One split of a prepared file, memory-mapped read-only and mapped lazily in each process.

    Indexing with a list of positions returns a whole batch in one read: (uint8 images N×C×H×W in
    channels-last memory, int64 labels, int64 file rows). File rows key the augmentation randomness.
    """

    def __init__(self, info: PreparedInfo, split: str) -> None:
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        self.info = info
        self.split = split
        self.rows = info.splits[split]
        self._images: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        # Workers (fork or spawn) re-map the file themselves: only the path and layout travel.
        return {**self.__dict__, "_images": None}

    @property
    def images(self) -> np.memmap:
        if self._images is None:
            self._images = np.memmap(
                self.info.path, dtype=np.uint8, mode="r", offset=self.info.offset, shape=self.info.shape
            )
        return self._images

    def __getitem__(self, positions: int | list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        single = isinstance(positions, int)
        rows = self.rows[[positions] if single else positions]
        order = np.argsort(rows, kind="stable")  # ascending rows read the file front to back
        batch = np.empty((len(rows), *self.info.shape[1:]), dtype=np.uint8)
        batch[order] = self.images[rows[order]]
        images = torch.from_numpy(batch).permute(0, 3, 1, 2)
        labels = torch.from_numpy(self.info.labels[rows])
        rows_t = torch.from_numpy(rows)
        if single:
            return images[0], labels[0], rows_t[0]
        return images, labels, rows_t


class TrainBatches(Sampler[list[int]]):
    """This rank's per-rank batches of a DistributedSampler epoch, optionally from batch `start` on.

    Global batch b is positions perm[b·B:(b+1)·B] of the shared permutation, whatever the world
    size, so N ranks × B/N see exactly what one rank × B sees. Partial batches are dropped.
    """

    def __init__(self, n: int, rank: int, world_size: int, per_rank_batch: int, seed: int) -> None:
        self.sampler = DistributedSampler(
            range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.per_rank_batch = per_rank_batch
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.start = start

    def __len__(self) -> int:
        return len(self.sampler) // self.per_rank_batch - self.start

    def __iter__(self) -> Iterator[list[int]]:
        positions = list(self.sampler)
        for b in range(self.start, len(positions) // self.per_rank_batch):
            yield positions[b * self.per_rank_batch : (b + 1) * self.per_rank_batch]


class ShardBatches(Sampler[list[int]]):
    """Exact evaluation sharding: contiguous, unpadded shards; every sample once over all ranks."""

    def __init__(self, n: int, rank: int, world_size: int, batch_size: int) -> None:
        self.shard = np.array_split(np.arange(n), world_size)[rank].tolist()
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.shard) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, len(self.shard), self.batch_size):
            yield self.shard[start : start + self.batch_size]


def make_loader(
    dataset: GalaxyDataset, batches: Sampler[list[int]], num_workers: int, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    """A DataLoader over whole batches (one memmap read per batch, no per-item collate)."""
    return torch.utils.data.DataLoader(
        dataset,
        sampler=batches,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


class DeviceResident:
    """A whole split as one uint8 tensor on the device; a batch is a gather, with no loader
    processes and no host-to-device image copy per step (Galaxy10 train at 128² is ~0.6 GB).

    Yields what the DataLoader yields: (images N×C×H×W, labels, file rows); rows stay on the host
    because they key the augmentation draws.
    """

    def __init__(self, dataset: GalaxyDataset, batches: Sampler[list[int]], device: torch.device) -> None:
        images = torch.from_numpy(np.ascontiguousarray(dataset.images[dataset.rows]))
        self.images = images.to(device).permute(0, 3, 1, 2)
        self.labels = torch.from_numpy(dataset.info.labels[dataset.rows]).to(device)
        self.rows = torch.from_numpy(dataset.rows)
        self.batches = batches
        self.device = device

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        batches = [torch.as_tensor(positions) for positions in self.batches]
        if not batches:
            return
        # The epoch's positions go over in one copy: no host-to-device transfer inside the steps.
        on_device = host_to_device(torch.cat(batches), self.device).split([len(b) for b in batches])
        for index, index_on_device in zip(batches, on_device, strict=True):
            yield self.images[index_on_device], self.labels[index_on_device], self.rows[index]


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy that never makes the host wait for the GPU: from pageable memory the driver may
    synchronise with the stream, so the tensor is staged in (cached) pinned memory first."""
    if device.type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def keep_resident(setting: bool | Literal["auto"], device: torch.device, nbytes: int) -> bool:
    """`auto`: the uint8 splits live on the GPU when they take at most a quarter of its free
    memory (the rest is for activations, cuDNN workspaces and the allocator's cache)."""
    if setting != "auto":
        return setting
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= free // 4


def batch_source(
    dataset: GalaxyDataset,
    batches: Sampler[list[int]],
    device: torch.device,
    resident: bool,
    num_workers: int,
) -> DeviceResident | torch.utils.data.DataLoader:
    """Batches from device memory when `resident`, else from the memory map through a DataLoader."""
    if resident:
        return DeviceResident(dataset, batches, device)
    return make_loader(dataset, batches, num_workers, pin_memory=device.type == "cuda")


def prepared_path_hint(path: str | os.PathLike) -> str:
    """The command that makes a missing prepared file, for the one-line error."""
    return (
        f"python -m galaxydist.prepare Galaxy10_DECals.h5 {Path(path)} --crop 128 "
        f"(or --images DIR --labels labels.csv {Path(path)} --crop C for your own images)"
    )
