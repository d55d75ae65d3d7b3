"""One inference path: load a checkpoint's model through the model factory, normalise its
inputs as in training, and return logits or probabilities (optionally averaged over symmetries).

Validation inside training, `galaxydist.evaluate` and `galaxydist.predict` all run `logits`,
so the same pixels meet the same model the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import checkpoint
from ..checkpoint import ModelMeta
from ..config import model_config
from ..data.augment import normalise, swap_permutation
from ..data.format import PreparedInfo
from ..errors import UserError
from ..models import build_model
from ..progress import track


def load_model(
    checkpoint_path: str | Path, device: torch.device | None = None
) -> tuple[nn.Module, ModelMeta]:
    """The model of a checkpoint (or run folder), in eval mode, rebuilt from the checkpoint's
    own config and class list (weights_only load: no pickled code runs)."""
    meta, weights = checkpoint.read_model(checkpoint_path)
    try:
        model = build_model(model_config(meta.config["model"]), len(meta.class_names))
        model.load_state_dict(weights)
    except (KeyError, TypeError, ValueError, RuntimeError, UserError) as err:
        raise UserError(
            f"{meta.path}: weights and saved config do not match ({checkpoint.first_line(err)})"
        ) from None
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    if meta.config.get("speed", {}).get("channels_last", False):
        model = model.to(memory_format=torch.channels_last)  # as trained: the same kernels, the same sums
    return model, meta


def mirror_swap(meta: ModelMeta) -> list[int] | None:
    """The checkpoint's class permutation under a mirror (None: every class is its own mirror)."""
    return swap_permutation(meta.mirror_pairs, len(meta.class_names)) if meta.mirror_pairs else None


def check_compatible(meta: ModelMeta, info: PreparedInfo) -> None:
    """The checkpoint's classes and image size against the data's: a mismatch is a user error."""
    if info.num_classes != len(meta.class_names):
        raise UserError(
            f"{meta.path}: a {len(meta.class_names)}-class model, but {info.path} has {info.num_classes} classes"
        )
    if info.class_names != meta.class_names:
        raise UserError(f"{meta.path}: trained on other class names than those of {info.path}")
    if info.image_size != meta.image_size:
        raise UserError(
            f"{meta.path}: trained on {meta.image_size}×{meta.image_size} images, "
            f"but {info.path} holds {info.image_size}×{info.image_size}; prepare the data at that size"
        )


def is_channels_last(model: nn.Module) -> bool:
    """Whether the model's first 4-D weight is laid out channels-last (its inputs should be too)."""
    param = next((p for p in model.parameters() if p.dim() == 4), None)
    return param is not None and param.is_contiguous(memory_format=torch.channels_last)


def logits(
    model: nn.Module,
    images: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    channels_last: bool,
    bf16: bool = False,
) -> torch.Tensor:
    """float32 logits of a uint8 N×C×H×W batch on the model's device, normalised as in training."""
    x = normalise(images, mean, std, torch.float32)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(x).float()


def symmetries(x: torch.Tensor, mirror: bool = True) -> Iterator[torch.Tensor]:
    """The 8 symmetries of the square (the dihedral group D4): 4 rotations, mirrored or not.
    A galaxy's class does not depend on its orientation on the sky; its handedness may (clockwise
    vs anticlockwise spirals), so without `mirror` only the 4 rotations."""
    for view in (x, x.flip(3)) if mirror else (x,):
        for k in range(4):
            yield torch.rot90(view, k, dims=(2, 3))


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    images_uint8_nchw: Any,
    mean: Sequence[float],
    std: Sequence[float],
    tta: bool = False,
    mirror: bool = True,
    batch: int = 256,
    description: str | None = "predict",
    swap: Sequence[int] | None = None,
) -> np.ndarray:
    """Softmax probabilities (N, K) for N ≥ 1 uint8 N×C×H×W images, normalised as in training.

    `images_uint8_nchw` is anything sliceable along N that gives arrays or tensors (a numpy array,
    a SplitImages): only one batch is in memory at a time. With `tta`, the mean of the softmax
    over the 8 symmetries of the square (4 rotations without `mirror`); `swap` (the class each
    class becomes under a mirror, `augment.mirror_swap`) reads a mirrored view's probabilities
    back as the original's. `description` labels the progress bar (None: no bar).
    """
    channels_last = is_channels_last(model)
    device = next(model.parameters()).device
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device)
    std_t = torch.tensor(std, dtype=torch.float32, device=device)
    n = len(images_uint8_nchw)
    starts = range(0, n, batch)
    out = []
    for start in track(starts, len(starts), description or "", enabled=description is not None):
        x = torch.as_tensor(np.asarray(images_uint8_nchw[start : start + batch])).to(device)
        views = list(symmetries(x, mirror)) if tta else [x]
        probs = torch.zeros((), device=device)
        for i, view in enumerate(views):
            p = torch.softmax(logits(model, view, mean_t, std_t, channels_last), dim=1)
            if swap is not None and i >= 4:  # the mirrored half of symmetries()
                p = p[:, list(swap)]
            probs = probs + p
        out.append((probs / len(views)).cpu().numpy())
    return np.concatenate(out)
