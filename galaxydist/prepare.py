"""Turn a Galaxy10-format HDF5 file, or an image folder with a labels CSV, into the prepared file.

    python -m galaxydist.prepare SRC.h5 DST.h5 --crop 128 [--resize S] [--seed 0] [--force] [--workers N]
    python -m galaxydist.prepare --images DIR --labels labels.csv DST.h5 --crop C [--resize S]
        [--classes classes.txt] [--label-map "2:1"] [--skip-bad] [--workers N]   (see folder.py)

The source is read in slabs aligned to its chunks (memory bounded whatever N is); the output is
written to a temporary file and renamed into place, so DST is either absent or complete.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .atomic import atomic_path
from .errors import UserError, run_cli
from .galaxy10 import CLASS_NAMES, IMAGES_KEY, LABELS_KEY, OPTIONAL_COLUMNS
from .layout import FORMAT_VERSION, SPLITS
from .pool import default_workers, in_order
from .progress import track

SPLIT_FRACTIONS = {"val": 0.15, "test": 0.15}
SLAB_BYTES = 64 * 2**20


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


def centre_square(images: np.ndarray, crop: int, resize: int | None) -> np.ndarray:
    """Central crop×crop of N×H×W×3 uint8 images, then an antialiased resize to resize×resize."""
    height, width = images.shape[1:3]
    top, left = (height - crop) // 2, (width - crop) // 2
    square = images[:, top : top + crop, left : left + crop, :]
    if resize is None or resize == crop:
        return np.ascontiguousarray(square)
    import torch  # here only: prepare's workers need no torch unless they resize
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(square)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(resize, resize), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


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
    with atomic_path(dst_path) as tmp, h5py.File(tmp, "w") as dst:
        out = dst.create_dataset("images", shape=(n, size, size, 3), dtype=np.uint8)
        start = 0
        for slab in slabs:
            out[start : start + len(slab)] = slab
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
            **provenance,
        )


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


FOLDER_OPTIONS = ("labels", "classes", "label_map", "skip_bad")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m galaxydist.prepare", description=__doc__.splitlines()[0])
    parser.add_argument(
        "src",
        nargs="?",
        metavar="SRC.h5",
        help="Galaxy10-format HDF5 (images, ans[, ra, dec, redshift, pxscale]); not with --images",
    )
    parser.add_argument("dst", metavar="DST.h5", help="prepared output file")
    parser.add_argument("--crop", type=int, help="side of the central square to keep (Galaxy10 default 128)")
    parser.add_argument("--resize", type=int, help="resize the crop to this side (antialiased)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    parser.add_argument("--force", action="store_true", help="replace an existing DST")
    folder = parser.add_argument_group("from an image folder (instead of SRC.h5)")
    folder.add_argument("--images", metavar="DIR", help="folder of JPEG/PNG images")
    folder.add_argument("--labels", metavar="CSV", help="id or file column, and a label column")
    folder.add_argument(
        "--classes", metavar="TXT", help="class names, one per line (integer label i = line i)"
    )
    folder.add_argument("--label-map", metavar="OLD:NEW,...", help='rewrite CSV labels first, e.g. "2:1"')
    folder.add_argument("--skip-bad", action="store_true", help="leave out missing or unreadable images")
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="decoding processes; the output is the same for any number (default: usable CPUs, at most 8)",
    )
    args = parser.parse_args(argv)
    if args.resize is not None and args.resize < 1:
        raise UserError(f"--resize {args.resize}: must be a positive size")
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be at least 1")
    if args.images is None:
        given = [
            f"--{name.replace('_', '-')}"
            for name in FOLDER_OPTIONS
            if getattr(args, name) not in (None, False)
        ]
        if given:
            raise UserError(f"{given[0]} goes with --images DIR (the image-folder form)")
        if args.src is None:
            raise UserError("give SRC.h5 DST.h5, or --images DIR --labels CSV DST.h5")
        if Path(args.src).resolve() == Path(args.dst).resolve():
            raise UserError(f"{args.dst}: the output would overwrite the source")
        crop = 128 if args.crop is None else args.crop
        prepare(args.src, args.dst, crop, args.seed, args.force, args.resize, args.workers)
        print(summary(args.dst))
        return 0
    if args.src is not None:
        raise UserError(f"{args.src}: give either SRC.h5 or --images DIR, not both")
    if args.labels is None or args.crop is None:
        raise UserError("--images DIR needs --labels CSV and --crop C (images come in any size)")
    from .folder import prepare_folder  # folder builds on this module

    report = prepare_folder(
        args.images, args.labels, args.dst, args.crop, args.resize, args.classes, args.label_map,
        args.skip_bad, args.workers, args.seed, args.force,
    )  # fmt: skip
    print("\n".join([*report.lines(), summary(args.dst)]))
    return 0


def summary(path: str) -> str:
    """A short description of a prepared file: sizes, splits and class balance."""
    from .data import read_prepared

    info = read_prepared(path)
    lines = [f"{path}: {info.shape[0]} images {info.shape[1]}×{info.shape[2]}×3, {info.num_classes} classes"]
    for name, rows in info.splits.items():
        counts = np.bincount(info.labels[rows], minlength=info.num_classes)
        lines.append(f"  {name:5s} {len(rows):6d}  per class {counts.tolist()}")
    return "\n".join(lines)


def cli() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
