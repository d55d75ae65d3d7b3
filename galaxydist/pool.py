"""Worker processes for the data-making commands (synthetic, prepare): results in order, memory bounded."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def usable_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one, e.g. under SLURM)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers() -> int:
    return min(8, usable_cpus())


def in_order(fn: Callable[..., T], jobs: Iterable[tuple], workers: int) -> Iterator[T]:
    """fn(*job) for each job, yielded in job order; with workers > 1 computed in spawned processes,
    at most two jobs per worker in flight (results wait for the consumer, not in a growing queue).

    Spawned, not forked: a forked child of a process that has used OpenMP (torch) can hang.
    """
    if workers == 1:
        yield from (fn(*job) for job in jobs)
        return
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
    try:
        pending: deque[Future[T]] = deque()
        for job in jobs:
            pending.append(pool.submit(fn, *job))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)
