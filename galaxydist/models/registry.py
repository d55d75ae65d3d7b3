"""Model families by `model.name`: how each is built and what it needs of its input.

A family declares its smallest input side (checked against the prepared file before any work)
and is otherwise a plain `nn.Module` with `features(x)` (the penultimate representation) and
`head`. Synchronising BatchNorm across ranks is `distributed`'s job: every family keeps its
BatchNorm layers as `nn.BatchNorm2d` (or subclasses), which `distributed.wrap_model` converts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..config import ModelConfig
from ..errors import UserError
from .cnn import GalaxyCNN


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[ModelConfig, int], nn.Module]
    min_input_size: Callable[[ModelConfig], int]
    description: str


def _cnn(cfg: ModelConfig, num_classes: int) -> nn.Module:
    return GalaxyCNN(cfg.channels, num_classes, cfg.dropout)


FAMILIES: dict[str, Family] = {
    "cnn": Family(
        "cnn", _cnn, lambda cfg: 2 ** len(cfg.channels), "the seed CNN: conv-BN-ReLU-maxpool blocks"
    ),
}


def family_of(cfg: ModelConfig) -> Family:
    try:
        return FAMILIES[cfg.name]
    except KeyError:
        raise UserError(
            f"config key 'model.name': unknown model family {cfg.name!r}; choose one of {' | '.join(FAMILIES)}"
        ) from None


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """A fresh model of `cfg`'s family with a `num_classes` head (the caller seeds torch)."""
    return family_of(cfg).build(cfg, num_classes)
