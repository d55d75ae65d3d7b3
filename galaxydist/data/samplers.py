"""Rank-aware batch samplers: the shared training order, and exact evaluation shards."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import DistributedSampler, Sampler


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

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sampler) // self.per_rank_batch

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start

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
