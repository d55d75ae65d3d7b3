"""How a source image becomes a training square: the one crop-and-resize every path shares
(prepare from Galaxy10 or an image folder, predict on new images)."""

from __future__ import annotations

import numpy as np


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
