"""Catalogue inference at scale on the CPU: `galaxydist.infer` with 2 ranks over a catalogue of
JPEG files, its img/s and each rank's peak RSS, and the same at 5× the catalogue's length (memory
per rank must not grow with it).

    .venv/bin/python benchmarks/catalogue.py [--rows 20000] [--scale 5] [--files 2000] [--size 64]
        [--ranks 2] [--workers 1] [--batch 256]

The catalogue lists `--files` distinct JPEGs (synthetic Galaxy10-format images) over and over under
distinct ids, so that a long catalogue costs no disk; the decoding is the same per row. RSS is
sampled every 0.1 s with psutil (ranks and their loader workers apart); the model is the
untrained seed CNN of benchmarks/infer.py (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import h5py
import psutil
from infer import checkpoint_for
from PIL import Image

from galaxydist.synthetic import generate


def write_files(folder: Path, files: int, size: int) -> list[str]:
    """`files` JPEGs of synthetic galaxies; their paths relative to `folder`."""
    raw = folder / "raw.h5"
    generate(raw, files, seed=0, size=size)
    (folder / "img").mkdir()
    with h5py.File(raw) as f:
        images = f["images"][:]
    names = []
    for i, image in enumerate(images):
        names.append(f"img/g{i:05d}.jpg")
        Image.fromarray(image).save(folder / names[-1], quality=90)
    raw.unlink()
    return names


def write_catalogue(path: Path, names: list[str], rows: int) -> None:
    with path.open("w") as f:
        f.write("id,file\n")
        for i in range(rows):
            f.write(f"{i},{names[i % len(names)]}\n")


def private_mib(roles: dict[int, str]) -> float:
    """The largest rank's USS now (reading smaps is slow: once a second)."""
    largest = 0.0
    for pid, role in roles.items():
        if role != "rank":
            continue
        try:
            largest = max(largest, psutil.Process(pid).memory_full_info().uss / 2**20)
        except psutil.NoSuchProcess:
            continue
    return largest


def run_sampled(cmd: list[str], env: dict[str, str]) -> tuple[float, dict[str, float], list[list[float]]]:
    """Wall seconds, the peak RSS in MiB of the largest rank and of the largest loader worker, and
    a trace about once a second: [seconds, the largest rank's RSS, its private memory (USS: RSS
    less the pages it shares, such as torch's libraries)], in MiB (does it level off?)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    launcher = psutil.Process(proc.pid)
    peaks: dict[int, float] = {}
    roles: dict[int, str] = {}
    trace: list[list[float]] = []
    while proc.poll() is None:
        ranks_now = [0.0]
        try:
            for child in launcher.children(recursive=True):
                try:
                    rss = child.memory_info().rss / 2**20
                    roles.setdefault(child.pid, "rank" if child.ppid() == proc.pid else "worker")
                except psutil.NoSuchProcess:
                    continue
                peaks[child.pid] = max(peaks.get(child.pid, 0.0), rss)
                if roles[child.pid] == "rank":
                    ranks_now.append(rss)
        except psutil.NoSuchProcess:
            break
        now = time.perf_counter() - start
        if not trace or now - trace[-1][0] >= 1.0:
            trace.append([round(now, 1), round(max(ranks_now), 1), round(private_mib(roles), 1)])
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"infer failed ({proc.returncode}): {proc.stderr.read()[-2000:]}")
    by_role = {
        role: max((peaks[p] for p in peaks if roles[p] == role), default=0.0) for role in ("rank", "worker")
    }
    return seconds, by_role, trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--scale", type=int, default=5)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    info = common.machine()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        names = write_files(workdir, args.files, args.size)
        ckpt = checkpoint_for(common.synthetic_prepared(workdir, 200, args.size, args.size), workdir)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(common.ROOT)}
        results = []
        for rows in (args.rows, args.rows * args.scale):
            catalogue = workdir / f"cat_{rows}.csv"
            write_catalogue(catalogue, names, rows)
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
                "-m", "galaxydist.infer", str(ckpt), str(catalogue), "--out", str(workdir / f"out_{rows}"),
                "--batch-size", str(args.batch), "--workers", str(args.workers),
            ]  # fmt: skip
            seconds, peak, trace = run_sampled(cmd, env)
            results.append(
                {
                    "rows": rows,
                    "seconds": seconds,
                    "img_per_s": rows / seconds,
                    "peak_rss_mib": peak,
                    "trace": trace,
                }
            )
            print(
                f"{rows} rows: {rows / seconds:.0f} img/s ({seconds:.1f} s), peak RSS per rank "
                f"{peak['rank']:.0f} MiB, per loader worker {peak['worker']:.0f} MiB",
                flush=True,
            )
    path = common.write_result(
        "catalogue", {"machine": common.finish_machine(info), "args": vars(args), "results": results}
    )
    growth = results[1]["peak_rss_mib"]["rank"] / results[0]["peak_rss_mib"]["rank"]
    print(f"rank RSS at {args.scale}× the rows: ×{growth:.3f} → {path}")


if __name__ == "__main__":
    main()
