"""GPU speed: training images/s of the seed CNN, and wall time of the full two-stage recipe.

1. Grid: the seed CNN (channels 32..512) at 128², one device, synthetic tensors on the device,
   batch 64/256/1024 × eager/torch.compile × fp32/bf16 autocast × NCHW/channels_last. Each cell:
   a fresh model and Adam, the Trainer's loss (weighted CE over the batch), warm-up steps (compile,
   cudnn.benchmark autotuning), then timed steps between torch.cuda.synchronize() calls.
   Then a profile of the eager fast path per batch size: device busy time against wall time per
   step, the top kernels, and torch's profiler table (in <out>_profile.txt).
2. Recipe: `python -m galaxydist.synthetic` (17,736 images at 256², the real size; generated in the
   background while the grid runs), `python -m galaxydist.prepare --crop 128`, then
   `python -m galaxydist.train --config configs/galaxy10.yaml tracking.wandb=disabled`: wall time
   with prepare included and excluded, epochs run, test accuracy, and the Trainer's own img/s.

Needs only torch, numpy, h5py, pyyaml and rich (no submitit, no wandb, no psutil). Without CUDA it
exits with a message; `--dry-run` runs every code path tiny on the CPU instead (a check, not a result).

    python benchmarks/gpu.py                         # ~6-8 min on one H100/H200
    python benchmarks/gpu.py --out $OUT/gpu.json     # on the lent device: results come back from $OUT
    python benchmarks/gpu.py --skip-recipe           # the grid only
    python benchmarks/gpu.py --compile-layouts nchw channels_last --compile-dtypes fp32 bf16 --recipe-runs eager compiled
    .venv/bin/python benchmarks/gpu.py --dry-run     # CPU check of the code paths, ~1 min
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import torch
import torch.nn.functional as F

from galaxydist.models.cnn import GalaxyCNN

SEED_CHANNELS = [32, 64, 128, 256, 512]
REAL_N = 17_736


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_step(
    device: torch.device,
    batch: int,
    size: int,
    compiled: bool,
    bf16: bool,
    channels_last: bool,
    backend: str,
    host_sync: bool = False,
) -> Callable[[], None]:
    """One training step of a grid cell on a fixed batch; a fresh model, optimiser and compile
    cache each time.

    `host_sync` reads the loss on the host every step: the CPU then cannot queue the next step
    while the GPU works (what train_epoch avoids by reading its per-step flags one step late).
    """
    torch._dynamo.reset()
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = GalaxyCNN(SEED_CHANNELS, 10, 0.4).to(device, memory_format=fmt).train()
    forward = torch.compile(model, backend=backend) if compiled else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True if device.type == "cuda" else None)
    weights = torch.rand(10, device=device) + 0.5
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = forward(x)
        w = weights[y]
        loss = (w * F.cross_entropy(logits.float(), y, reduction="none")).sum() / w.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if host_sync:
            loss.item()

    return step


def timed(device: torch.device, step: Callable[[], None], steps: int) -> float:
    """Seconds for `steps` steps, from an idle device to an idle device."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - start


def throughput(
    device: torch.device, step: Callable[[], None], batch: int, warmup: int, steps: int
) -> dict[str, Any]:
    """Training images/s of one grid cell, after `warmup` steps (compilation, autotuning)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warm = timed(device, step, warmup)
    seconds = timed(device, step, steps)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"images_per_s": batch * steps / seconds, "warmup_s": warm, "steps": steps, "peak_gib": peak}


def profile(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Where a step of the Trainer's eager fast path (bf16 autocast, channels_last) goes, per
    batch size: wall time per step unprofiled, the time the device is busy per step (far below
    the wall time: the step waits on kernel launches, which torch.compile or CUDA graphs cut),
    and the operations (kernels, on a GPU) taking most of it. torch's own table of the largest
    batch goes to `profile_table` (and <out>_profile.txt)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_gpu else [])]
    kind = DeviceType.CUDA if on_gpu else DeviceType.CPU
    attribute = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    rows, table = [], ""
    for batch in args.batches:
        step = training_step(device, batch, args.size, False, True, True, args.backend)
        timed(device, step, args.warmup)
        wall_ms = timed(device, step, args.profile_steps) / args.profile_steps * 1e3
        with torch_profile(activities=activities) as prof:
            timed(device, step, args.profile_steps)
        events = prof.key_averages()
        busy = [e for e in events if e.device_type == kind]
        busy_ms = sum(getattr(e, attribute) for e in busy) / args.profile_steps / 1e3
        top = sorted(busy, key=lambda e: getattr(e, attribute), reverse=True)[: args.profile_rows]
        row = {
            "batch": batch,
            "wall_ms_per_step": wall_ms,
            "busy_ms_per_step": busy_ms,
            "busy_fraction": busy_ms / wall_ms,
            "top": [
                {
                    "name": e.key[:120],
                    "calls_per_step": e.count / args.profile_steps,
                    "ms_per_step": getattr(e, attribute) / args.profile_steps / 1e3,
                }
                for e in top
            ],
        }
        print(json.dumps({k: v for k, v in row.items() if k != "top"}), flush=True)
        rows.append(row)
        table = events.table(sort_by=attribute, row_limit=40)
        del step
        if on_gpu:
            torch.cuda.empty_cache()
    return {"steps": args.profile_steps, "rows": rows, "profile_table": table}


def compile_problem(device: torch.device, backend: str) -> str | None:
    """Why torch.compile cannot work here (e.g. no C compiler for Triton's launcher), found in
    seconds on a toy function instead of after each cell's full compilation; None if it works."""
    torch._dynamo.reset()
    try:
        torch.compile(lambda t: torch.sin(t) * 2, backend=backend)(torch.ones(8, device=device))
    except Exception as err:
        return f"{type(err).__name__}: {err}"[:300]
    return None


def dtype(bf16: bool) -> str:
    return "bf16" if bf16 else "fp32"


def grid(args: argparse.Namespace, device: torch.device, result: dict[str, Any]) -> None:
    """Every cell into result["grid"], the JSON rewritten after each: a kill at a time limit keeps
    the cells already measured."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the Trainer sets it on CUDA
    cells = result.setdefault("grid", [])
    plan = [
        (batch, compiled, bf16, layout, False)
        for batch, compiled, bf16, layout in itertools.product(
            args.batches, (False, True), (False, True), ("nchw", "channels_last")
        )
        if not compiled
        or (not args.no_compile and layout in args.compile_layouts and dtype(bf16) in args.compile_dtypes)
    ]
    plan += [(batch, False, True, "channels_last", True) for batch in args.batches]  # the Trainer's sync
    compile_failure = compile_problem(device, args.backend) if any(c[1] for c in plan) else None
    for batch, compiled, bf16, layout, host_sync in plan:
        cell = {"batch": batch, "compiled": compiled, "bf16": bf16, "layout": layout, "host_sync": host_sync}
        steps = max(args.min_steps, args.images // batch)
        if compiled and compile_failure:
            cell["error"] = f"skipped, torch.compile fails here: {compile_failure}"
        else:
            try:
                channels_last = layout == "channels_last"
                cell |= throughput(  # the step (model, Adam, batch) is freed with its frame
                    device,
                    training_step(
                        device, batch, args.size, compiled, bf16, channels_last, args.backend, host_sync
                    ),
                    batch,
                    args.warmup,
                    steps,
                )
            except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError is newer than torch 2.4
                cell["error"] = "out of memory"
            except Exception as err:  # a failed cell (e.g. a compiler error) must not lose the others
                cell["error"] = f"{type(err).__name__}: {err}"[:300]
                if compiled:  # the next compiled cells would spend their compile time to fail alike
                    compile_failure = cell["error"]
        print(json.dumps(cell), flush=True)
        cells.append(cell)
        save(result, args)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def data_path(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Per-batch cost of the device-resident data path (DeviceResident + Trainer.inputs):
    the gather as DeviceResident does it (images[idx]) and as index_select, then normalise,
    the host-side hashed draws copied to the device, augment, channels_last."""
    from galaxydist.data.augment import augment, normalise, uniforms
    from galaxydist.data.dataset import host_to_device

    n = 64 if args.dry_run else 12_400  # Galaxy10's train split
    nhwc = torch.randint(0, 256, (n, args.size, args.size, 3), dtype=torch.uint8, device=device)
    images = nhwc.permute(0, 3, 1, 2)  # what DeviceResident holds
    mean = torch.full((3,), 0.2, device=device)
    std = torch.full((3,), 0.1, device=device)
    rows = []
    for batch in args.batches:
        index = torch.randint(0, n, (batch,), device=device)
        host_rows = index.cpu().numpy()

        def inputs(index: torch.Tensor = index, host_rows: Any = host_rows) -> torch.Tensor:
            x = normalise(images.index_select(0, index), mean, std, torch.float32)
            draws = host_to_device(torch.from_numpy(uniforms(0, 0, host_rows, 3).astype("float32")), device)
            x = augment(x, draws, 0.5, 0.5, 180.0)
            return x.contiguous(memory_format=torch.channels_last)

        parts = {
            "gather images[idx]": lambda index=index: images[index],
            "gather index_select": lambda index=index: images.index_select(0, index),
            "inputs (select, normalise, draws, augment)": inputs,
        }
        for name, fn in parts.items():
            reps = 3 if args.dry_run else 50
            fn()
            sync(device)
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            sync(device)
            ms = (time.perf_counter() - start) / reps * 1e3
            row = {"batch": batch, "part": name, "ms_per_batch": ms, "images_per_s": batch / ms * 1e3}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def child_env() -> dict[str, str]:
    """The package importable from the checkout, installed or not."""
    path = os.pathsep.join(filter(None, [str(common.ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def run_cli(argv: list[str], log: Path) -> tuple[float, list[tuple[float, str]]]:
    """Run `python -m ...` from the repository root, output kept in `log`: seconds of wall time,
    and each output line with the seconds since the start at which it arrived."""
    start = time.perf_counter()
    lines = []
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, *argv],
            cwd=common.ROOT,
            env={**child_env(), "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
            out.write(line)
        returncode = proc.wait()
    seconds = time.perf_counter() - start
    if returncode:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"gpu.py: `python {' '.join(argv)}` failed (exit {returncode}):\n{tail}")
    return seconds, lines


def time_outside_epochs(records: list[dict[str, Any]], lines: list[tuple[float, str]], total: float) -> dict:
    """Where a run's time outside its training epochs goes, from when its epoch lines appeared:
    start-up (to the first epoch line, less that epoch's training), each epoch's validation,
    checkpoints and metrics (the gap between two epoch lines, less the later epoch's training),
    and the end (the final evaluation and report, after the last epoch line)."""
    at = [t for t, line in lines if line.startswith("[") and " img/s" in line]
    if not records or len(at) != len(records):
        return {}
    gaps = [b - a - r["seconds"] for a, b, r in zip(at, at[1:], records[1:], strict=False)]
    return {
        "first_epoch_s": records[0]["seconds"],
        "other_epochs_median_s": statistics.median(r["seconds"] for r in records[1:]) if gaps else None,
        "startup_and_first_validation_s": at[0] - records[0]["seconds"],
        "between_epochs_median_s": statistics.median(gaps) if gaps else None,
        "between_epochs_sum_s": sum(gaps),
        "after_last_epoch_s": total - at[-1],
    }


def recipe_run(
    args: argparse.Namespace, prepared: Path, workdir: Path, logs: Path, compiled: bool
) -> dict[str, Any]:
    """The two-stage recipe as a user runs it; what the run folder says about it."""
    out = workdir / ("run_compiled" if compiled else "run")
    overrides = [
        f"data.path={prepared}",
        f"output_dir={out}",
        "tracking.wandb=disabled",
        f"speed.compile={str(compiled).lower()}",
        *args.recipe_override,
    ]
    argv = ["-m", "galaxydist.train", "--config", str(common.ROOT / "configs" / "galaxy10.yaml"), *overrides]
    seconds, lines = run_cli(argv, logs / f"train{'_compiled' if compiled else ''}.log")
    label = " ".join([f"speed.compile={str(compiled).lower()}", *args.recipe_override])
    result: dict[str, Any] = {
        "command": "python " + " ".join(argv),
        "label": label,
        "train_s": seconds,
        "compiled": compiled,
    }
    metrics = sorted(out.rglob("metrics.jsonl"))
    if metrics:
        records = [json.loads(line) for line in metrics[0].read_text().splitlines() if line.strip()]
        rates = sorted(r["images_per_second"] for r in records if "images_per_second" in r)
        result["epochs"] = len(records)
        result["train_epoch_images_per_s_median"] = rates[len(rates) // 2] if rates else None
        result["train_epoch_seconds_sum"] = sum(r.get("seconds", 0.0) for r in records)
        result["outside_epochs"] = time_outside_epochs(records, lines, seconds)
    summaries = sorted(out.rglob("summary.json"))
    if summaries:
        summary = json.loads(summaries[0].read_text())
        result["test_accuracy"] = summary.get("test_accuracy")
    return result


def recipe(
    args: argparse.Namespace, workdir: Path, logs: Path, generator: subprocess.Popen | None, raw: Path
) -> dict[str, Any]:
    gen_s = None
    if generator is not None:
        if generator.wait():
            raise SystemExit(
                f"gpu.py: synthetic generation failed:\n{(logs / 'synthetic.log').read_text()[-3000:]}"
            )
        generator.watcher.join()  # type: ignore[attr-defined]
        gen_s = generator.finished - generator.started  # type: ignore[attr-defined]
    warm_font_cache()
    prepared = workdir / "prepared.h5"
    argv = ["-m", "galaxydist.prepare", str(raw), str(prepared), "--crop", str(args.crop), "--force"]
    prepare_s, _ = run_cli(argv, logs / "prepare.log")
    runs = [
        recipe_run(args, prepared, workdir, logs, compiled=mode == "compiled") for mode in args.recipe_runs
    ]
    for run in runs:
        run["with_prepare_s"] = prepare_s + run["train_s"]
    return {
        "images": args.n,
        "raw_size": args.raw_size,
        "crop": args.crop,
        "generate_s": gen_s,
        "generate_overlapped_with_grid": generator is not None and not args.skip_grid,
        "prepare_command": "python " + " ".join(argv),
        "prepare_s": prepare_s,
        "runs": runs,
    }


def warm_font_cache() -> None:
    """matplotlib builds its font cache on its first import on a machine (seconds): not recipe time."""
    with contextlib.suppress(ImportError):
        import matplotlib.font_manager  # noqa: F401


def start_generator(args: argparse.Namespace, raw: Path, logs: Path) -> subprocess.Popen:
    """The synthetic Galaxy10 file, made in the background (CPU) while the grid uses the GPU."""
    argv = [
        "-m",
        "galaxydist.synthetic",
        str(raw),
        "--n",
        str(args.n),
        "--size",
        str(args.raw_size),
        "--force",
    ]
    log = (logs / "synthetic.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, *argv], cwd=common.ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT
    )
    proc.started = time.perf_counter()  # type: ignore[attr-defined]

    def watch() -> None:  # the generation's own wall time, however long the grid takes
        proc.wait()
        proc.finished = time.perf_counter()  # type: ignore[attr-defined]
        log.close()

    proc.watcher = threading.Thread(target=watch, daemon=True)  # type: ignore[attr-defined]
    proc.watcher.start()  # type: ignore[attr-defined]
    return proc


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny CPU run of every code path (a check)")
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 256, 1024])
    parser.add_argument("--size", type=int, default=128, help="image side for the grid")
    parser.add_argument("--images", type=int, default=16_384, help="images per timed cell (sets the steps)")
    parser.add_argument("--min-steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps per cell (compile, autotune)")
    parser.add_argument("--no-compile", action="store_true", help="eager cells only")
    parser.add_argument(
        "--compile-layouts", nargs="+", default=["channels_last"], choices=["nchw", "channels_last"],
        help="layouts to compile (each compiled cell costs ~30-60 s of compilation)",
    )  # fmt: skip
    parser.add_argument(
        "--compile-dtypes", nargs="+", default=["bf16"], choices=["fp32", "bf16"],
        help="dtypes to compile (default: bf16, the fast path; fp32 doubles the compile time)",
    )  # fmt: skip
    parser.add_argument(
        "--backend", default=None, help="torch.compile backend (default: inductor; eager with --dry-run)"
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the per-step profile after the grid")
    parser.add_argument("--profile-steps", type=int, default=20, help="steps profiled per batch size")
    parser.add_argument("--profile-rows", type=int, default=15, help="top operations kept per batch size")
    parser.add_argument("--skip-grid", action="store_true")
    parser.add_argument("--skip-recipe", action="store_true")
    parser.add_argument("--n", type=int, default=REAL_N, help="synthetic images for the recipe")
    parser.add_argument("--raw-size", type=int, default=256, help="synthetic image side (real: 256)")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--raw", type=Path, help="reuse this Galaxy10-format file instead of generating one")
    parser.add_argument(
        "--recipe-runs",
        nargs="+",
        default=["eager"],
        choices=["eager", "compiled"],
        help="the recipe's runs, in order (compiled: speed.compile=true)",
    )
    parser.add_argument(
        "--recipe-override", action="append", default=[], metavar="KEY=VALUE", help="extra train override"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default: benchmarks/results/gpu.json)")
    args = parser.parse_args()
    if not args.dry_run:
        args.backend = args.backend or "inductor"
    if args.dry_run:  # every code path, at toy sizes, on the CPU
        args.batches, args.size, args.images, args.min_steps, args.warmup = [4], 32, 8, 2, 1
        args.profile_steps = 2
        args.compile_layouts = ["nchw", "channels_last"]
        args.compile_dtypes = ["fp32", "bf16"]
        args.backend = args.backend or "eager"  # dynamo tracing without a C++ build: seconds, not minutes
        args.n, args.raw_size, args.crop = 300, 64, 48
        args.recipe_override = [
            "stages.0.max_epochs=1",
            "stages.1.max_epochs=1",
            "data.batch_size=32",
            "data.num_workers=0",
            *args.recipe_override,
        ]
    return args


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available() and not args.dry_run:
        raise SystemExit(
            f"gpu.py: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False). "
            "This benchmark needs a GPU: run it in a session with a device, or pass --dry-run to check "
            "its code paths on the CPU."
        )
    device = torch.device("cpu" if args.dry_run else "cuda")
    info = common.machine()
    result: dict[str, Any] = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="gd_gpu_", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        # The commands' logs: beside --out when given (they come back from a lent device even
        # after a kill at its time limit), else with the scratch files.
        logs = args.out.parent / f"{args.out.stem}_logs" if args.out and not args.skip_recipe else workdir
        logs.mkdir(parents=True, exist_ok=True)
        raw = args.raw or workdir / "synthetic.h5"
        generator = None if (args.skip_recipe or args.raw) else start_generator(args, raw, logs)
        try:
            if not args.skip_grid:
                grid(args, device, result)
                result["data_path"] = data_path(args, device)
                save(result, args)
                if not args.no_profile:
                    try:
                        result["profile"] = profile(args, device)
                    except Exception as err:  # a profiler problem must not cost the recipe
                        result["profile_error"] = f"{type(err).__name__}: {err}"[:300]
                        print(f"profile failed: {result['profile_error']}", file=sys.stderr)
                    path = save(result, args)
                    if "profile" in result:
                        table = result["profile"]["profile_table"]
                        path.with_name(f"{path.stem}_profile.txt").write_text(table)
            if not args.skip_recipe:
                try:
                    result["recipe"] = recipe(args, workdir, logs, generator, raw)
                except (Exception, SystemExit) as err:
                    result["recipe_error"] = str(err)[-3000:]
                    print(f"recipe failed: {result['recipe_error']}", file=sys.stderr)
        finally:
            if generator is not None and generator.poll() is None:
                generator.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    result["machine"] = common.finish_machine(info)
    report(result, args)
    print(f"wrote {save(result, args)}")
    if "recipe_error" in result:
        raise SystemExit(1)


def save(result: dict[str, Any], args: argparse.Namespace) -> Path:
    return common.write_result("gpu_dry_run" if args.dry_run else "gpu", result, args.out)


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\nmachine: {common.describe(result['machine'])}")
    cells = result.get("grid", [])
    if cells:
        rows = [
            [
                c["batch"],
                "compiled" if c["compiled"] else "eager",
                "bf16" if c["bf16"] else ("fp32 (TF32 convs)" if "gpu" in result["machine"] else "fp32"),
                c["layout"] + (" + loss.item() per step" if c["host_sync"] else ""),
                c.get("images_per_s", c.get("error", "")),
                c.get("warmup_s", ""),
                c.get("peak_gib") or "",
            ]
            for c in cells
        ]
        headers = ["batch", "mode", "dtype", "layout", "img/s", "warm-up s", "peak GiB"]
        print(f"\nseed CNN at {args.size}², training images/s\n" + common.markdown_table(headers, rows))
        best = max((c for c in cells if "images_per_s" in c), key=lambda c: c["images_per_s"], default=None)
        if best and not args.dry_run:
            met = "met" if best["images_per_s"] >= 50_000 else "NOT met"
            print(f"best: {best['images_per_s']:,.0f} img/s ({met}: target ≥ 50,000 on an H100/H200)")
    prof = result.get("profile")
    if prof:
        rows = [
            [
                r["batch"],
                f"{r['wall_ms_per_step']:.3f}",
                f"{r['busy_ms_per_step']:.3f}",
                f"{r['busy_fraction']:.0%}",
                r["batch"] / r["wall_ms_per_step"] * 1e3,
                "; ".join(f"{t['name'][:40]} {t['ms_per_step']:.3f}" for t in r["top"][:3]),
            ]
            for r in prof["rows"]
        ]
        headers = ["batch", "wall ms/step", "busy ms/step", "busy", "img/s", "top 3 (ms/step)"]
        print(
            "\neager bf16 channels_last, profiled: device busy time per step against wall time\n"
            + common.markdown_table(headers, rows)
        )
    parts = result.get("data_path", [])
    if parts:
        rows = [[p["batch"], p["part"], f"{p['ms_per_batch']:.3f}", p["images_per_s"]] for p in parts]
        print(
            "\nresident data path per batch\n" + common.markdown_table(["batch", "part", "ms", "img/s"], rows)
        )
    rec = result.get("recipe")
    if rec:
        gen = f"{rec['generate_s']:.0f} s" if rec["generate_s"] is not None else "reused"
        print(
            f"\nrecipe on {rec['images']} synthetic images: generate {gen}, prepare {rec['prepare_s']:.1f} s"
        )
        rows = [
            [
                r["label"],
                r.get("epochs", ""),
                r["train_s"],
                r.get("train_epoch_seconds_sum", ""),
                r["with_prepare_s"],
                r.get("train_epoch_images_per_s_median") or "",
                r.get("test_accuracy") or "",
            ]
            for r in rec["runs"]
        ]
        headers = [
            "train",
            "epochs",
            "wall s (prepare excluded)",
            "in train epochs s",
            "wall s (included)",
            "epoch img/s",
            "test acc",
        ]
        print(common.markdown_table(headers, rows))
        for r in rec["runs"]:
            outside = r.get("outside_epochs")
            if outside and outside["between_epochs_median_s"] is not None:
                print(
                    f"{r['label']}: first epoch {outside['first_epoch_s']:.2f} s (others "
                    f"{outside['other_epochs_median_s']:.2f} s); outside the epochs: start-up "
                    f"{outside['startup_and_first_validation_s']:.1f} s, between epochs "
                    f"{outside['between_epochs_median_s']:.3f} s each ({outside['between_epochs_sum_s']:.1f} s), "
                    f"after the last {outside['after_last_epoch_s']:.1f} s"
                )
        if not args.dry_run:
            met = "met" if rec["runs"][0]["with_prepare_s"] < 60 else "NOT met"
            print(f"full recipe {rec['runs'][0]['with_prepare_s']:.1f} s with prepare ({met}: target < 60 s)")
    if args.dry_run:
        print("\ndry run: toy sizes on the CPU, a check of the code paths, not a result")


if __name__ == "__main__":
    main()
