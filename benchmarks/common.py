"""Shared helpers for the benchmark scripts: machine description, test files, tables, JSON results.

Benchmarks run on shared, noisy machines, so every result carries the load average before and
after, and timings are repeated in interleaved rounds and summarised by their median.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """What the numbers were measured on; the load average says how shared the machine was."""
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
    }
    try:
        meminfo = Path("/proc/meminfo").read_text().split("\n", 1)[0]
        info["mem_total_gib"] = round(int(meminfo.split()[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def finish_machine(info: dict[str, Any]) -> dict[str, Any]:
    info["loadavg_end"] = os.getloadavg()
    return info


def describe(info: dict[str, Any]) -> str:
    load = "/".join(f"{v:.2f}" for v in info["loadavg_start"])
    end = "/".join(f"{v:.2f}" for v in info.get("loadavg_end", info["loadavg_start"]))
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    return (
        f"{info['cpu']}, {info['usable_cpus']} usable CPUs, torch {info['torch']} "
        f"({info['torch_threads']} threads){gpu}; load average (1/5/15 min) {load} at start, {end} at end"
    )


def write_result(name: str, data: dict[str, Any], out: Path | None = None) -> Path:
    """benchmarks/results/<name>.json (or `out`)."""
    from galaxydist.atomic import atomic_path  # imported here: ROOT joins sys.path above

    path = out or RESULTS / f"{name}.json"
    with atomic_path(path) as tmp:  # a kill mid-write (a time limit) leaves the previous file whole
        tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (printable as is, pastable into BENCHMARKS.md)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


@contextmanager
def timed() -> Iterator[list[float]]:
    """`with timed() as t: ...` leaves the elapsed seconds in t[0]."""
    box: list[float] = []
    start = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - start)


def synthetic_prepared(workdir: Path, n: int, size: int, crop: int, seed: int = 0) -> Path:
    """A prepared file from the real generator and the real prepare step; the raw file is removed."""
    from galaxydist.data.galaxy10 import prepare
    from galaxydist.synthetic import generate

    raw, prepared = workdir / f"raw_{n}_{size}.h5", workdir / f"prepared_{n}_{size}_{crop}.h5"
    generate(raw, n, seed=seed, size=size)
    prepare(str(raw), str(prepared), crop, seed=seed, force=True)
    raw.unlink()
    return prepared


def tiled_prepared(workdir: Path, n: int, size: int, seed: int = 0, tile: int = 256) -> Path:
    """A large prepared file made quickly: `tile` synthetic images repeated (with a per-copy pixel
    shift so pages differ) in an uncompressed Galaxy10-format source, then the real prepare step.

    Rendering 22,000 images would take minutes; memory measurements only need the bytes.
    """
    import h5py

    from galaxydist.data.galaxy10 import IMAGES_KEY, LABELS_KEY, prepare
    from galaxydist.synthetic import draw_labels, render

    rng = np.random.default_rng(seed)
    labels = draw_labels(n, rng)
    raw, prepared = workdir / f"raw_tiled_{n}_{size}.h5", workdir / f"prepared_tiled_{n}_{size}.h5"
    with h5py.File(raw, "w") as f:
        images = f.create_dataset(IMAGES_KEY, (n, size, size, 3), np.uint8)
        f.create_dataset(LABELS_KEY, data=labels)
        base = render(labels[:tile], rng, size)
        for start in range(0, n, tile):
            count = min(tile, n - start)
            images[start : start + count] = base[:count] + np.uint8(start // tile % 251)
    prepare(str(raw), str(prepared), size, seed=seed, force=True)
    raw.unlink()
    return prepared


def make_trainer(cfg: Any, ctx: Any) -> Any:
    """The real Trainer, whichever of its (recent) constructor signatures this checkout has."""
    import inspect

    try:
        from galaxydist.engine.builders import build_trainer, check_data

        return build_trainer(cfg, ctx, check_data(cfg, ctx))
    except ImportError:  # a checkout from before the engine package
        from galaxydist.data import read_prepared
        from galaxydist.train import Trainer

    if "info" in inspect.signature(Trainer).parameters:
        return Trainer(cfg, ctx, read_prepared(cfg.data.path))
    return Trainer(cfg, ctx)
