"""Model families by `model.name`: how each is built and what it needs of its input.

Every family's model is a plain `nn.Module` that knows nothing of distribution, with
`embed(x)` (the penultimate representation), `feature_width`, and `layers()` (parameter names by
layer, input to output, the head last: what `train: head | last:K` and layer-wise lr decay act
on). Its BatchNorm layers are `torch.nn` BatchNorm classes or subclasses, which
`distributed.wrap_model` synchronises across ranks (SyncBatchNorm on CUDA, GlobalBatchNorm on
the CPU). The family declares its smallest input side, checked before any work.
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
    # The smallest image side it takes, and why (for the one-line error).
    input_needs: Callable[[ModelConfig], tuple[int, str]]
    description: str


def _cnn(cfg: ModelConfig, num_classes: int) -> nn.Module:
    if cfg.pool is not None and len(cfg.pool) != len(cfg.channels):
        raise UserError(
            f"config key 'model.pool': {len(cfg.pool)} entries for {len(cfg.channels)} blocks (model.channels)"
        )
    return GalaxyCNN(cfg.channels, num_classes, cfg.dropout, cfg.pool)


def _cnn_needs(cfg: ModelConfig) -> tuple[int, str]:
    pools = len(cfg.channels) if cfg.pool is None else sum(cfg.pool)
    return 2**pools, f"{pools} pooling blocks (model.channels, model.pool)"


def _timm(cfg: ModelConfig, num_classes: int) -> nn.Module:
    from .timm_models import TimmModel

    return TimmModel(cfg.arch, num_classes, cfg.dropout)


def _e2cnn(cfg: ModelConfig, num_classes: int) -> nn.Module:
    from .equivariant import EquivariantCNN

    return EquivariantCNN(cfg.group, cfg.channels, num_classes, cfg.dropout)


FAMILIES: dict[str, Family] = {
    "cnn": Family("cnn", _cnn, _cnn_needs, "the seed CNN: conv-BN-ReLU(-maxpool) blocks"),
    "timm": Family(
        "timm",
        _timm,
        lambda cfg: (32, f"model.arch={cfg.arch} (timm's classifiers reduce the image 32-fold)"),
        "any timm architecture (model.arch)",
    ),
    "e2cnn": Family(
        "e2cnn",
        _e2cnn,
        lambda cfg: (2 ** len(cfg.channels), f"{len(cfg.channels)} pooling blocks (model.channels)"),
        "a C_N / D_N equivariant CNN (model.group)",
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
