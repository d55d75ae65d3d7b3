"""Worker processes for the data-making commands (synthetic, prepare): results in order, memory bounded."""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.pool import AsyncResult
from typing import TypeVar

T = TypeVar("T")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def usable_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one, e.g. under SLURM)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers() -> int:
    return min(8, usable_cpus())


def _start_worker(parent: int) -> None:
    """One thread per worker (the pool is the parallelism), and on Linux the kernel kills the
    worker when its parent dies, however it dies (`kill -9` included)."""
    os.environ["OMP_NUM_THREADS"] = "1"  # read when torch is imported (only to resize)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)


def in_order(fn: Callable[..., T], jobs: Iterable[tuple], workers: int) -> Iterator[T]:
    """fn(*job) for each job, yielded in job order; with workers > 1 computed in spawned processes,
    at most two jobs per worker in flight (results wait for the consumer, not in a growing queue).

    Spawned, not forked: a forked child of a process that has used OpenMP (torch) can hang. An
    error in a job is raised here; an error, interrupt or early stop of the consumer terminates
    the workers at once.
    """
    if workers == 1:
        yield from (fn(*job) for job in jobs)
        return
    pool = mp.get_context("spawn").Pool(workers, initializer=_start_worker, initargs=(os.getpid(),))
    try:
        pending: deque[AsyncResult[T]] = deque()
        for job in jobs:
            pending.append(pool.apply_async(fn, job))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
