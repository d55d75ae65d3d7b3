"""What a catalogue inference reads: a table of ids and image files (JPEG/PNG or FITS; CSV or
Parquet, paths relative to the table), an image folder, or a prepared file; every row with its
id, in order.

Rows are read one at a time (in DataLoader workers), through the checkpoint's own geometry, so
memory stays bounded whatever the catalogue's length; an unreadable image is reported for its
row, not raised.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.dataset import open_images
from ..data.fits import SUFFIXES as FITS_SUFFIXES
from ..data.fits import FitsStretch, kind_mismatch, split_suffix
from ..data.format import SPLITS, read_prepared
from ..data.geometry import Geometry, read_image
from ..errors import UserError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", *FITS_SUFFIXES)
TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
PREPARED_SUFFIXES = (".h5", ".hdf5")


@dataclass(frozen=True)
class Catalogue:
    """The inputs in catalogue order: ids, and per row an image file or a prepared-file row."""

    path: Path
    ids: list[str]
    files: list[str] | None  # absolute image paths; None for a prepared file
    prepared_rows: np.ndarray | None  # rows of the prepared file; None for images
    image_size: int | None = None  # a prepared file's side (its images are already squared)
    class_names: tuple[str, ...] | None = None  # a prepared file's classes

    def __len__(self) -> int:
        return len(self.ids)

    def identity(self) -> str:
        """A digest of what is read (ids and files, or the prepared file's rows): a re-run may
        only resume output written for the same catalogue."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(str(self.path.resolve()).encode())
        for item in (
            self.ids,
            self.files or [],
            self.prepared_rows.tolist() if self.prepared_rows is not None else [],
        ):
            digest.update("\n".join(map(str, item)).encode())
        return digest.hexdigest()


def read_table(path: Path) -> tuple[list[str], list[list[str]]]:
    """Column names and rows of a CSV or Parquet table, as strings."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            raise UserError(f"{path}: empty (no header)")
        return rows[0], rows[1:]
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # a damaged or foreign file
        raise UserError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err})") from None
    columns = table.column_names
    values = [table.column(c).to_pylist() for c in columns]
    return columns, [[str(v) for v in row] for row in zip(*values, strict=True)]


def pick(header: Sequence[str], asked: str | None, choices: Sequence[str], what: str, path: Path) -> int:
    lowered = [h.strip().lower() for h in header]
    names = [asked.lower()] if asked else list(choices)
    for name in names:
        if name in lowered:
            return lowered.index(name)
    flag = f"--{what}-column"
    wanted = repr(asked) if asked else " or ".join(map(repr, choices))
    raise UserError(f"{path}: no {what} column {wanted} (columns: {', '.join(header)}); name it with {flag}")


def from_table(path: Path, id_column: str | None, file_column: str | None) -> Catalogue:
    header, rows = read_table(path)
    ids_at = pick(header, id_column, ("id", "objid", "dr8_id", "iauname"), "id", path)
    files_at = pick(header, file_column, ("file", "filename", "file_loc", "path", "image"), "file", path)
    ids = [row[ids_at] for row in rows]
    files = [str((path.parent / row[files_at]).resolve()) for row in rows]
    return Catalogue(path, ids, files, None)


def from_folder(path: Path) -> Catalogue:
    files = sorted(p for p in path.iterdir() if split_suffix(p.name)[1].lower() in IMAGE_SUFFIXES)
    return Catalogue(path, [split_suffix(p.name)[0] for p in files], [str(p.resolve()) for p in files], None)


def from_prepared(path: Path, split: str | None) -> Catalogue:
    info = read_prepared(path)
    if split is not None and split not in SPLITS:
        raise UserError(f"--split {split!r}: choose one of {', '.join(SPLITS)} (or leave it out: every row)")
    rows = info.splits[split] if split else np.arange(info.shape[0])
    return Catalogue(path, [str(int(r)) for r in rows], None, rows, info.image_size, info.class_names)


def open_catalogue(
    target: str, id_column: str | None, file_column: str | None, split: str | None
) -> Catalogue:
    """INPUT as a catalogue, checked: it exists, its columns do, ids are unique, it has rows."""
    path = Path(target)
    if not path.exists():
        raise UserError(f"{path}: input not found")
    if path.is_dir():
        catalogue = from_folder(path)
    elif path.suffix.lower() in TABLE_SUFFIXES:
        catalogue = from_table(path, id_column, file_column)
    elif path.suffix.lower() in PREPARED_SUFFIXES:
        catalogue = from_prepared(path, split)
    else:
        raise UserError(f"{path}: not a catalogue (CSV/Parquet), an image folder or a prepared .h5")
    if not len(catalogue):
        raise UserError(f"{path}: no rows to classify")
    if len(set(catalogue.ids)) != len(catalogue.ids):
        seen: set[str] = set()
        duplicate = next(i for i in catalogue.ids if i in seen or seen.add(i))
        raise UserError(f"{path}: id {duplicate!r} appears more than once; ids must be unique")
    return catalogue


def check_kind(catalogue: Catalogue, fits: FitsStretch | None) -> None:
    """Every file of the kind the model was trained on, FITS cutouts (with `fits`, its stretch) or
    not: a whole catalogue of the other kind is one line before any work, not a row per failure."""
    for file in catalogue.files or []:
        problem = kind_mismatch(file, fits)
        if problem:
            raise UserError(f"{file}: {problem}")


class Rows(torch.utils.data.Dataset):
    """Catalogue rows as model inputs: (uint8 3×S×S tensor, or None and why it is unreadable)."""

    def __init__(self, catalogue: Catalogue, geometry: Geometry) -> None:
        self.catalogue, self.geometry = catalogue, geometry
        self.info = read_prepared(catalogue.path) if catalogue.prepared_rows is not None else None
        self._images: np.memmap | None = None  # mapped lazily, in each loader worker

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None}

    def __len__(self) -> int:
        return len(self.catalogue)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        if self.info is not None:
            if self._images is None:
                self._images = open_images(self.info)
            row = int(self.catalogue.prepared_rows[i])
            return i, torch.from_numpy(np.ascontiguousarray(self._images[row].transpose(2, 0, 1))), ""
        path = Path(self.catalogue.files[i])
        if not path.is_file():
            return i, None, "file not found"
        try:
            pixels = read_image(path, self.geometry.fits)
        except UserError as err:
            return i, None, str(err).split(": ", 1)[-1]
        height, width = pixels.shape[1:3]
        if min(height, width) < 8:
            return i, None, f"image of {width}×{height} is too small"
        return i, torch.from_numpy(self.geometry.apply(pixels)[0].copy()), ""


def collate(
    items: list[tuple[int, torch.Tensor | None, str]],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """A batch: the readable rows and their images stacked, and the unreadable ones with why."""
    good = [(i, x) for i, x, _ in items if x is not None]
    failed = [(i, why) for i, x, why in items if x is None]
    images = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], images, failed
