"""One split of a prepared file as batches: memory-mapped from disk through a DataLoader, or
resident in device memory. Whole batches per read: one memmap gather, no per-item collate."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..errors import UserError
from .format import SPLITS, PreparedInfo


def open_images(info: PreparedInfo) -> np.memmap:
    """Every image of a prepared file, N×H×W×C uint8, memory-mapped read-only."""
    return np.memmap(info.path, dtype=np.uint8, mode="r", offset=info.offset, shape=info.shape)


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
            self._images = open_images(self.info)
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


class SplitImages:
    """One split of a prepared file as a lazily read N×C×H×W uint8 array (memory-mapped slices)."""

    def __init__(self, info: PreparedInfo, split: str) -> None:
        self.dataset = GalaxyDataset(info, split)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, part: slice) -> np.ndarray:
        images, _, _ = self.dataset[list(range(len(self)))[part]]
        return images.numpy()


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
