"""The prepared file, both ways: its format version and split names, the writer `prepare` uses
and the reader every rank uses.

A prepared file holds every image once, contiguous and unfiltered, so that each rank and loader
worker maps the same bytes with `np.memmap`: one copy in the page cache, none per process.
Kept free of torch: prepare's worker processes import this module, and torch would cost each of
them seconds and ~100 MB.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import h5py
import numpy as np

from .. import __version__
from ..atomic import atomic_path
from ..errors import UserError
from .fits import FitsStretch

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = {"val": 0.15, "test": 0.15}
SLAB_BYTES = 64 * 2**20  # decoded pixels read or written at a time


@dataclass(frozen=True)
class PreparedInfo:
    """What a prepared file says about itself; read once, small, picklable."""

    path: str
    offset: int
    shape: tuple[int, int, int, int]
    labels: np.ndarray
    splits: dict[str, np.ndarray]
    class_names: tuple[str, ...]
    class_weights: np.ndarray
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop: int  # side of the source's central square that became image_size
    checksum: str | None = None  # blake2b of the images' bytes (files prepared since it was recorded)
    fits: FitsStretch | None = None  # how FITS cutouts became these pixels (None: not from FITS)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return self.shape[1]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))


def read_prepared(path: str | os.PathLike) -> PreparedInfo:
    """Open and check a prepared file: format version, contiguous layout, shapes. A truncated
    file is refused by HDF5 itself at open (its end-of-file check)."""
    path = str(path)
    if not os.path.exists(path):
        raise UserError(f"{path}: prepared data file not found (make it with `python -m galaxydist.prepare`)")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise UserError(f"{path}: not a readable HDF5 file ({err})") from None
    with f:
        version = f.attrs.get("galaxydist_format")
        if version is None:
            raise UserError(f"{path}: not a prepared galaxydist file (run `python -m galaxydist.prepare`)")
        if int(version) != FORMAT_VERSION:
            raise UserError(f"{path}: prepared with format {version}, this version reads {FORMAT_VERSION}")
        images = f["images"]
        if images.chunks is not None or images.compression is not None:
            raise UserError(f"{path}: 'images' is chunked or compressed, cannot be memory-mapped; re-prepare")
        offset = images.id.get_offset()
        if offset is None:
            raise UserError(f"{path}: 'images' was never written")
        shape = tuple(int(s) for s in images.shape)
        labels = f["labels"][()].astype(np.int64)
        splits = {name: f["splits"][name][()].astype(np.int64) for name in SPLITS}
        class_names = tuple(str(n) for n in f.attrs["class_names"])
        info = PreparedInfo(
            path=path,
            offset=int(offset),
            shape=shape,  # type: ignore[arg-type]
            labels=labels,
            splits=splits,
            class_names=class_names,
            class_weights=f["class_weights"][()].astype(np.float64),
            mean=tuple(float(v) for v in f.attrs["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in f.attrs["std"]),  # type: ignore[arg-type]
            crop=int(f.attrs.get("crop", shape[1])),
            checksum=str(f.attrs["images_blake2b"]) if "images_blake2b" in f.attrs else None,
            fits=FitsStretch.from_attrs(f.attrs),
        )
    if len(labels) != shape[0] or labels.min(initial=0) < 0 or labels.max(initial=0) >= len(class_names):
        raise UserError(f"{path}: labels do not match the images or the class list; re-prepare")
    for name, rows in splits.items():
        if len(rows) and (rows.min() < 0 or rows.max() >= shape[0]):
            raise UserError(f"{path}: split {name!r} indexes past the images; re-prepare")
    return info


def stratified_split(labels: np.ndarray, num_classes: int, seed: int) -> dict[str, np.ndarray]:
    """70/15/15 within each class (rounded, at least one per split), as sorted row indices."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for c in range(num_classes):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_val, n_test = (max(1, round(frac * len(rows))) for frac in SPLIT_FRACTIONS.values())
        parts["val"].append(rows[:n_val])
        parts["test"].append(rows[n_val : n_val + n_test])
        parts["train"].append(rows[n_val + n_test :])
    return {name: np.sort(np.concatenate(p)).astype(np.int64) for name, p in parts.items()}


def class_weights(train_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """w_c = N / (K · N_c): each class contributes equally to the weighted loss."""
    counts = np.bincount(train_labels, minlength=num_classes).astype(np.float64)
    return len(train_labels) / (num_classes * counts)


def validate_labels(labels: np.ndarray, class_names: Sequence[str], source: str) -> None:
    """Labels in range, and every class large enough to appear in train, val and test."""
    k = len(class_names)
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        bad = labels[(labels < 0) | (labels >= k)][0]
        raise UserError(f"{source}: label {bad} is outside [0, {k}) for {k} classes")
    counts = np.bincount(labels, minlength=k)
    for c, n in enumerate(counts):
        if n < len(SPLITS):
            raise UserError(
                f"{source}: class {c} ({class_names[c]}) has {n} images; "
                f"each class needs at least {len(SPLITS)} to appear in every split"
            )


def write_prepared(
    dst_path: str,
    slabs: Iterable[np.ndarray],
    labels: np.ndarray,
    size: int,
    class_names: Sequence[str],
    seed: int,
    columns: dict[str, np.ndarray],
    provenance: dict[str, object],
) -> None:
    """Write the prepared file from image slabs in row order: split, weights and statistics too.

    Atomic: DST appears complete or not at all.
    """
    n, k = len(labels), len(class_names)
    splits = stratified_split(labels, k, seed)
    is_train = np.zeros(n, dtype=bool)
    is_train[splits["train"]] = True
    # Per-channel histograms of the training pixels give exact integer sums (float64 sums of the
    # pixels were exact too, but took as long as decoding the source).
    histogram = np.zeros((3, 256), dtype=np.int64)
    digest = hashlib.blake2b(
        digest_size=16
    )  # of the images' bytes in row order: staged copies are checked on it
    with atomic_path(dst_path) as tmp, h5py.File(tmp, "w") as dst:
        out = dst.create_dataset("images", shape=(n, size, size, 3), dtype=np.uint8)
        start = 0
        for slab in slabs:
            out[start : start + len(slab)] = slab
            digest.update(np.ascontiguousarray(slab).data)
            train_pixels = slab[is_train[start : start + len(slab)]].reshape(-1, 3)
            for channel in range(3):
                histogram[channel] += np.bincount(train_pixels[:, channel], minlength=256)
            start += len(slab)
        if start != n:
            raise UserError(f"{dst_path}: {start} images written for {n} labels")
        dst.create_dataset("labels", data=labels.astype(np.int64))
        for name, rows in splits.items():
            dst.create_dataset(f"splits/{name}", data=rows)
            dst.create_dataset(f"class_counts/{name}", data=np.bincount(labels[rows], minlength=k))
        dst.create_dataset("class_weights", data=class_weights(labels[splits["train"]], k))
        for name, values in columns.items():
            dst.create_dataset(name, data=values)
        levels = np.arange(256, dtype=np.int64)
        channel_sum = (histogram @ levels).astype(np.float64)
        channel_sq = (histogram @ levels**2).astype(np.float64)
        pixels = len(splits["train"]) * size * size
        mean = channel_sum / pixels / 255.0
        std = np.sqrt(np.maximum(channel_sq / pixels / 255.0**2 - mean**2, 1e-12))
        dst.attrs.update(
            galaxydist_format=FORMAT_VERSION,
            galaxydist_version=__version__,
            class_names=np.array(list(class_names), dtype=h5py.string_dtype()),
            mean=mean,
            std=std,
            seed=seed,
            images_blake2b=digest.hexdigest(),
            **provenance,
        )
