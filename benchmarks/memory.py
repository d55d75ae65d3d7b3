"""Memory per rank: do the images cost each rank private memory, or are they shared pages?

For each data-set size (a prepared file of ~0.5 and ~1.1 GB at 128² by default) and world size 1
and 2 (real gloo process groups, spawned processes), every rank builds the baseline model (DDP,
GlobalBatchNorm2d, Adam, one training step), then, one mode after another:
  memmap      reads the WHOLE train split through GalaxyDataset + make_loader (every page touched)
  memmap+w2   the same through make_loader with 2 loader workers (rank + its workers counted)
  ram         loads the split into its own RAM (np.array copy), the usual alternative
and reports, before and after, from psutil `memory_full_info` and /proc/PID/smaps_rollup:
  USS   private pages (Private_Clean + Private_Dirty), PSS proportional share,
  Anon  anonymous memory (heap, copies): what the kernel cannot drop or share.
A file page mapped by ONE process counts as private (Private_Clean) in USS although it is page
cache, shared with whoever maps it next; so with world 1 memmap's USS grows with the split while
Anon stays flat, and with world 2 the same pages become shared (USS flat, PSS split in two).

    .venv/bin/python benchmarks/memory.py                        # ~2 min, writes ~2.2 GB in /tmp
    .venv/bin/python benchmarks/memory.py --sizes 22000 44000     # 1.1 and 2.2 GB files
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any

import common
import numpy as np
import psutil
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from galaxydist import distributed
from galaxydist.data.dataset import GalaxyDataset, make_loader
from galaxydist.data.format import read_prepared
from galaxydist.data.samplers import ShardBatches
from galaxydist.models.cnn import GalaxyCNN

CHANNELS = [32, 64, 128, 256, 512]  # the baseline recipe's model
MODES = ("memmap", "memmap+w2", "ram")
MB = 2**20


def _smaps(pid: int) -> dict[str, int]:
    """Bytes per field of /proc/PID/smaps_rollup (Anonymous, Pss_File, Shared_Clean, ...)."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0]) * 1024
    return out


def snapshot(include_children: bool = False) -> dict[str, float]:
    """USS, PSS, RSS and anonymous memory in MiB of this process (and its loader workers)."""
    procs = [psutil.Process()]
    if include_children:
        procs += procs[0].children(recursive=True)
    total = {"uss": 0.0, "pss": 0.0, "rss": 0.0, "anon": 0.0, "pss_file": 0.0, "shared_clean": 0.0}
    for p in procs:
        full, smaps = p.memory_full_info(), _smaps(p.pid)
        total["uss"] += full.uss / MB
        total["pss"] += full.pss / MB
        total["rss"] += full.rss / MB
        total["anon"] += smaps.get("Anonymous", 0) / MB
        total["pss_file"] += smaps.get("Pss_File", 0) / MB
        total["shared_clean"] += smaps.get("Shared_Clean", 0) / MB
    total["processes"] = len(procs)
    return total


def rank_main(rank: int, world: int, port: int, path: str, modes: list[str], out: str) -> None:
    """One rank: the model, then each mode measured against a fresh baseline."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)  # two ranks share two cores
    warnings.filterwarnings("ignore", message=".*broadcast_buffers", category=FutureWarning)  # torch 2.13 DDP
    ctx = distributed.setup(120.0, use_cuda=False)
    torch.manual_seed(0)
    model = GalaxyCNN(CHANNELS, 10).to(memory_format=torch.channels_last)
    ddp = distributed.wrap_model(model, ctx)
    optimizer = torch.optim.Adam(ddp.parameters())
    x = torch.randn(8, 3, 128, 128).contiguous(memory_format=torch.channels_last)
    loss = F.cross_entropy(ddp(x), torch.randint(0, 10, (8,)))
    loss.backward()
    optimizer.step()  # gradients and Adam state exist: "the model" is fully allocated
    info = read_prepared(path)
    split_mb = len(info.splits["train"]) * int(np.prod(info.shape[1:])) / MB
    records = []
    for mode in modes:
        gc.collect()
        distributed.barrier()
        before = snapshot()
        dataset = GalaxyDataset(info, "train")
        held = None
        if mode == "ram":
            held = np.array(dataset.images[dataset.rows])  # this rank's own copy of the split
        else:
            workers = 2 if mode == "memmap+w2" else 0
            loader = make_loader(dataset, ShardBatches(len(dataset), 0, 1, 256), workers)
            for _ in loader:  # every rank reads every image: the worst case for private memory
                pass
        distributed.barrier()  # every rank has touched every page before anyone measures
        after = snapshot(include_children=mode == "memmap+w2")
        distributed.barrier()
        records.append({"mode": mode, "rank": rank, "world": world, "before": before, "after": after})
        if mode != "ram":
            del loader  # stops the workers, unmaps their copies
        del dataset, held
    Path(out, f"rank{rank}.json").write_text(json.dumps({"split_mb": split_mb, "records": records}))
    distributed.teardown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, path: Path, modes: list[str], workdir: Path) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix=f"world{world}_", dir=workdir))
    mp.start_processes(
        rank_main,
        args=(world, free_port(), str(path), modes, str(out)),
        nprocs=world,
        start_method="spawn",  # fresh interpreters, as torchrun starts them
    )
    ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    return {"split_mb": ranks[0]["split_mb"], "records": [rec for r in ranks for rec in r["records"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[11000, 22000], help="images per file")
    parser.add_argument("--size", type=int, default=128, help="image side")
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON (default: benchmarks/results/memory.json)"
    )
    args = parser.parse_args()
    info_machine = common.machine()
    runs = []
    with tempfile.TemporaryDirectory(prefix="gd_memory_", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        for n in args.sizes:
            with common.timed() as t:
                path = common.tiled_prepared(workdir, n, args.size)
            file_gb = path.stat().st_size / 1e9
            print(f"{n} images at {args.size}²: prepared file {file_gb:.2f} GB in {t[0]:.0f} s", flush=True)
            for world in args.worlds:
                result = run_world(world, path, args.modes, workdir)
                runs.append({"images": n, "file_gb": file_gb, "world": world, **result})
            path.unlink()
    info_machine = common.finish_machine(info_machine)
    rows = []
    for run in runs:
        for rec in run["records"]:
            b, a = rec["before"], rec["after"]
            rows.append(
                [
                    f"{run['file_gb']:.2f}",
                    f"{run['split_mb']:.0f}",
                    run["world"],
                    rec["rank"],
                    rec["mode"],
                    b["uss"],
                    a["uss"] - b["uss"],
                    a["pss"] - b["pss"],
                    a["anon"] - b["anon"],
                    a["uss"],
                    a["pss"],
                ]
            )
    print(f"\nmachine: {common.describe(info_machine)}")
    headers = [
        "file GB",
        "split MiB",
        "world",
        "rank",
        "mode",
        "USS model MiB",
        "ΔUSS",
        "ΔPSS",
        "ΔAnon",
        "USS after",
        "PSS after",
    ]
    print(common.markdown_table(headers, rows))
    worst = {
        mode: max((r[6] for r in rows if r[4] == mode and r[2] > 1), default=float("nan"))
        for mode in args.modes
    }
    print(
        "\nlargest ΔUSS per rank at world > 1 (target < 50 MiB for the memmap path): "
        + ", ".join(f"{m} {v:.0f} MiB" for m, v in worst.items())
    )
    out = common.write_result(
        "memory",
        {
            "machine": info_machine,
            "args": vars(args),
            "runs": runs,
            "max_delta_uss_mib_world_gt1": worst,
            "target_met": worst.get("memmap", float("inf")) < 50,
        },
        args.out,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
