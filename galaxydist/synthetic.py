"""A synthetic stand-in for Galaxy10_DECals.h5, so the pipeline can be built and tested without the real file.

Same layout and class proportions as the real release. Every nuisance (position angle, size, flux, colour,
sky, noise, PSF, foreground stars) is drawn independently of the class, and each galaxy's per-channel flux is
normalised to a class-independent draw, so only the *shape* of the light tells the ten classes apart.
"""

from __future__ import annotations

import argparse
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import numpy as np

from galaxydist.atomic import atomic_path
from galaxydist.data.galaxy10 import CLASS_COUNTS, IMAGES_KEY, LABELS_KEY
from galaxydist.errors import UserError, run_cli
from galaxydist.pool import default_workers, in_order
from galaxydist.progress import track

REAL_N = sum(CLASS_COUNTS)  # 17,736
PXSCALE = 0.262  # DECaLS arcsec per pixel
F32 = np.float32
GZIP_LEVEL = 1  # the real file uses 4; 1 is much faster on noisy images and only slightly larger
STRETCH = F32(0.25)  # asinh softening relative to the peak: bright cores saturate, faint arms stay visible
# Relative RGB colours of the components; each image is renormalised per channel afterwards, so these only
# set colour *gradients* (yellow cores, blue arms), never the mean colour.
BULGE, DISK, ARMS = (1.0, 0.82, 0.55), (0.85, 0.88, 1.0), (0.6, 0.8, 1.3)


@dataclass(frozen=True)
class Geo:
    """Per-image nuisance geometry of a batch, in frame units (the frame spans [-0.5, 0.5))."""

    g: np.ndarray  # (S,) pixel-centre coordinates
    cx: np.ndarray  # (B,) centre
    cy: np.ndarray
    pa: np.ndarray  # (B,) position angle, radians
    h: np.ndarray  # (B,) scale length
    psf: np.ndarray  # (B,) PSF Gaussian sigma

    def take(self, idx: np.ndarray) -> Geo:
        """The geometry of a subset of the batch (one class), on the same pixel grid."""
        return replace(self, **{k: getattr(self, k)[idx] for k in ("cx", "cy", "pa", "h", "psf")})


def _c(a: np.ndarray | float) -> np.ndarray:
    """A per-image scalar as a (B, 1, 1) float32 array that broadcasts over the pixel grid."""
    return np.asarray(a, F32).reshape(-1, 1, 1)


Offset = np.ndarray | float


def _frame(geo: Geo, dx: Offset = 0.0, dy: Offset = 0.0, dpa: Offset = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (u along the major axis, v along the minor axis), centred and rotated per image."""
    x, y = geo.g[None, None, :] - _c(geo.cx + dx), geo.g[None, :, None] - _c(geo.cy + dy)
    cos, sin = _c(np.cos(geo.pa + dpa)), _c(np.sin(geo.pa + dpa))
    return x * cos + y * sin, y * cos - x * sin


def _radius(u: np.ndarray, v: np.ndarray, q: np.ndarray, psf: np.ndarray) -> np.ndarray:
    """Elliptical radius with the PSF width added in quadrature: a cheap stand-in for convolution."""
    return np.sqrt(u * u + (v / _c(q)) ** 2 + _c(psf) ** 2)


def _sersic4(r: np.ndarray, re: np.ndarray) -> np.ndarray:
    """De Vaucouleurs (Sersic n=4) profile: the cuspy light of ellipticals and bulges."""
    return np.exp(-7.67 * np.sqrt(np.sqrt(r / _c(re))))


def _arms(
    u: np.ndarray,
    v: np.ndarray,
    q: Offset,
    r: np.ndarray,
    rin: np.ndarray,
    pitch: np.ndarray,
    phase: np.ndarray,
    sharp: int,
) -> np.ndarray:
    """Two logarithmic spiral arms in the disk plane, starting at radius `rin` and angle `phase`."""
    phi = np.arctan2(v / _c(q), u)
    wave = 0.5 + 0.5 * np.cos(2 * (phi - _c(phase) - np.log(r / _c(rin)) / _c(np.tan(pitch))))
    r8 = (r / _c(rin)) ** 8
    return wave**sharp * r8 / (1 + r8)


def _blobs(g: np.ndarray, x0: np.ndarray, y0: np.ndarray, w: np.ndarray, amp: np.ndarray) -> np.ndarray:
    """K circular Gaussians per image, (B, K) positions and (B, K, C) amplitudes -> (B, C, S, S).

    Gaussians are separable, so the sum is one batched matmul instead of K full-frame exponentials.
    """
    gx = np.exp(-0.5 * ((g - x0[..., None]) / w[..., None]) ** 2).astype(F32)  # (B, K, S)
    gy = np.exp(-0.5 * ((g - y0[..., None]) / w[..., None]) ** 2).astype(F32)
    b, k, s = gx.shape
    left = (amp[..., None].astype(F32) * gy[:, :, None, :]).reshape(b, k, -1).transpose(0, 2, 1)
    return (left @ gx).reshape(b, -1, s, s)


def _paint(*parts: tuple[np.ndarray, np.ndarray | float, tuple[float, float, float]]) -> np.ndarray:
    """Linear RGB planes (B, 3, S, S) from (profile, weight, colour) parts, each profile of unit flux."""
    out = np.zeros((3, *parts[0][0].shape), F32)
    for prof, weight, colour in parts:
        prof = prof * (_c(weight) / prof.sum(axis=(1, 2), keepdims=True))
        for plane, col in zip(out, colour, strict=True):
            plane += col * prof
    return out.transpose(1, 0, 2, 3)


def _elliptical(rng: np.random.Generator, geo: Geo, qlo: float, qhi: float) -> np.ndarray:
    """Smooth elliptical; equal-area sizing makes flatter ones longer, as in the real classes."""
    q = rng.uniform(qlo, qhi, len(geo.h))
    u, v = _frame(geo)
    return _paint((_sersic4(_radius(u, v, q, geo.psf), 1.7 * geo.h / np.sqrt(q)), 1.0, BULGE))


def _spiral(
    rng: np.random.Generator, geo: Geo, pitch_deg: tuple[float, float], bulge: tuple[float, float], bar: bool
) -> np.ndarray:
    """Bulge + exponential disk + two spiral arms (from the bar ends when barred), seen at an inclination."""
    b = len(geo.h)
    q, pitch, bt = rng.uniform(0.45, 1.0, b), np.radians(rng.uniform(*pitch_deg, b)), rng.uniform(*bulge, b)
    u, v = _frame(geo)
    r = _radius(u, v, q, geo.psf)
    phase, rin = rng.uniform(0, 2 * np.pi, b), geo.h * rng.uniform(0.6, 1.0, b)
    parts = [
        (_sersic4(_radius(u, v, 0.9, geo.psf), 0.6 * geo.h), bt, BULGE),
        (np.exp(-r / _c(geo.h)), 0.3, DISK),
    ]
    if bar:
        rin = geo.h * rng.uniform(1.3, 2.0, b)
        bu, bv = _frame(geo, dpa=np.arctan2(q * np.sin(phase), np.cos(phase)))  # bar along the arm phase
        length = _c(rin * np.hypot(np.cos(phase), q * np.sin(phase)))
        blen, bwid = np.sqrt(length**2 + _c(geo.psf) ** 2), np.sqrt((0.18 * length) ** 2 + _c(geo.psf) ** 2)
        parts.append((np.exp(-((bu / blen) ** 4) - (bv / bwid) ** 2), 0.4, BULGE))
    arm = _arms(u, v, q, r, rin, pitch, phase, sharp=3) * np.exp(-r / _c(1.4 * geo.h))
    return _paint(*parts, (arm, 0.55 - 0.5 * bt, ARMS))


def _edge_on(rng: np.random.Generator, geo: Geo, bulge: bool) -> np.ndarray:
    """Thin edge-on disk (a very flat exponential, optional dust lane), with or without a bulge."""
    b = len(geo.h)
    q, length = rng.uniform(0.1, 0.2, b), 1.4 * geo.h
    u, v = _frame(geo)
    lane_w = np.hypot(0.4 * q * length, geo.psf)  # a blurred lane is wider and shallower
    lane_depth = rng.uniform(0, 0.7, b) * 0.4 * q * length / lane_w
    lane = 1 - _c(lane_depth) * np.exp(-0.5 * ((v - _c(0.3 * q * length)) / _c(lane_w)) ** 2)
    disk = np.exp(-_radius(u, v, q, geo.psf) / _c(length)) * lane
    if not bulge:
        return _paint((disk, 1.0, DISK))
    bulge_prof = _sersic4(_radius(u, v, rng.uniform(0.7, 0.95, b), geo.psf), geo.h * rng.uniform(0.8, 1.4, b))
    return _paint((disk, 1.0, DISK), (bulge_prof, rng.uniform(0.3, 0.8, b), BULGE))


def _disturbed(rng: np.random.Generator, geo: Geo) -> np.ndarray:
    """Irregular galaxy: an off-centre nucleus, a lopsided disk and blue clumps scattered to one side."""
    b, k = len(geo.h), 7
    side = rng.uniform(0, 2 * np.pi, b)
    u, v = _frame(geo)
    r = _radius(u, v, rng.uniform(0.4, 1.0, b), geo.psf)
    lopsided = 1 + 0.8 * (u * _c(np.cos(side)) + v * _c(np.sin(side))) / r
    ang = (geo.pa + side)[:, None] + rng.normal(0, 0.9, (b, k))  # clumps on the lopsided side
    dist = geo.h[:, None] * rng.uniform(0.3, 3.0, (b, k))
    x0, y0 = geo.cx[:, None] + dist * np.cos(ang), geo.cy[:, None] + dist * np.sin(ang)
    w = np.hypot(geo.h[:, None] * rng.uniform(0.3, 0.8, (b, k)), geo.psf[:, None])
    clumps = _blobs(geo.g, x0, y0, w, rng.uniform(0.2, 1.0, (b, k, 1)))[:, 0]
    nucleus = _sersic4(_radius(*_frame(geo, *(0.4 * geo.h * rng.normal(size=(2, b)))), 0.8, geo.psf), geo.h)
    disk = np.exp(-r / _c(1.3 * geo.h)) * lopsided
    return _paint((disk, 0.55, DISK), (clumps, 0.35, ARMS), (nucleus, rng.uniform(0.05, 0.2, b), BULGE))


def _merging(rng: np.random.Generator, geo: Geo) -> np.ndarray:
    """Two overlapping galaxies with a pair of tidal tails wrapped around them."""
    b = len(geo.h)
    sep, ang, ratio = geo.h * rng.uniform(1.5, 3.5, b), rng.uniform(0, 2 * np.pi, b), rng.uniform(0.3, 1.0, b)
    dx, dy = 0.5 * sep * np.cos(ang), 0.5 * sep * np.sin(ang)
    parts = []
    for sign, weight in ((1, 1.0), (-1, ratio)):
        small = replace(geo, h=geo.h * np.sqrt(weight) * 0.6)
        u, v = _frame(small, sign * dx, sign * dy, rng.uniform(0, np.pi, b))
        r = _radius(u, v, rng.uniform(0.5, 1.0, b), geo.psf)
        parts += [(_sersic4(r, small.h), 0.6 * weight, BULGE), (np.exp(-r / _c(small.h)), 0.4 * weight, DISK)]
    u, v = _frame(geo)
    r = _radius(u, v, 1.0, geo.psf)
    tails = _arms(u, v, 1.0, r, sep, np.radians(rng.uniform(20, 35, b)), ang, sharp=6)
    tails *= np.exp(-r / _c(2 * sep))
    return _paint(*parts, (tails, rng.uniform(0.15, 0.35, b), DISK))


CLASSES: tuple[Callable[[np.random.Generator, Geo], np.ndarray], ...] = (
    _disturbed,
    _merging,
    lambda rng, geo: _elliptical(rng, geo, 0.85, 1.0),
    lambda rng, geo: _elliptical(rng, geo, 0.5, 0.75),
    lambda rng, geo: _elliptical(rng, geo, 0.2, 0.35),
    lambda rng, geo: _spiral(rng, geo, (15, 25), (0.1, 0.25), bar=True),
    lambda rng, geo: _spiral(rng, geo, (10, 16), (0.3, 0.5), bar=False),
    lambda rng, geo: _spiral(rng, geo, (25, 40), (0.03, 0.12), bar=False),
    lambda rng, geo: _edge_on(rng, geo, bulge=False),
    lambda rng, geo: _edge_on(rng, geo, bulge=True),
)


def draw_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    """Labels in the real class proportions: rounded expected counts, fixed up to sum to n, shuffled."""
    expected = np.asarray(CLASS_COUNTS) * n / REAL_N
    counts = np.round(expected).astype(np.int64)
    diff = n - counts.sum()
    order = np.argsort(counts - expected if diff > 0 else expected - counts)  # most under-/over-rounded first
    counts[order[: abs(diff)]] += np.sign(diff)
    labels = np.repeat(np.arange(len(CLASS_COUNTS), dtype=np.uint8), counts)
    rng.shuffle(labels)
    return labels


def render(labels: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Render one uint8 image (len, size, size, 3) per label; nuisances are drawn independently of class."""
    b = len(labels)
    geo = Geo(
        g=((np.arange(size) + 0.5) / size - 0.5).astype(F32),
        cx=rng.normal(0, 0.02, b),
        cy=rng.normal(0, 0.02, b),
        pa=rng.uniform(0, np.pi, b),
        h=np.exp(rng.uniform(np.log(0.025), np.log(0.06), b)),
        psf=rng.uniform(3.5, 6.5, b) / 2.355 / 256,  # FWHM 0.9"-1.7" at 256 px of 0.262"
    )
    img = np.empty((b, 3, size, size), F32)  # channel-first: per-channel work on contiguous planes
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        img[idx] = CLASSES[c](rng, geo.take(idx))
    img *= 1 / (STRETCH * img.max(axis=(1, 2, 3), keepdims=True))
    np.arcsinh(img, out=img)
    # Per-channel flux = size-dependent surface brightness x colour gain (red-ish to blue-ish), class-blind.
    tint = rng.uniform(-1, 1, b)[:, None]
    gain = 1 + tint * np.array([0.25, 0.0, -0.3]) + rng.normal(0, 0.05, (b, 3))
    flux = rng.uniform(3, 9, b)[:, None] * (geo.h[:, None] / 0.04) ** 2 * gain * size * size
    sky = rng.uniform(25, 42, b)[:, None] + rng.normal(0, 1, (b, 3)) + 0.5  # +0.5: round, don't floor
    img *= (flux / img.sum(axis=(2, 3)))[..., None, None].astype(F32)
    img += sky[..., None, None].astype(F32)
    noise = rng.standard_normal(img.shape, dtype=F32)
    noise *= _c(rng.uniform(3, 9, b))[..., None]
    img += noise
    k = 6  # star slots per image; unused slots get zero amplitude
    amp = np.exp(rng.uniform(np.log(15), np.log(300), (b, k))) * (np.arange(k) < rng.poisson(4.0, (b, 1)))
    x0, y0 = rng.uniform(-0.5, 0.5, (2, b, k))
    colour = 1 + rng.uniform(-1, 1, (b, k, 1)) * np.array([0.4, 0.0, -0.4])
    img += _blobs(geo.g, x0, y0, np.repeat(geo.psf[:, None], k, axis=1), amp[..., None] * colour)
    np.clip(img, 0, 255, out=img)
    return img.transpose(0, 2, 3, 1).astype(np.uint8)


def _render_slab(labels: np.ndarray, seed: np.random.SeedSequence, size: int, level: int) -> list[bytes]:
    """One slab of images, each deflated as one HDF5 chunk (the gzip filter's own format)."""
    images = render(labels, np.random.default_rng(seed), size)
    return [zlib.compress(image.tobytes(), level) for image in images]


def generate(
    path: str | Path, n: int, seed: int = 0, size: int = 256, slab: int = 128, workers: int = 1
) -> None:
    """Write a synthetic Galaxy10_DECals.h5 atomically, rendering `slab` images at a time to bound memory.

    The file is a pure function of (n, seed, size, slab), whatever `workers`: labels, columns and
    each slab's pixels use their own seed streams. Workers render and compress slabs; this process
    writes the compressed chunks in order, at most two slabs per worker in flight.
    """
    label_seed, meta_seed, image_seed = np.random.SeedSequence(seed).spawn(3)
    labels = draw_labels(n, np.random.default_rng(label_seed))
    meta_rng = np.random.default_rng(meta_seed)
    columns = {
        "ra": meta_rng.uniform(0, 360, n),
        "dec": np.degrees(np.arcsin(meta_rng.uniform(np.sin(np.radians(-30)), np.sin(np.radians(80)), n))),
        "redshift": np.clip(meta_rng.lognormal(np.log(0.05), 0.5, n), 0.01, 0.15),
        "pxscale": np.full(n, PXSCALE),
    }
    starts = range(0, n, slab)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        images = f.create_dataset(
            IMAGES_KEY, (n, size, size, 3), np.uint8, chunks=(1, size, size, 3), compression="gzip",
            compression_opts=GZIP_LEVEL,
        )  # fmt: skip
        f.create_dataset(LABELS_KEY, data=labels)
        for name, col in columns.items():
            f.create_dataset(name, data=col.astype(np.float64))
        slab_seeds = image_seed.spawn(len(starts))
        jobs = ((labels[i : i + slab], s, size, GZIP_LEVEL) for i, s in zip(starts, slab_seeds, strict=True))
        slabs = track(in_order(_render_slab, jobs, workers), len(starts), "synthetic")
        for start, chunks in zip(starts, slabs, strict=True):
            _write_chunks(images, start, chunks)


def _write_chunks(images: h5py.Dataset, start: int, chunks: list[bytes]) -> None:
    for i, chunk in enumerate(chunks):
        images.id.write_direct_chunk((start + i, 0, 0, 0), chunk)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and write the file; bad input is a UserError (exit 2)."""
    parser = argparse.ArgumentParser(prog="galaxydist-synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output .h5 file")
    parser.add_argument("--n", type=int, default=REAL_N, help="number of images (default: the real 17,736)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (real: 256)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    parser.add_argument(
        "--workers", type=int, default=default_workers(),
        help="rendering processes (the file is the same for any number; default: usable CPUs, at most 8)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.size < 16:
        raise UserError(f"--size must be at least 16, got {args.size}")
    if args.out.is_dir():
        raise UserError(f"{args.out} is a directory")
    if args.out.exists() and not args.force:
        raise UserError(f"{args.out} exists; pass --force to overwrite it")
    generate(args.out, args.n, seed=args.seed, size=args.size, workers=args.workers)
    print(f"wrote {args.n} synthetic images ({args.size}px) to {args.out}", file=sys.stderr)
    return 0


def cli() -> None:
    """Console-script entry point."""
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
