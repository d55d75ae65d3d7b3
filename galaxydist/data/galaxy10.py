"""The Galaxy10 DECaLS source: what the raw file holds, the classes, and its conversion to the
prepared file (streamed in chunk-aligned slabs, decompressed in worker processes)."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from ..errors import UserError
from ..pool import in_order
from ..progress import track
from .format import SLAB_BYTES, validate_labels, write_prepared
from .geometry import centre_square

IMAGES_KEY = "images"
LABELS_KEY = "ans"
OPTIONAL_COLUMNS = ("ra", "dec", "redshift", "pxscale")

CLASS_NAMES = (
    "Disturbed",
    "Merging",
    "Round Smooth",
    "In-between Round Smooth",
    "Cigar Shaped Smooth",
    "Barred Spiral",
    "Unbarred Tight Spiral",
    "Unbarred Loose Spiral",
    "Edge-on without Bulge",
    "Edge-on with Bulge",
)

# Images per class in the full 17,736-image release (Walmsley et al. 2022 labels).
CLASS_COUNTS = (1081, 1853, 2645, 2027, 334, 2043, 1829, 2628, 1423, 1873)


def open_source(path: str) -> h5py.File:
    if not os.path.exists(path):
        raise UserError(f"{path}: file not found")
    if not h5py.is_hdf5(path):
        raise UserError(f"{path}: not an HDF5 file")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise UserError(f"{path}: cannot be read, truncated or damaged ({err})") from None


def check_schema(src: h5py.File, path: str, crop: int) -> tuple[h5py.Dataset, np.ndarray]:
    """The Galaxy10 layout: images (N, H, W, 3) uint8 and integer labels of length N."""
    for key in (IMAGES_KEY, LABELS_KEY):
        if key not in src:
            raise UserError(f"{path}: missing dataset {key!r} (Galaxy10 files hold 'images' and 'ans')")
    images, ans = src[IMAGES_KEY], src[LABELS_KEY]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"{path}: 'images' has shape {images.shape}, expected (N, H, W, 3)")
    if images.dtype != np.uint8:
        raise UserError(f"{path}: 'images' has dtype {images.dtype}, expected uint8")
    if ans.ndim != 1 or not np.issubdtype(ans.dtype, np.integer):
        raise UserError(f"{path}: 'ans' must be a 1-D integer array, got {ans.dtype} {ans.shape}")
    if len(ans) != len(images):
        raise UserError(f"{path}: {len(images)} images but {len(ans)} labels")
    if not 0 < crop <= min(images.shape[1:3]):
        raise UserError(f"{path}: crop {crop} does not fit images of {images.shape[1]}×{images.shape[2]}")
    try:
        labels = ans[()].astype(np.int64)
    except OSError as err:
        raise UserError(f"{path}: labels cannot be read, truncated or damaged ({err})") from None
    return images, labels


def slab_rows(images: h5py.Dataset) -> int:
    """Rows per read: a whole number of chunks and about SLAB_BYTES of decoded pixels."""
    per_chunk = images.chunks[0] if images.chunks else 1
    row_bytes = int(np.prod(images.shape[1:]))
    return max(per_chunk, SLAB_BYTES // row_bytes // per_chunk * per_chunk)


_open_sources: dict[str, h5py.File] = {}  # this process's handle on a source, kept between slabs


def read_slab(src_path: str, start: int, stop: int, crop: int, resize: int | None) -> np.ndarray:
    """Rows [start, stop) of the source's images, cropped (and resized); runs in a worker process."""
    if src_path not in _open_sources:
        _open_sources[src_path] = h5py.File(src_path, "r")
    try:
        raw = _open_sources[src_path][IMAGES_KEY][start:stop]
    except OSError as err:
        raise UserError(f"{src_path}: images from row {start} cannot be read ({err})") from None
    return centre_square(raw, crop, resize)


def prepare(
    src_path: str,
    dst_path: str,
    crop: int,
    seed: int = 0,
    force: bool = False,
    resize: int | None = None,
    workers: int = 1,
) -> None:
    """Galaxy10-format HDF5 → prepared file, read in chunk-aligned slabs (memory independent of N).

    With workers > 1, processes decompress and crop slabs while this one writes them in order:
    the file is the same for any number of workers.
    """
    if os.path.exists(dst_path) and not force:
        raise UserError(f"{dst_path}: already exists (use --force to replace it)")
    with open_source(src_path) as src:
        images, labels = check_schema(src, src_path, crop)
        validate_labels(labels, CLASS_NAMES, src_path)
        n = len(labels)
        step = slab_rows(images)
        starts = range(0, n, step)
        jobs = ((src_path, start, start + step, crop, resize) for start in starts)
        slabs = in_order(read_slab, jobs, min(workers, len(starts)))
        columns = {c: src[c][()] for c in OPTIONAL_COLUMNS if c in src and src[c].shape[:1] == (n,)}
        provenance = {
            "source_name": Path(src_path).name,
            "source_bytes": os.path.getsize(src_path),
            "source_shape": images.shape,
            "crop": crop,
            "resize": resize or crop,
        }
        tracked = track(slabs, len(starts), f"prepare {Path(src_path).name}")
        try:
            write_prepared(dst_path, tracked, labels, resize or crop, CLASS_NAMES, seed, columns, provenance)
        finally:
            if src_path in _open_sources:  # read here, with workers=1
                _open_sources.pop(src_path).close()
