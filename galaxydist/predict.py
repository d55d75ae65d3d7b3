"""Classify new galaxy images with a trained checkpoint.

    python -m galaxydist.predict CHECKPOINT_or_RUN_DIR INPUTS... [--out preds.csv] [--tta]
                                 [--crop N] [--fit crop|resize]

INPUTS are image files (PNG, JPEG, anything Pillow reads; converted to RGB; FITS cutouts for a
model trained on them, through its recorded stretch) and Galaxy10-format HDF5 files (an `images`
dataset N×H×W×3 uint8: Galaxy10_DECals.h5, or a prepared file).

Geometry, as in training: every input goes through `prepare`'s own centre_square, so a survey
image gets exactly the pixels training saw. With the default `--fit crop` that is the central
C×C square (C = `--crop`, default: the checkpoint's crop, else its image size S), resized to
S×S (bilinear, antialiased) when C ≠ S, as `prepare --crop C --resize S` did. An input smaller
than C on a side is cut to its largest central square instead. `--fit resize` always takes the
largest central square, for cutouts that show the training field of view at another resolution.

Prints one line per input (the first 50) and writes a CSV: file, index (the row in an HDF5
file, empty for an image file), predicted class, class name, one probability column per class.
"""

from __future__ import annotations

import argparse
import csv
import io
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from torch import nn

from .allocator import keep_freed_memory
from .atomic import atomic_path, check_can_create
from .checkpoint import ModelMeta
from .data.galaxy10 import IMAGES_KEY
from .data.geometry import Geometry, read_image
from .errors import UserError, run_cli
from .inference.engine import load_model, mirror_swap, predict_proba
from .progress import track

HDF5_SUFFIXES = (".h5", ".hdf5")
CHUNK = 512  # images read, decoded and predicted together: bounded memory for any input size
PRINTED_ROWS = 50


@dataclass(frozen=True)
class Chunk:
    """Inputs predicted together: a group of image files, or rows [start, stop) of one HDF5 file."""

    files: tuple[Path, ...] = ()
    hdf5: Path | None = None
    start: int = 0
    stop: int = 0


def hdf5_images(path: Path) -> int:
    """Check an HDF5 input and return its number of images."""
    try:
        with h5py.File(path, "r") as f:
            if IMAGES_KEY not in f:
                raise UserError(f"{path}: no {IMAGES_KEY!r} dataset (Galaxy10 files hold 'images' and 'ans')")
            images = f[IMAGES_KEY]
            if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
                raise UserError(
                    f"{path}: 'images' is {images.dtype} {images.shape}, expected uint8 (N, H, W, 3)"
                )
            if not len(images):
                raise UserError(f"{path}: holds no images")
            return len(images)
    except OSError as err:
        raise UserError(f"{path}: not a readable HDF5 file ({err})") from None


def plan(inputs: list[str]) -> list[Chunk]:
    """Check every input before any work; cut them into chunks that keep the input order."""
    chunks: list[Chunk] = []
    files: list[Path] = []  # consecutive image files, grouped

    def flush() -> None:
        chunks.extend(Chunk(files=tuple(files[i : i + CHUNK])) for i in range(0, len(files), CHUNK))
        files.clear()

    for name in inputs:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"{path}: input not found")
        if path.suffix.lower() in HDF5_SUFFIXES:
            flush()
            n = hdf5_images(path)
            chunks.extend(Chunk(hdf5=path, start=i, stop=min(i + CHUNK, n)) for i in range(0, n, CHUNK))
        else:
            files.append(path)
    flush()
    return chunks


def load_chunk(chunk: Chunk, geometry: Geometry) -> tuple[list[tuple[str, str]], np.ndarray]:
    """(file, index) labels and uint8 N×3×S×S model inputs of one chunk."""
    if chunk.hdf5 is None:
        keys = [(str(path), "") for path in chunk.files]
        return keys, np.concatenate([geometry.apply(read_image(path, geometry.fits)) for path in chunk.files])
    with h5py.File(chunk.hdf5, "r") as f:
        slab = f[IMAGES_KEY][chunk.start : chunk.stop]
    keys = [(str(chunk.hdf5), str(i)) for i in range(chunk.start, chunk.stop)]
    return keys, geometry.apply(slab)


@dataclass(frozen=True)
class Job:
    """A prediction with everything checked: the model, the geometry and every input."""

    model: nn.Module
    meta: ModelMeta
    geometry: Geometry
    chunks: list[Chunk]


def checked_job(checkpoint: str, inputs: list[str], crop: int | None = None, fit: str = "crop") -> Job:
    model, meta = load_model(checkpoint)
    if crop is not None and crop < 1:
        raise UserError(f"--crop {crop}: must be a positive size")
    return Job(model, meta, Geometry(meta.image_size, crop or meta.crop, fit, meta.fits), plan(inputs))


def predict(job: Job, tta: bool = False) -> tuple[list[tuple[str, str]], np.ndarray, tuple[str, ...]]:
    """Labels (file, index), probabilities (N, K) and the class names, in input order."""
    keys: list[tuple[str, str]] = []
    probs = []
    meta = job.meta
    for chunk in track(job.chunks, len(job.chunks), "predict"):
        chunk_keys, images = load_chunk(chunk, job.geometry)
        keys += chunk_keys
        probs.append(
            predict_proba(
                job.model,
                images,
                meta.mean,
                meta.std,
                tta,
                meta.mirror_symmetric,
                description=None,
                swap=mirror_swap(meta),
            )
        )
    return keys, np.concatenate(probs), meta.class_names


def to_csv(keys: list[tuple[str, str]], probs: np.ndarray, class_names: tuple[str, ...]) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["file", "index", "predicted", "class_name", *(f"p_{name}" for name in class_names)])
    for (file, index), p in zip(keys, probs, strict=True):
        c = int(p.argmax())
        writer.writerow([file, index, c, class_names[c], *(f"{v:.6f}" for v in p)])
    return text.getvalue()


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    parser = argparse.ArgumentParser(
        prog="python -m galaxydist.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a .pt file or a run folder (its best.pt)")
    parser.add_argument("inputs", nargs="+", metavar="INPUTS", help="image files and/or Galaxy10-format .h5")
    parser.add_argument("--out", default="preds.csv", help="CSV to write (default: preds.csv)")
    parser.add_argument(
        "--tta",
        action="store_true",
        help="average over the symmetries of the square (rotations only if trained without flips)",
    )
    parser.add_argument(
        "--crop", type=int, help="side of the central square to cut (default: as in training)"
    )
    parser.add_argument("--fit", choices=("crop", "resize"), default="crop", help="geometry (see above)")
    args = parser.parse_args(argv)
    job = checked_job(args.checkpoint, args.inputs, args.crop, args.fit)
    check_can_create(args.out)  # after the inputs, before the work
    keys, probs, class_names = predict(job, args.tta)
    for (file, index), p in list(zip(keys, probs, strict=True))[:PRINTED_ROWS]:
        c = int(p.argmax())
        print(f"{file}{f'[{index}]' if index else ''}  {c} {class_names[c]}  p={p[c]:.3f}")
    if len(keys) > PRINTED_ROWS:
        print(f"… and {len(keys) - PRINTED_ROWS} more")
    with atomic_path(args.out) as tmp:
        tmp.write_text(to_csv(keys, probs, class_names))
    print(f"wrote {len(keys)} predictions to {args.out}")
    return 0


def cli() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
