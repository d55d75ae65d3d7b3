"""How a source image becomes a training square: the one crop-and-resize every path shares
(prepare from Galaxy10 or an image folder, predict and infer on new images), after the FITS
stretch for FITS cutouts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .fits import BadCutout, FitsStretch, kind_mismatch, read_rgb


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


@dataclass(frozen=True)
class Geometry:
    """How inputs become model inputs: cut a central `crop` square (see `fit`), resize to `size`;
    FITS cutouts first go through the stretch the model was trained with (`fits`)."""

    size: int
    crop: int
    fit: str
    fits: FitsStretch | None = None

    def apply(self, images: np.ndarray) -> np.ndarray:
        """uint8 N×H×W×3 → N×3×size×size, through prepare's own crop and resampling."""
        height, width = images.shape[1:3]
        side = self.crop if self.fit == "crop" and min(height, width) >= self.crop else min(height, width)
        return centre_square(images, side, self.size).transpose(0, 3, 1, 2)


def read_image(path: Path, fits: FitsStretch | None = None) -> np.ndarray:
    """One image file as uint8 1×H×W×3: a FITS cutout through `fits`, a model's recorded stretch,
    anything else through Pillow. A file of another kind than the model was trained on is refused."""
    problem = kind_mismatch(path, fits)
    if problem:
        raise UserError(f"{path}: {problem}")
    if fits is not None:
        try:
            return read_rgb(path, fits)[None]
        except BadCutout as err:
            raise UserError(f"{path}: {err}") from None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            return np.asarray(opened.convert("RGB"), dtype=np.uint8)[None]
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"{path}: not an image Pillow can read ({type(err).__name__})") from None
