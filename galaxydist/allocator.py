"""The host memory allocator: keep freed memory for reuse instead of handing it back to the OS.

A training step frees and allocates the same large activation buffers again and again. glibc's
malloc serves such sizes from fresh mmaps or trims them off the heap when freed, so every step
page-faults its memory back in (BENCHMARKS.md measures the faults and the time they cost).
PyTorch's CPU tuning guide preloads jemalloc or tcmalloc for the same reason; glibc's own
switches give most of it without a preload.
"""

from __future__ import annotations

import ctypes
import os

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def keep_freed_memory(largest: int = 1 << 30) -> bool:
    """Serve allocations up to `largest` bytes (1 GiB) from the heap and never trim it; True if
    glibc took it.

    Glibc before 2.35 caps the mmap threshold at 32 MiB, which then serves (most of the gain).
    A no-op off glibc (macOS, musl) and where the user already chose (malloc variables or
    tunables, a preloaded allocator). The cost is a resident set that stays at its peak, like a
    caching allocator's.
    """
    preloaded = os.environ.get("LD_PRELOAD", "")
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (
        any(name in os.environ for name in _USER_SETTINGS)
        or any(name in preloaded for name in _ALLOCATORS)
        or "glibc.malloc." in tunables
    ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mmap_set = mallopt(_M_MMAP_THRESHOLD, largest) or mallopt(_M_MMAP_THRESHOLD, min(largest, 32 << 20))
    return bool(mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)) and bool(mmap_set)


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Between units of long work (a catalogue part): `keep_freed_memory` never trims, and over a
    catalogue the heap fragments, holes staying resident; trimming once per unit keeps the
    resident set flat at the cost of faulting one unit's buffers in again (BENCHMARKS.md §9).
    """
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)
