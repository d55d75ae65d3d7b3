"""Catalogue-scale inference: the catalogue cut into fixed parts of rows, each part classified by
one rank and written atomically as its own Parquet file (and the rows it could not read as a
CSV beside it), so that any world size writes the same files and a re-run skips finished parts.

OUT/_manifest.json says what the parts are for (checkpoint, catalogue, options); a re-run may
only resume output written for the same, and `complete` marks the end (_failed.csv then lists
every unreadable row with its reason). Names starting with _ are skipped by Parquet readers, so
`pyarrow.parquet.read_table(OUT)` reads exactly the parts.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..allocator import release_freed_memory
from ..atomic import atomic_path
from ..checkpoint import ModelMeta
from ..data.augment import normalise
from ..errors import UserError
from .catalogue import Catalogue, Rows, collate
from .engine import is_channels_last, logits, mirror_swap, symmetries

MANIFEST = "_manifest.json"  # a leading _ : Parquet readers of OUT skip it
FAILED = "_failed.csv"


@dataclass(frozen=True)
class Options:
    tta: bool
    embeddings: str | None  # None, "float16" or "float32"
    batch_size: int
    part_size: int


def file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_for(meta: ModelMeta, catalogue: Catalogue, options: Options) -> dict[str, Any]:
    return {
        "checkpoint": str(meta.path.resolve()),
        "checkpoint_digest": file_digest(meta.path),
        "input": str(catalogue.path.resolve()),
        "input_digest": catalogue.identity(),
        "rows": len(catalogue),
        "class_names": list(meta.class_names),
        "options": asdict(options),
    }


def parts(rows: int, part_size: int) -> list[range]:
    return [range(start, min(start + part_size, rows)) for start in range(0, rows, part_size)]


def part_path(out: Path, index: int) -> Path:
    return out / f"part-{index:05d}.parquet"


def failed_path(out: Path, index: int) -> Path:
    return out / f"_part-{index:05d}.failed.csv"


def check_output(out: Path, manifest: dict[str, Any], force: bool) -> str:
    """'fresh', 'resume' or 'complete' for OUT; an output written for something else is an error."""
    existing = out / MANIFEST
    if not existing.exists():
        if out.exists() and any(out.iterdir()) and not force:
            raise UserError(
                f"{out}: exists and is not a galaxydist.infer output; choose another --out or --force"
            )
        return "fresh"
    if force:
        return "fresh"
    try:
        theirs = json.loads(existing.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{existing}: unreadable ({err}); --force starts over") from None
    differs = [k for k in manifest if theirs.get(k) != manifest[k]]
    if differs:
        raise UserError(
            f"{out}: written for another {differs[0].replace('_', ' ')} ({theirs.get(differs[0])!r}); "
            "a re-run only resumes its own work: --force starts over, or choose another --out"
        )
    return "complete" if theirs.get("complete") else "resume"


def start_output(out: Path, manifest: dict[str, Any], fresh: bool) -> None:
    """Rank 0, before any work: a fresh OUT (emptied with --force) and its manifest."""
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / MANIFEST) as tmp:
        tmp.write_text(json.dumps({**manifest, "complete": False}, indent=2) + "\n")


@torch.no_grad()
def classify(
    model: nn.Module, meta: ModelMeta, images: torch.Tensor, options: Options
) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities (TTA'd if asked) and, if asked, the penultimate features of one batch."""
    device = next(model.parameters()).device
    mean = torch.tensor(meta.mean, dtype=torch.float32, device=device)
    std = torch.tensor(meta.std, dtype=torch.float32, device=device)
    x = images.to(device)
    channels_last = is_channels_last(model)
    views = list(symmetries(x, meta.mirror_symmetric)) if options.tta else [x]
    swap = mirror_swap(meta)
    probs = torch.zeros((), device=device)
    for i, view in enumerate(views):
        p = torch.softmax(logits(model, view, mean, std, channels_last), dim=1)
        probs = probs + (p[:, swap] if swap is not None and i >= 4 else p)
    features = None
    if options.embeddings:
        x = normalise(x, mean, std, torch.float32)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = model.embed(x).float().cpu().numpy().astype(options.embeddings)
    return (probs / len(views)).cpu().numpy(), features


def write_part(
    out: Path,
    index: int,
    catalogue: Catalogue,
    rows: np.ndarray,
    probs: np.ndarray,
    features: np.ndarray | None,
    failed: list[tuple[int, str]],
    class_names: tuple[str, ...],
) -> None:
    """The failures first, then the Parquet part, each atomically: the part's existence marks it done."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["id", "row", "reason"])
    writer.writerows([catalogue.id_of(i), i, why] for i, why in failed)
    with atomic_path(failed_path(out, index)) as tmp:
        tmp.write_text(text.getvalue())
    predicted = probs.argmax(1) if len(rows) else np.zeros(0, dtype=np.int64)
    columns = {
        "id": catalogue.ids.take(pa.array(rows, pa.int64())).cast(pa.string()),
        "row": pa.array(rows, pa.int64()),
        "predicted": pa.array(predicted, pa.int64()),
        "class_name": pa.array([class_names[c] for c in predicted], pa.string()),
    }
    for k, name in enumerate(class_names):
        columns[f"p_{name}"] = pa.array(probs[:, k] if len(rows) else [], pa.float32())
    if features is not None:
        kind = pa.float16() if features.dtype == np.float16 else pa.float32()
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(
            pa.array(features.reshape(-1), kind), features.shape[1]
        )
    with atomic_path(part_path(out, index)) as tmp:
        pq.write_table(pa.table(columns), tmp)


class PartBatches(torch.utils.data.Sampler):
    """The rows of the given parts in batches that never cross a part, made as the loader asks
    for them (a list of every batch would grow with the catalogue)."""

    def __init__(self, ranges: list[range], batch_size: int) -> None:
        self.ranges, self.batch_size = ranges, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for rows in self.ranges:
            for start in range(0, len(rows), self.batch_size):
                yield list(rows[start : start + self.batch_size])

    def __len__(self) -> int:
        return sum(-(-len(rows) // self.batch_size) for rows in self.ranges)


class PartResults:
    """One part's outputs, filled batch by batch into arrays made once at the part's start (no
    per-batch arrays kept to be concatenated at its end)."""

    def __init__(self, index: int, rows: range, classes: int, features: int, embeddings: str | None) -> None:
        self.index, self.remaining = index, len(rows)
        self.rows = np.empty(len(rows), dtype=np.int64)
        self.probs = np.empty((len(rows), classes), dtype=np.float32)
        self.features = np.empty((len(rows), features), dtype=embeddings) if embeddings else None
        self.done = 0
        self.failed: list[tuple[int, str]] = []

    def add(self, rows: list[int], probs: np.ndarray | None, features: np.ndarray | None) -> None:
        end = self.done + len(rows)
        self.rows[self.done : end] = rows
        if probs is not None:
            self.probs[self.done : end] = probs
        if self.features is not None and features is not None:
            self.features[self.done : end] = features
        self.done = end


def run_parts(
    model: nn.Module,
    meta: ModelMeta,
    catalogue: Catalogue,
    dataset: Rows,
    options: Options,
    out: Path,
    mine: list[int],
    workers: int,
) -> Iterator[int]:
    """Classify and write this rank's unfinished parts; yields the rows done after each batch.
    One loader serves them all, so its workers decode on across the parts' boundaries."""
    all_parts = parts(len(catalogue), options.part_size)
    todo = [index for index in mine if not part_path(out, index).exists()]
    if not todo:
        return
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=PartBatches([all_parts[index] for index in todo], options.batch_size),
        num_workers=workers,
        collate_fn=collate,
    )
    width = len(meta.class_names)
    parts_left = iter(todo)
    part: PartResults | None = None
    for rows, images, bad in loader:
        if part is None:
            index = next(parts_left)
            part = PartResults(index, all_parts[index], width, model.feature_width, options.embeddings)
        part.failed += bad
        if images is not None:
            part.add(rows, *classify(model, meta, images, options))
        part.remaining -= len(rows) + len(bad)
        yield len(rows) + len(bad)
        if part.remaining == 0:
            n = part.done
            features = part.features[:n] if part.features is not None else None
            write_part(
                out,
                part.index,
                catalogue,
                part.rows[:n],
                part.probs[:n],
                features,
                part.failed,
                meta.class_names,
            )
            part = None
            release_freed_memory()  # the holes this part left in the heap


def finish_output(out: Path, count: int) -> tuple[int, int]:
    """Rank 0, after every rank: failed.csv of every part, the manifest marked complete.
    Returns (classified rows, unreadable rows)."""
    import pyarrow.parquet as pq

    failures = ["id,row,reason\n"]
    classified = 0
    for index in range(count):
        failures += failed_path(out, index).read_text().splitlines(keepends=True)[1:]
        classified += pq.read_metadata(part_path(out, index)).num_rows
    with atomic_path(out / FAILED) as tmp:
        tmp.write_text("".join(failures))
    manifest = json.loads((out / MANIFEST).read_text())
    with atomic_path(out / MANIFEST) as tmp:
        tmp.write_text(json.dumps({**manifest, "complete": True, "finished": time.time()}, indent=2) + "\n")
    return classified, len(failures) - 1


def read_output(out: Path):
    """Every part of OUT, in catalogue order, as one pyarrow Table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))])
