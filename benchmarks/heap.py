"""The host heap over a catalogue-long inference: img/s and the resident set of one
`galaxydist.infer` process as the catalogue goes by, for each largest heap-served buffer.

    .venv/bin/python benchmarks/heap.py [--rows 20000] [--files 500] [--rounds 2]
        [--settings 1g,128m,glibc]

Each setting runs in a fresh process (glibc reads its malloc variables at start-up), in
alternating rounds: `1g` and `128m` serve buffers up to that size from a heap that is never
trimmed (`keep_freed_memory(largest)`; infer uses 128 MiB), `glibc` is glibc's own behaviour
(every large buffer mapped and unmapped each time). The resident set is read after every batch;
`heap` (mallinfo2) splits the heap into bytes in use and bytes free: a free part that grows while
the used part stays put is fragmentation, not a leak.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

SETTINGS = {
    "1g": {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str((1 << 31) - 1)},
    "128m": {"MALLOC_MMAP_THRESHOLD_": str(128 << 20), "MALLOC_TRIM_THRESHOLD_": str((1 << 31) - 1)},
    "glibc": {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"},  # glibc's default; tells infer to leave it
}


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")
    ]  # fmt: skip


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def one_run(rows: int, files: int) -> dict:
    """In this process: infer over a `rows`-row catalogue, the RSS after each batch."""
    from catalogue import write_catalogue, write_files
    from infer import checkpoint_for

    import galaxydist.inference.batch as batch
    from galaxydist.infer import main as infer_main

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    trace: list[float] = []
    classify = batch.classify

    def traced(*args, **kwargs):
        result = classify(*args, **kwargs)
        trace.append(round(rss_mib(), 1))
        return result

    batch.classify = traced
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        names = write_files(work, files, 64)
        ckpt = checkpoint_for(common.synthetic_prepared(work, 200, 64, 64), work)
        table = work / "cat.csv"
        write_catalogue(table, names, rows)
        start = time.perf_counter()
        infer_main([str(ckpt), str(table), "--out", str(work / "out"), "--workers", "1"])
        seconds = time.perf_counter() - start
    heap = libc.mallinfo2()
    tenth = max(1, len(trace) // 10)
    return {
        "img_per_s": rows / seconds,
        "peak_rss_mib": max(trace),
        "rss_by_tenth_mib": [max(trace[i : i + tenth]) for i in range(0, len(trace), tenth)],
        "heap_used_mib": heap.uordblks / 2**20,
        "heap_free_mib": heap.fordblks / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settings", default="1g,128m,glibc")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child run: print its result as JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.rows, args.files)))
        return
    info = common.machine()
    results: dict[str, list[dict]] = {name: [] for name in args.settings.split(",")}
    for _ in range(args.rounds):
        for name in results:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(common.ROOT), **SETTINGS[name]}
            cmd = [
                sys.executable,
                __file__,
                "--one",
                name,
                "--rows",
                str(args.rows),
                "--files",
                str(args.files),
            ]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results[name].append(result)
            print(
                f"{name}: {result['img_per_s']:.0f} img/s, peak RSS {result['peak_rss_mib']:.0f} MiB "
                f"(by tenths: {', '.join(f'{v:.0f}' for v in result['rss_by_tenth_mib'])}), heap used "
                f"{result['heap_used_mib']:.0f} MiB, free {result['heap_free_mib']:.0f} MiB",
                flush=True,
            )
    path = common.write_result(
        "heap", {"machine": common.finish_machine(info), "args": vars(args), "results": results}
    )
    print(f"→ {path}")


if __name__ == "__main__":
    main()
