"""Classify a catalogue with a trained checkpoint, sharded over ranks and nodes, resumable.

    torchrun --nproc_per_node=N [--nnodes ...] -m galaxydist.infer CHECKPOINT_OR_RUN INPUT --out OUT
        [--tta] [--embeddings [float16|float32]] [--batch-size B] [--id-column C] [--file-column F]
        [--split S] [--part-size P] [--workers W] [--strict] [--force]
    python -m galaxydist.infer ...     # one process

INPUT: a catalogue (CSV or Parquet: an id column and a file column of JPEG/PNG or FITS paths
relative to the catalogue), an image folder (ids: file names without suffix), or a prepared .h5
(all rows, or one --split). Every image goes through the checkpoint's own crop and resize, as in
training, and a FITS cutout first through its recorded stretch (a model trained on FITS cutouts
takes only FITS cutouts, one trained on JPEG/PNG images none).

OUT: a folder of Parquet parts (part-NNNNN.parquet, catalogue order; read them all at once with
pyarrow.parquet.read_table(OUT) or pandas.read_parquet(OUT)) with id, row, predicted,
class_name, one p_<class> column per class and, with --embeddings, the model's penultimate
features; _failed.csv lists the rows that could not be read, with the reason (an error only with
--strict); _manifest.json says what the output is for. Killed and run again with the same
command, it skips the parts already written; a finished output is left as it is.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .allocator import keep_freed_memory
from .atomic import check_can_create
from .checkpoint import ModelMeta
from .data.geometry import Geometry
from .errors import UserError, run_cli
from .inference.batch import (
    FAILED,
    MANIFEST,
    Options,
    check_output,
    finish_output,
    manifest_for,
    parts,
    run_parts,
    start_output,
)
from .inference.catalogue import Catalogue, Rows, check_kind, open_catalogue
from .inference.engine import load_model
from .progress import track

# The largest buffer the host heap serves; bigger ones are mapped afresh each time. A
# catalogue-long run on a heap that keeps everything fragments it: large buffers come back at new
# addresses and the holes stay resident, so RSS grew with the catalogue. With this cap and the
# heap's free pages handed back after each part it stays flat (BENCHMARKS.md §9).
HEAP_LARGEST = 128 << 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m galaxydist.infer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("checkpoint", metavar="CHECKPOINT_OR_RUN")
    add("input", metavar="INPUT")
    add("--out", required=True, help="output folder of Parquet parts")
    add("--tta", action="store_true", help="average over the symmetries the model was trained for")
    add(
        "--embeddings",
        nargs="?",
        const="float32",
        choices=("float16", "float32"),
        help="write penultimate features",
    )
    add("--batch-size", type=int, default=256)
    add("--id-column", help="the catalogue's id column (default: id, objid, dr8_id or iauname)")
    add(
        "--file-column", help="the catalogue's file column (default: file, filename, file_loc, path or image)"
    )
    add("--split", help="with a prepared INPUT: one split (default: every row)")
    add("--part-size", type=int, default=4096, help="rows per output part (the unit of resuming)")
    add("--workers", type=int, default=2, help="decoding processes per rank")
    add("--strict", action="store_true", help="an unreadable input is an error (exit 2)")
    add("--force", action="store_true", help="start over in an OUT written for something else")
    args = parser.parse_args(argv)
    for name in ("batch_size", "part_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.workers < 0:
        raise UserError(f"--workers {args.workers}: must be >= 0")
    return args


def check_inputs(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, ModelMeta, Catalogue]:
    """The checkpoint loads and the catalogue opens and suits it (columns, unique ids, classes,
    image size, kind of file); also what `launch/submit.py ... infer` checks before submitting."""
    model, meta = load_model(args.checkpoint, device)
    catalogue = open_catalogue(args.input, args.id_column, args.file_column, args.split)
    check_kind(catalogue, meta.fits)
    if catalogue.class_names is not None and catalogue.class_names != meta.class_names:
        raise UserError(f"{meta.path}: trained on other classes than those of {catalogue.path}")
    if catalogue.image_size is not None and catalogue.image_size != meta.image_size:
        raise UserError(
            f"{catalogue.path}: holds {catalogue.image_size}² images, the model takes {meta.image_size}²"
        )
    return model, meta, catalogue


def options_of(args: argparse.Namespace) -> Options:
    """What the output depends on besides the checkpoint and the catalogue."""
    return Options(args.tta, args.embeddings, args.batch_size, args.part_size)


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory(HEAP_LARGEST)
    args = parse_args(argv)
    ctx = distributed.setup()
    together = False
    try:
        # Every check before any work, alike on every rank: the checkpoint, the input, the output.
        model, meta, catalogue = check_inputs(args, ctx.device)
        options = options_of(args)
        out = Path(args.out)
        manifest = manifest_for(meta, catalogue, options)
        # Rank 0 alone reads OUT (others could see it half made by rank 0); all learn the answer.
        state, error = None, None
        if ctx.is_main:
            try:
                state = check_output(out, manifest, args.force)
            except UserError as err:
                error = str(err)
        state, error = distributed.broadcast_object((state, error))
        if error:
            raise UserError(error)
        together = True
        if state == "complete":
            if ctx.is_main:
                print(f"{out}: already complete for this checkpoint and catalogue; nothing to do")
            return 0
        check_can_create(out / MANIFEST)
        distributed.on_main(ctx, out, lambda: start_output(out, manifest, state == "fresh"))
        distributed.barrier()
        all_parts = parts(len(catalogue), options.part_size)
        mine = list(range(ctx.rank, len(all_parts), ctx.world_size))
        rows = sum(len(all_parts[i]) for i in mine)
        dataset = Rows(catalogue, Geometry(meta.image_size, meta.crop, "crop", meta.fits))
        progress = run_parts(model, meta, catalogue, dataset, options, out, mine, args.workers)
        for _ in track(progress, rows, f"infer (rank 0 of {ctx.world_size})", ctx.is_main, rate="img"):
            pass
        distributed.barrier()
        summary = distributed.on_main(ctx, out, lambda: finish_output(out, len(all_parts)))
        classified, unreadable = distributed.broadcast_object(summary)
        if ctx.is_main:
            print(f"{classified} of {len(catalogue)} rows classified into {out} ({len(all_parts)} parts)")
            if unreadable and not args.strict:
                print(f"{unreadable} unreadable: listed in {out / FAILED}", file=sys.stderr)
        if args.strict and unreadable:
            raise UserError(
                f"{first_failure(out, catalogue)} ({unreadable} inputs could not be read: see {out / FAILED})"
            )
        return 0
    finally:
        distributed.teardown(together)


def first_failure(out: Path, catalogue: Catalogue) -> str:
    """`FILE: reason` of the first row OUT/_failed.csv lists: --strict's error names a file."""
    with (out / FAILED).open(newline="") as f:
        first = next(csv.DictReader(f))
    row = int(first["row"])
    return f"{catalogue.file_of(row) if catalogue.files is not None else catalogue.id_of(row)}: {first['reason']}"


def cli() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
