"""Checkpoints: written atomically, loaded with weights_only=True (no pickle code runs on load)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_path
from .errors import UserError


def save(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write to a temporary file beside `path`, then rename: a crash leaves the previous file."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a foreign pickle, a damaged zip: all mean "not our checkpoint"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a loadable galaxydist checkpoint ({first_line})") from None
