"""Checkpoints: written atomically, loaded with weights_only=True (no pickle code runs on load)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_path
from .errors import UserError


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
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a loadable galaxydist checkpoint ({first_line})") from None


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """`saved` (an optimizer state_dict) into `optimizer`, adapted to where it runs now.

    torch restores the saving run's `fused` and `capturable` flags with the state (a CPU
    checkpoint would resume unfused on a GPU, and a graph could not capture a non-capturable Adam),
    and moments keep the saving run's memory layout (speed.channels_last may differ; CUDA's fused
    Adam refuses moments laid out unlike their parameters).
    """
    ours = optimizer.param_groups[0]
    flags = {"fused": ours.get("fused"), "capturable": ours.get("capturable", False)}
    groups = [{**group, **flags} for group in saved["param_groups"]]
    optimizer.load_state_dict({**saved, "param_groups": groups})
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape:
                state[key] = torch.empty_like(param).copy_(value)
