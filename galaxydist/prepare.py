"""Turn a Galaxy10-format HDF5 file, or an image folder with a labels CSV, into the prepared file.

    python -m galaxydist.prepare SRC.h5 DST.h5 --crop 128 [--resize S] [--seed 0] [--force] [--workers N]
    python -m galaxydist.prepare --images DIR --labels labels.csv DST.h5 --crop C [--resize S]
        [--classes classes.txt] [--label-map "2:1"] [--skip-bad] [--workers N]   (see data/folder.py)
        [--fits-bands I,J,K] [--fits-stretch lupton|asinh] [--fits-scales B,G,R] [--fits-q Q]
        [--fits-stretch-param S]                              (FITS cutouts: see data/fits.py)

The source is read in slabs aligned to its chunks (memory bounded whatever N is); the output is
written to a temporary file and renamed into place, so DST is either absent or complete.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .data import fits
from .data.folder import prepare_folder
from .data.format import read_prepared
from .data.galaxy10 import prepare
from .errors import UserError, run_cli
from .pool import default_workers

FITS_OPTIONS = ("fits_bands", "fits_stretch", "fits_scales", "fits_q", "fits_stretch_param")
FOLDER_OPTIONS = ("labels", "classes", "label_map", "skip_bad", *FITS_OPTIONS)


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
    folder.add_argument("--images", metavar="DIR", help="folder of JPEG/PNG images or FITS cutouts")
    folder.add_argument("--labels", metavar="CSV", help="id or file column, and a label column")
    folder.add_argument(
        "--classes", metavar="TXT", help="class names, one per line (integer label i = line i)"
    )
    folder.add_argument("--label-map", metavar="OLD:NEW,...", help='rewrite CSV labels first, e.g. "2:1"')
    folder.add_argument("--skip-bad", action="store_true", help="leave out missing or unreadable images")
    cutouts = parser.add_argument_group("FITS cutouts (recorded in DST and the checkpoint; see data/fits.py)")
    cutouts.add_argument(
        "--fits-bands",
        metavar="I,J,K",
        help="three planes, blue to red (the reddest becomes R), numbered through the file: a cube's "
        "bands, one per 2-D image HDU (default auto: the first HDU's cube, else every plane; 3 of them)",
    )
    cutouts.add_argument(
        "--fits-stretch",
        metavar="NAME",
        help="lupton (default: astropy make_lupton_rgb, colours kept) or asinh (the same curve per band)",
    )
    cutouts.add_argument(
        "--fits-scales", metavar="S1,S2,S3", help="per-band flux multipliers, in --fits-bands order (1,1,1)"
    )
    cutouts.add_argument("--fits-q", metavar="Q", help="asinh softening Q (default 8)")
    cutouts.add_argument(
        "--fits-stretch-param", metavar="S", help="linear stretch, astropy's `stretch` (default 0.5)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="decoding processes; the output is the same for any number (default: usable CPUs, at most 8)",
    )
    args = parser.parse_args(argv)
    stretch = fits.from_options(*(getattr(args, name) for name in FITS_OPTIONS))
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
    report = prepare_folder(
        args.images, args.labels, args.dst, args.crop, args.resize, args.classes, args.label_map,
        args.skip_bad, args.workers, args.seed, args.force, stretch,
    )  # fmt: skip
    print("\n".join([*report.lines(), summary(args.dst)]))
    return 0


def summary(path: str) -> str:
    """A short description of a prepared file: sizes, splits and class balance."""
    info = read_prepared(path)
    lines = [f"{path}: {info.shape[0]} images {info.shape[1]}×{info.shape[2]}×3, {info.num_classes} classes"]
    for name, rows in info.splits.items():
        counts = np.bincount(info.labels[rows], minlength=info.num_classes)
        lines.append(f"  {name:5s} {len(rows):6d}  per class {counts.tolist()}")
    if info.fits:
        lines.append(f"  from FITS cutouts: {info.fits.describe()}")
    return "\n".join(lines)


def cli() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
