"""Which parameters a stage trains and at what rate: `train: all | head | last:K` and
layer-wise lr decay (zoobot's fine-tuning), over the layers the model declares."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..config import StageConfig


def trained_layers(stage: StageConfig, layers: int) -> int:
    """How many layers, counted from the head down, this stage trains."""
    if stage.train == "all":
        return layers
    if stage.train == "head":
        return 1
    return min(layers, int(stage.train.removeprefix("last:")) + 1)  # K blocks and the head


def param_groups(model: nn.Module, stage: StageConfig) -> list[dict]:
    """Optimiser groups: the trained layers, each at lr · lr_decay^depth (depth 0 = the head).
    Training everything at one rate is one group in the model's own parameter order."""
    layers = model.layers()
    named = dict(model.named_parameters())
    covered = {name for layer in layers for name in layer}
    assert covered == set(named), f"layers() leaves out {sorted(set(named) - covered)[:3]}"
    count = trained_layers(stage, len(layers))
    if count == len(layers) and stage.lr_decay == 1.0:
        return [{"params": list(model.parameters()), "lr": stage.lr}]
    top = list(reversed(layers))[:count]
    return [
        {"params": [named[name] for name in names], "lr": stage.lr * stage.lr_decay**depth}
        for depth, names in enumerate(top)
        if names
    ]


def frozen_batchnorms(model: nn.Module, groups: list[dict]) -> list[nn.Module]:
    """BatchNorm layers none of whose parameters train: kept in eval mode, so that their running
    statistics stay as they were (on every rank alike: no collective either)."""
    trained = {id(p) for group in groups for p in group["params"]}
    return [
        module
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and not any(id(p) in trained for p in module.parameters(recurse=False))
    ]


OptimizerFactory = Callable[[list[dict]], torch.optim.Optimizer]


def adam_factory(device: torch.device, capturable: bool) -> OptimizerFactory:
    """Adam over param groups: fused on CUDA (a few launches per step, not per tensor),
    capturable when the step is replayed as a CUDA graph."""
    fused = True if device.type == "cuda" else None

    def make(groups: list[dict]) -> torch.optim.Optimizer:
        return torch.optim.Adam(groups, fused=fused, capturable=capturable)

    return make
