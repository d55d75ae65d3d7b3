"""Checkpoints: the one schema (what a checkpoint holds and what reads it back), written
atomically, loaded with weights_only=True (no pickle code runs on load).

Training writes `training_state`; resuming reads it whole (`engine.state`); evaluation and
inference read the model part only (`read_model`).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_path
from .data.fits import FitsStretch
from .data.format import PreparedInfo
from .errors import UserError

MODEL_KEYS = ("model", "config", "class_names", "mean", "std", "image_size")


def training_state(
    model: torch.nn.Module,
    config: dict[str, Any],
    info: PreparedInfo,
    position: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    val_accuracy: float | None = None,
    ema: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Everything a checkpoint holds: the weights and what rebuilds the model and its inputs
    (config, classes, channel statistics, geometry, FITS stretch), and the training position
    (+ optimiser and the weights' moving average, for resuming)."""
    state = {
        "model": model.state_dict(),
        "config": config,
        "class_names": list(info.class_names),
        "mean": list(info.mean),
        "std": list(info.std),
        "image_size": info.image_size,
        "crop": info.crop,
        "fits": info.fits.to_dict() if info.fits else None,
        "train_size": len(info.splits["train"]),
        "position": position,
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if val_accuracy is not None:
        state["val_accuracy"] = val_accuracy
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


@dataclass(frozen=True)
class ModelMeta:
    """What a checkpoint says about its model's inputs and outputs."""

    path: Path
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    crop: int  # side of the source square that was resized to image_size (= image_size if none)
    config: dict[str, Any]
    fits: FitsStretch | None = None  # the stretch its FITS training cutouts went through

    @property
    def mirror_symmetric(self) -> bool:
        """Trained with flips, so a mirror image is the same class, or its mirror twin's under
        `mirror_swap` (TTA may then use mirrors)."""
        augment = self.config.get("augment", {})
        return augment.get("hflip", 0) > 0 or augment.get("vflip", 0) > 0 or bool(self.mirror_pairs)

    @property
    def mirror_pairs(self) -> list[list[int]]:
        return self.config.get("augment", {}).get("mirror_swap", [])

    @property
    def class_weight_power(self) -> float:
        return self.config.get("loss", {}).get("class_weight_power", 1.0)

    @property
    def run_dir(self) -> Path:
        """The run folder of RUN/checkpoints/X.pt, else the checkpoint's own folder."""
        parent = self.path.parent
        return parent.parent if parent.name == "checkpoints" else parent


def resolve(target: str | Path) -> Path:
    """A run folder stands for its best weights; a file is taken as given."""
    path = Path(target)
    if path.is_dir():
        path = path / "checkpoints" / "best.pt"
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    return path


def read_model(target: str | Path) -> tuple[ModelMeta, dict[str, torch.Tensor]]:
    """The model part of a checkpoint (or run folder's best.pt): its description and weights."""
    path = resolve(target)
    state = load(path)
    missing = [key for key in MODEL_KEYS if key not in state]
    if missing:
        raise UserError(f"{path}: not a galaxydist model checkpoint (no {missing[0]!r})")
    meta = ModelMeta(
        path=path,
        class_names=tuple(state["class_names"]),
        mean=tuple(state["mean"]),
        std=tuple(state["std"]),
        image_size=int(state["image_size"]),
        crop=int(state.get("crop", state["image_size"])),  # absent: the images were not resized
        config=state["config"],
        fits=FitsStretch.from_dict(state["fits"]) if state.get("fits") else None,
    )
    return meta, state["model"]


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def save(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write to a temporary file beside `path`, then rename: a crash leaves the previous file.

    Serialised in memory first, then written by Python: a full disk is then an OSError (ENOSPC),
    which the Trainer reports on every rank. torch.save's zip writer raises a bare RuntimeError
    ("unexpected pos ...") over it, whether given a path or a file.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def load(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a foreign pickle, a damaged zip: all mean "not our checkpoint"
        raise UserError(f"{path}: not a loadable galaxydist checkpoint ({first_line(err)})") from None
