"""Prepare from an image folder and a labels CSV: the same prepared file as from Galaxy10.

    python -m galaxydist.prepare --images DIR --labels labels.csv DST.h5 --crop C [--resize S]
        [--classes classes.txt] [--label-map "2:1"] [--skip-bad] [--workers N] [--fits-* ...]

The CSV names each image by an id column (`id`, `objid`: the file is DIR/<id>.jpeg, .jpg, .png,
or a FITS cutout DIR/<id>.fits, .fit, .fits.gz or .fit.gz, or DIR/<id> when the id already ends
so) or a file column (`file`, `filename`, `image`, `path`: relative to DIR; it wins when both
exist), and gives its label in a `label` or `class` column, as an integer or a class name. Column
names are matched ignoring case.

Classes: `--classes` lists the names one per line (integer label i is line i); without it, names
come from the label strings (sorted) or are `class_<label>` for integer labels. `--label-map
"a:b,c:d"` rewrites CSV labels before anything else (merging classes); classes a merge empties are
dropped and the rest renumbered 0..K-1 in order, so the labels are always contiguous.

FITS cutouts go through the stretch of `fits.py` (its settings recorded in DST); a folder gives
one kind, FITS or JPEG/PNG, so that a model trained on it takes one kind.
Images are decoded in worker processes (`pool.in_order`, as the Galaxy10 path's), a few dozen per
task, centre-cropped there and resized in the main process with `centre_square` (the Galaxy10
path's resize, so both sources give the same pixels).
The crops go to an unlinked scratch file first: only once every image is known good (or skipped
with --skip-bad) are the splits drawn and DST written, atomically.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from ..atomic import check_can_create
from ..errors import UserError
from ..pool import in_order
from ..progress import track
from .fits import SUFFIXES as FITS_SUFFIXES
from .fits import BadCutout, FitsStretch, is_fits, read_rgb, split_suffix
from .format import SLAB_BYTES, validate_labels, write_prepared
from .geometry import centre_square

ID_COLUMNS = ("id", "objid")
FILE_COLUMNS = ("file", "filename", "image", "path")
LABEL_COLUMNS = ("label", "class")
EXTENSIONS = (".jpeg", ".jpg", ".png")
MAX_SLAB_IMAGES = 512
SHOWN = 5  # bad images named in a message


@dataclass(frozen=True)
class LabelTable:
    """The rows of a labels CSV: the image key (id or file) and the raw label of each."""

    path: Path
    keys: list[str]
    labels: list[str]
    lines: list[int]  # CSV line of each row, for messages
    by_file: bool


@dataclass(frozen=True)
class Classes:
    """The class list after --label-map and --classes, and each row's class index."""

    names: list[str]
    labels: np.ndarray
    sources: list[list[str]]  # the (mapped-from) CSV labels feeding each class


@dataclass
class FolderReport:
    """What the user should hear about: the class list and the images skipped."""

    classes: Classes
    rows: int
    skipped: list[tuple[str, str]]

    def lines(self) -> list[str]:
        pairs = zip(self.classes.names, self.classes.sources, strict=True)
        lines = [
            "classes (from CSV labels): "
            + "; ".join(f"{i} {n} ({', '.join(s)})" for i, (n, s) in enumerate(pairs))
        ]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} of {self.rows} images: {describe(self.skipped)}")
        return lines


def describe(bad: Sequence[tuple[str, str]]) -> str:
    """The first few `name (problem)`, and how many more."""
    shown = ", ".join(f"{name} ({problem})" for name, problem in bad[:SHOWN])
    return shown + (f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else "")


# --- the CSV, the label map and the class list ----------------------------------------------


def pick_column(header: Sequence[str], choices: Sequence[str]) -> str | None:
    """The first header cell that is one of `choices`, ignoring case and spaces."""
    by_name = {cell.strip().lower(): cell for cell in header}
    return next((by_name[c] for c in choices if c in by_name), None)


def read_table(path: Path) -> LabelTable:
    """Rows of (key, label); missing columns, empty cells and duplicate keys are errors."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if not header:
                raise UserError(f"{path}: empty CSV (expected a header such as `id,label`)")
            file_col = pick_column(header, FILE_COLUMNS)
            key_col = file_col or pick_column(header, ID_COLUMNS)
            label_col = pick_column(header, LABEL_COLUMNS)
            if key_col is None or label_col is None:
                wanted = (
                    f"an id or file column ({', '.join(ID_COLUMNS + FILE_COLUMNS)})"
                    if key_col is None
                    else f"a label column ({', '.join(LABEL_COLUMNS)})"
                )
                raise UserError(f"{path}: needs {wanted}; its columns are {', '.join(header)}")
            keys, labels, lines, seen = [], [], [], {}
            for row in reader:
                key, label = (row[key_col] or "").strip(), (row[label_col] or "").strip()
                if not key or not label:
                    raise UserError(
                        f"{path} line {reader.line_num}: empty {key_col if not key else label_col}"
                    )
                if key in seen:
                    raise UserError(
                        f"{path} line {reader.line_num}: {key_col} {key} repeats line {seen[key]}"
                    )
                seen[key] = reader.line_num
                keys.append(key)
                labels.append(label)
                lines.append(reader.line_num)
    except OSError as err:
        raise UserError(f"{path}: cannot read the labels CSV ({err.strerror})") from None
    except (csv.Error, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a readable CSV ({err})") from None
    if not keys:
        raise UserError(f"{path}: no rows after the header")
    return LabelTable(path, keys, labels, lines, by_file=file_col is not None)


def parse_label_map(text: str) -> dict[str, str]:
    """ "1:1,2:1" → {"1": "1", "2": "1"}; each CSV label at most once."""
    mapping: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        old, sep, new = (s.strip() for s in item.partition(":"))
        if not sep or not old or not new:
            raise UserError(f"--label-map {text!r}: {item!r} is not OLD:NEW")
        if old in mapping:
            raise UserError(f"--label-map {text!r}: label {old} is mapped twice")
        mapping[old] = new
    if not mapping:
        raise UserError(f"--label-map {text!r}: no OLD:NEW pairs")
    return mapping


def read_class_names(path: Path) -> list[str]:
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as err:
        raise UserError(f"{path}: cannot read the class list ({err.strerror})") from None
    if not names:
        raise UserError(f"{path}: no class names (one per line)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"{path}: class {repeated[0]!r} is listed twice")
    return names


def is_integer(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def resolve_classes(table: LabelTable, class_file: Path | None, label_map: dict[str, str]) -> Classes:
    """CSV labels → contiguous class indices 0..K-1 and their names.

    Integer labels are compared as integers (so `02` is `2`); the label map applies first.
    """
    integer = all(map(is_integer, table.labels))
    norm = (lambda s: str(int(s))) if integer else (lambda s: s)
    if integer and not all(is_integer(s) for pair in label_map.items() for s in pair):
        raise UserError(f"--label-map: {table.path.name} has integer labels, so the map must map integers")
    mapping = {norm(k): norm(v) for k, v in label_map.items()}
    raw = [norm(label) for label in table.labels]
    unused = sorted(set(mapping) - set(raw))
    if unused:
        raise UserError(f"--label-map: label {unused[0]} does not occur in {table.path.name}")
    values = [mapping.get(v, v) for v in raw]
    present = set(values)

    if class_file is None:
        candidates = sorted(present, key=int) if integer else sorted(present)
        name_of = {c: (f"class_{c}" if integer else c) for c in candidates}
    else:
        listed = read_class_names(class_file)
        candidates = [str(i) for i in range(len(listed))] if integer else listed
        name_of = dict(zip(candidates, listed, strict=True))
    merged_away = {k for k, v in mapping.items() if k != v} - present
    kept = [c for c in candidates if c not in merged_away]
    index = {c: i for i, c in enumerate(kept)}
    for value, line in zip(values, table.lines, strict=True):
        if value not in index:  # only possible with a class file
            raise UserError(
                f"{table.path} line {line}: label {value} is not in the {len(kept)} classes of {class_file}"
            )
    sources: list[list[str]] = [[] for _ in kept]
    for old in sorted(set(raw), key=int if integer else str):
        sources[index[mapping.get(old, old)]].append(old)
    labels = np.array([index[v] for v in values], dtype=np.int64)
    return Classes([name_of[c] for c in kept], labels, sources)


# --- the images -------------------------------------------------------------------------------


def image_paths(images_dir: Path, table: LabelTable) -> tuple[list[str], dict[int, str]]:
    """The file of each row, and the rows whose file cannot be found (row → problem)."""
    if not images_dir.is_dir():
        raise UserError(f"{images_dir}: image folder not found")
    names = os.listdir(images_dir)
    if not names:
        raise UserError(f"{images_dir}: empty folder")
    if table.by_file:
        return [str(images_dir / key) for key in table.keys], {}
    by_stem: dict[str, list[str]] = {}
    for name in names:
        stem, ext = split_suffix(name)
        if ext.lower() in EXTENSIONS + FITS_SUFFIXES:
            by_stem.setdefault(stem, []).append(name)
    if not by_stem:
        raise UserError(
            f"{images_dir}: no {'/'.join(e[1:].upper() for e in EXTENSIONS)} images or FITS cutouts in it"
        )
    kinds = {is_fits(name) for found in by_stem.values() for name in found}
    wanted = "/".join((EXTENSIONS if False in kinds else ()) + (FITS_SUFFIXES if True in kinds else ()))
    paths, missing = [], {}
    for row, key in enumerate(table.keys):
        found = by_stem.get(key) or ([key] if key in by_stem.get(split_suffix(key)[0], []) else [])
        if len(found) > 1:
            raise UserError(f"{images_dir}: id {key} matches {' and '.join(sorted(found))}")
        paths.append(str(images_dir / (found[0] if found else key)))
        if not found:
            missing[row] = f"no {wanted} file"
    return paths, missing


def fits_settings(
    images_dir: Path, paths: Sequence[str], missing: dict[int, str], given: FitsStretch | None
) -> FitsStretch | None:
    """The stretch for a folder of FITS cutouts (`given`, else the defaults); None for JPEG/PNG.
    One kind per folder: a model trained on it then takes that kind."""
    kinds = {is_fits(path) for row, path in enumerate(paths) if row not in missing}
    if len(kinds) > 1:
        raise UserError(f"{images_dir}: mixes FITS cutouts and JPEG/PNG images; prepare one kind")
    if kinds == {True}:
        return given or FitsStretch()
    if given is not None and kinds:
        raise UserError(f"--fits-* options go with FITS cutouts; the images in {images_dir} are JPEG/PNG")
    return None


def decode(path: str, crop: int, fits: FitsStretch | None) -> np.ndarray | str:
    """One image (a FITS cutout through `fits`) → its central crop×crop RGB square, or why it
    cannot be used (in a worker)."""
    try:
        if fits is not None:
            pixels = read_rgb(path, fits)
        else:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        return "not found"
    except BadCutout as err:
        return str(err)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"cannot be decoded: {err}"
    height, width = pixels.shape[:2]
    if crop > min(height, width):
        raise UserError(f"{path}: crop {crop} does not fit this {width}×{height} image; use a smaller --crop")
    return centre_square(pixels[None], crop, None)[0]


def slab_images(crop: int) -> int:
    """Images per slab: about SLAB_BYTES of crops, at most MAX_SLAB_IMAGES."""
    return max(1, min(MAX_SLAB_IMAGES, SLAB_BYTES // (crop * crop * 3)))


def decode_all(paths: Sequence[str], crop: int, fits: FitsStretch | None) -> list[np.ndarray | str]:
    """Several images per worker task: fewer, larger messages than one task per image."""
    return [decode(path, crop, fits) for path in paths]


def decode_into(
    out: np.ndarray,
    paths: Sequence[str],
    skip: dict[int, str],
    crop: int,
    resize: int,
    workers: int,
    what: str,
    fits: FitsStretch | None,
) -> dict[int, str]:
    """Fill `out` (N×S×S×3) with the resized crops; returns every bad row → problem (with `skip`)."""
    bad = dict(skip)
    todo = [row for row in range(len(paths)) if row not in skip]
    chunk = max(1, slab_images(crop) // (4 * workers))  # at most 2 per worker in flight
    starts = range(0, len(todo), chunk)
    jobs = (([paths[r] for r in todo[start : start + chunk]], crop, fits) for start in starts)
    decoded = in_order(decode_all, jobs, max(1, min(workers, len(starts))))
    for start, results in zip(starts, track(decoded, len(starts), f"decode {what}"), strict=True):
        rows = todo[start : start + len(results)]
        good = [(row, px) for row, px in zip(rows, results, strict=True) if not isinstance(px, str)]
        bad.update((row, px) for row, px in zip(rows, results, strict=True) if isinstance(px, str))
        if good:
            out[[row for row, _ in good]] = centre_square(np.stack([px for _, px in good]), crop, resize)
    return bad


def prepare_folder(
    images_dir: str | os.PathLike,
    labels_csv: str | os.PathLike,
    dst_path: str | os.PathLike,
    crop: int,
    resize: int | None = None,
    classes_file: str | os.PathLike | None = None,
    label_map: str | None = None,
    skip_bad: bool = False,
    workers: int = 1,
    seed: int = 0,
    force: bool = False,
    fits: FitsStretch | None = None,
) -> FolderReport:
    """Image folder + labels CSV → prepared file. Any problem is a UserError with nothing written.
    `fits`: the FITS settings asked for (None: the defaults, for a folder of FITS cutouts)."""
    images_dir, labels_csv, dst_path = Path(images_dir), Path(labels_csv), Path(dst_path)
    if dst_path.exists() and not force:
        raise UserError(f"{dst_path}: already exists (use --force to replace it)")
    if crop < 1:
        raise UserError(f"--crop {crop}: must be a positive size")
    table = read_table(labels_csv)
    classes = resolve_classes(
        table, Path(classes_file) if classes_file else None, parse_label_map(label_map) if label_map else {}
    )
    validate_labels(classes.labels, classes.names, str(labels_csv))
    paths, missing = image_paths(images_dir, table)
    stretch = fits_settings(images_dir, paths, missing, fits)
    check_can_create(dst_path)  # before the decoding, the long part
    size, n = resize or crop, len(paths)
    scratch_dir = dst_path.parent if dst_path.parent.is_dir() else None
    with tempfile.TemporaryFile(dir=scratch_dir) as scratch:
        pixels = np.memmap(scratch, dtype=np.uint8, mode="w+", shape=(n, size, size, 3))
        bad = decode_into(pixels, paths, missing, crop, size, workers, images_dir.name, stretch)
        failed = [(table.keys[row], bad[row]) for row in sorted(bad)]
        if len(bad) == n:
            raise UserError(f"{images_dir}: none of the {n} images can be used: {describe(failed)}")
        if bad and not skip_bad:
            raise UserError(
                f"{images_dir}: {len(bad)} of {n} images cannot be used: {describe(failed)} "
                "(fix them, or pass --skip-bad to leave them out)"
            )
        keep = np.array([row for row in range(n) if row not in bad], dtype=np.int64)
        labels = classes.labels[keep]
        validate_labels(labels, classes.names, f"{labels_csv} without the skipped images")
        step = slab_images(size)
        slabs = (pixels[keep[i : i + step]] for i in range(0, len(keep), step))
        columns = {"ids": np.array([table.keys[r] for r in keep], dtype=h5py.string_dtype())}
        provenance = {
            "source_name": images_dir.name,
            "source_labels": labels_csv.name,
            "source_rows": n,
            "skipped": len(bad),
            "crop": crop,
            "resize": size,
            "label_map": label_map or "",
            **(stretch.to_attrs() if stretch else {}),
        }
        write_prepared(str(dst_path), slabs, labels, size, classes.names, seed, columns, provenance)
    return FolderReport(Classes(classes.names, labels, classes.sources), n, failed)
