"""Normalisation and augmentation on whole batches, on the device.

Each sample's random draws are a hash of (seed, epoch, file row): the same image gets the same
flip and angle whatever the world size, worker count or batch it lands in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash (SplitMix64 finaliser); uint64 arithmetic wraps by definition."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def uniforms(seed: int, epoch: int, rows: np.ndarray, count: int) -> np.ndarray:
    """`count` uniforms in [0, 1) per row, a pure function of (seed, epoch, row)."""
    key = _splitmix64(np.uint64(seed) * np.uint64(1_000_003) + np.uint64(epoch))
    base = _splitmix64(rows.astype(np.uint64) ^ key)
    draws = _splitmix64(base[:, None] + np.arange(1, count + 1, dtype=np.uint64)[None, :])
    return (draws >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def normalise(
    images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """uint8 N×C×H×W → (x/255 − mean)/std in `dtype`."""
    return (images.to(dtype) / 255.0 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def augment(
    images: torch.Tensor, draws: torch.Tensor, hflip: float, vflip: float, rotate: float
) -> torch.Tensor:
    """Random flips and a rotation uniform in [-rotate, rotate] degrees, as one resampling.

    `draws` is N×3 uniforms (from `uniforms`), on the images' device.
    """
    x_sign = torch.where(draws[:, 0] < hflip, -1.0, 1.0)
    y_sign = torch.where(draws[:, 1] < vflip, -1.0, 1.0)
    if rotate == 0:
        flip_x, flip_y = x_sign < 0, y_sign < 0
        images = torch.where(flip_x.view(-1, 1, 1, 1), images.flip(3), images)
        return torch.where(flip_y.view(-1, 1, 1, 1), images.flip(2), images)
    angle = (draws[:, 2] * 2 - 1) * math.radians(rotate)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [
            torch.stack([cos * x_sign, -sin * y_sign, torch.zeros_like(cos)], 1),
            torch.stack([sin * x_sign, cos * y_sign, torch.zeros_like(cos)], 1),
        ],
        1,
    ).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def mirrored(draws: torch.Tensor, hflip: float, vflip: float) -> torch.Tensor:
    """Which samples `augment` mirrors: exactly one of the two flips (two flips are a rotation)."""
    return (draws[:, 0] < hflip) != (draws[:, 1] < vflip)


def swap_permutation(pairs: list[list[int]], num_classes: int) -> list[int]:
    """perm[c]: the class c becomes under a mirror (itself unless it is in a pair)."""
    perm = list(range(num_classes))
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return perm


def sample_keys(seed: int, epoch: int, rows: np.ndarray) -> np.ndarray:
    """A 31-bit int64 key per row, a pure function of (seed, epoch, row), apart from the
    augmentation's own draws: what keyed dropout hashes its masks from."""
    draws = uniforms(seed ^ 0x5EED, epoch, rows, 1)[:, 0]
    return (draws * 2**31).astype(np.int64)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of `parts` (for per-step torch RNG, e.g. dropout)."""
    x = np.uint64(0)
    for part in parts:
        x = _splitmix64(np.uint64(x ^ np.uint64(part)))
    return int(x >> np.uint64(1))


@dataclass(frozen=True)
class BatchTransform:
    """uint8 batch on the device → normalised float images, augmented when draws are given, in
    the model's memory layout: what every training step feeds the model."""

    mean: torch.Tensor
    std: torch.Tensor
    hflip: float
    vflip: float
    rotate: float
    channels_last: bool
    swap: torch.Tensor | None = None  # class permutation under a mirror (augment.mirror_swap), or None

    def targets(self, labels: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """The labels of the augmented images: a mirrored image (one flip, whatever the rotation)
        of a class that has a mirror twin takes the twin's label."""
        if self.swap is None:
            return labels
        return torch.where(mirrored(draws, self.hflip, self.vflip), self.swap[labels], labels)

    def __call__(self, images: torch.Tensor, draws: torch.Tensor | None = None) -> torch.Tensor:
        x = normalise(images, self.mean, self.std, torch.float32)
        if draws is not None:
            x = augment(x, draws, self.hflip, self.vflip, self.rotate)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
