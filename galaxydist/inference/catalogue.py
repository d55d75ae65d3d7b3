"""What a catalogue inference reads: a table of ids and image files (JPEG/PNG or FITS; CSV or
Parquet, paths relative to the table), an image folder, or a prepared file; every row with its
id, in order.

The ids and file names are held as Arrow string columns (one buffer each, a few bytes a row and no
Python object per row, so that forked loader workers share them instead of copying them page by
page as reference counts are touched), and images are read one row at a time in DataLoader
workers, through the checkpoint's own geometry: a rank's memory is the model, its batches and
the catalogue's own bytes. An unreadable image is reported for its row, not raised.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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
DIGEST_ROWS = 8192  # rows hashed at a time: the identity's memory does not grow with the catalogue


@dataclass(frozen=True)
class Catalogue:
    """The inputs in catalogue order: ids, and per row an image file or a prepared-file row."""

    path: Path
    root: Path  # the absolute folder that relative file paths start from
    ids: pa.Array  # text, one per row
    files: pa.Array | None  # image paths as written, relative to `root`; None for a prepared file
    prepared_rows: np.ndarray | None  # rows of the prepared file; None for images
    image_size: int | None = None  # a prepared file's side (its images are already squared)
    class_names: tuple[str, ...] | None = None  # a prepared file's classes

    def __len__(self) -> int:
        return len(self.ids)

    def id_of(self, row: int) -> str:
        return self.ids[row].as_py()

    def file_of(self, row: int) -> Path:
        assert self.files is not None, "a prepared file has rows, not files"
        return self.root / self.files[row].as_py()

    def identity(self) -> str:
        """A digest of what is read (ids and files, or the prepared file's rows): a re-run may
        only resume output written for the same catalogue."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(str(self.path.resolve()).encode())
        columns = [self.ids] if self.files is None else [self.ids, self.files]
        for column in columns:
            for start in range(0, len(column), DIGEST_ROWS):
                digest.update("\n".join(column.slice(start, DIGEST_ROWS).to_pylist()).encode() + b"\n")
        if self.prepared_rows is not None:
            digest.update(np.ascontiguousarray(self.prepared_rows, dtype=np.int64).tobytes())
        return digest.hexdigest()


def text_column(column: pa.ChunkedArray | pa.Array, name: str, path: Path) -> pa.Array:
    """One contiguous text array (64-bit offsets: no limit on the catalogue's bytes) of a table's
    column; integers become their decimal text. Floats (ids would turn into 1.2e+11), other types
    and empty cells are errors naming the column."""
    kind = column.type
    if not (pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"{path}: column {name!r} holds {kind}; ids and file names must be text or integers")
    column = column.cast(pa.large_string())
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    empty = pc.or_kleene(pc.is_null(column), pc.equal(column, ""))
    if pc.any(empty).as_py():
        row = pc.index(empty, True).as_py()
        raise UserError(f"{path}: column {name!r} is empty in data row {row + 1}")
    return column


def read_table(path: Path) -> pa.Table:
    """A CSV (every column as text: ids such as 007 keep their zeros) or Parquet table."""
    if path.suffix.lower() == ".csv":
        import pyarrow.csv as pcsv

        try:
            with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: Excel's BOM is not a name
                header = next(csv.reader(f), None)
        except UnicodeDecodeError as err:
            raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        if not header:
            raise UserError(f"{path}: empty (no header)")
        names = [f"{i}" for i in range(len(header))]  # by position: a repeated name is no problem
        try:
            table = pcsv.read_csv(
                path,
                read_options=pcsv.ReadOptions(column_names=names, skip_rows=1),
                parse_options=pcsv.ParseOptions(newlines_in_values=True),
                convert_options=pcsv.ConvertOptions(column_types=dict.fromkeys(names, pa.large_string())),
            )
        except pa.ArrowInvalid as err:
            raise UserError(f"{path}: not a readable CSV table ({str(err).splitlines()[0]})") from None
        return table.rename_columns(header)
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except Exception as err:  # a damaged or foreign file
        raise UserError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err})") from None


def pick(header: Sequence[str], asked: str | None, choices: Sequence[str], what: str, path: Path) -> int:
    """The position of the asked column, or of the first of `choices`, in `header`."""
    lowered = [h.strip().lower() for h in header]
    names = [asked.lower()] if asked else list(choices)
    for name in names:
        if name in lowered:
            return lowered.index(name)
    flag = f"--{what}-column"
    wanted = repr(asked) if asked else " or ".join(map(repr, choices))
    raise UserError(f"{path}: no {what} column {wanted} (columns: {', '.join(header)}); name it with {flag}")


def from_table(path: Path, id_column: str | None, file_column: str | None) -> Catalogue:
    table = read_table(path)
    header = table.column_names
    ids_at = pick(header, id_column, ("id", "objid", "dr8_id", "iauname"), "id", path)
    files_at = pick(header, file_column, ("file", "filename", "file_loc", "path", "image"), "file", path)
    ids = text_column(table.column(ids_at), header[ids_at], path)
    files = text_column(table.column(files_at), header[files_at], path)
    return Catalogue(path, path.resolve().parent, ids, files, None)


def from_folder(path: Path) -> Catalogue:
    names = sorted(p.name for p in path.iterdir() if split_suffix(p.name)[1].lower() in IMAGE_SUFFIXES)
    ids = pa.array([split_suffix(n)[0] for n in names], pa.large_string())
    return Catalogue(path, path.resolve(), ids, pa.array(names, pa.large_string()), None)


def from_prepared(path: Path, split: str | None) -> Catalogue:
    info = read_prepared(path)
    if split is not None and split not in SPLITS:
        raise UserError(f"--split {split!r}: choose one of {', '.join(SPLITS)} (or leave it out: every row)")
    rows = info.splits[split] if split else np.arange(info.shape[0])
    ids = pa.array(np.asarray(rows, dtype=np.int64)).cast(pa.large_string())
    return Catalogue(path, path.resolve().parent, ids, None, rows, info.image_size, info.class_names)


def first_duplicate(ids: pa.Array) -> str | None:
    """The first id, in catalogue order, that appears more than once (None: all unique)."""
    if pc.count_distinct(ids).as_py() == len(ids):
        return None
    counts = pc.value_counts(ids)
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    return ids.filter(pc.is_in(ids, value_set=repeated))[0].as_py()


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
    duplicate = first_duplicate(catalogue.ids)
    if duplicate is not None:
        raise UserError(f"{path}: id {duplicate!r} appears more than once; ids must be unique")
    return catalogue


def check_kind(catalogue: Catalogue, fits: FitsStretch | None) -> None:
    """Every file of the kind the model was trained on, FITS cutouts (with `fits`, its stretch) or
    not: a whole catalogue of the other kind is one line before any work, not a row per failure."""
    if catalogue.files is None:
        return
    lowered = pc.utf8_lower(catalogue.files)
    fits_files = pc.ends_with(lowered, FITS_SUFFIXES[0])
    for suffix in FITS_SUFFIXES[1:]:
        fits_files = pc.or_(fits_files, pc.ends_with(lowered, suffix))
    other_kind = pc.invert(fits_files) if fits is not None else fits_files
    if pc.any(other_kind).as_py():
        row = pc.index(other_kind, True).as_py()
        problem = kind_mismatch(catalogue.files[row].as_py(), fits)  # the name as the mask read it
        raise UserError(f"{catalogue.file_of(row)}: {problem}")


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
        path = self.catalogue.file_of(i)
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
