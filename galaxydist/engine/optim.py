"""Which parameters a stage trains and at what rate: `train: all | head | last:K`, layer-wise lr
decay (zoobot's fine-tuning) over the layers the model declares, weight decay (never on
BatchNorm parameters and biases), and the learning-rate schedule over the stage's steps."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..config import OptimConfig, StageConfig


def trained_layers(stage: StageConfig, layers: int) -> int:
    """How many layers, counted from the head down, this stage trains."""
    if stage.train == "all":
        return layers
    if stage.train == "head":
        return 1
    return min(layers, int(stage.train.removeprefix("last:")) + 1)  # K blocks and the head


def param_groups(model: nn.Module, stage: StageConfig, weight_decay: float = 0.0) -> list[dict]:
    """Optimiser groups: the trained layers, each at lr · lr_decay^depth (depth 0 = the head),
    split into decayed weights and undecayed BatchNorm parameters and biases (1-D tensors) when
    there is weight decay. Training everything at one rate without decay is one group in the
    model's own parameter order. Each group keeps its `base_lr` for the schedule."""
    layers = model.layers()
    named = dict(model.named_parameters())
    covered = {name for layer in layers for name in layer}
    assert covered == set(named), f"layers() leaves out {sorted(set(named) - covered)[:3]}"
    count = trained_layers(stage, len(layers))
    if count == len(layers) and stage.lr_decay == 1.0:
        tiers = [(stage.lr, list(model.parameters()))]
    else:
        top = list(reversed(layers))[:count]
        tiers = [
            (stage.lr * stage.lr_decay**depth, [named[n] for n in names]) for depth, names in enumerate(top)
        ]
    groups = []
    for lr, params in tiers:
        if weight_decay:
            split = [[p for p in params if p.dim() > 1], [p for p in params if p.dim() <= 1]]
            groups += [
                {"params": ps, "lr": lr, "base_lr": lr, "weight_decay": wd}
                for ps, wd in zip(split, (weight_decay, 0.0), strict=True)
                if ps
            ]
        elif params:
            groups.append({"params": params, "lr": lr, "base_lr": lr, "weight_decay": 0.0})
    return groups


def lr_factor(stage: StageConfig, step: int, steps_per_epoch: int) -> float:
    """The schedule at optimiser step `step` of the stage (0-based): warm-up × decay, a pure
    function of the position, so a run resumed mid-epoch continues on the same curve."""
    warmup = min(1.0, (step + 1) / stage.warmup_steps) if stage.warmup_steps else 1.0
    if stage.schedule == "cosine":
        total = max(1, stage.max_epochs * steps_per_epoch - stage.warmup_steps)
        progress = min(1.0, max(0.0, (step - stage.warmup_steps) / total))
        return warmup * 0.5 * (1.0 + math.cos(math.pi * progress))
    if stage.schedule == "step":
        return warmup * stage.step_gamma ** (step // steps_per_epoch // stage.step_epochs)
    return warmup


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Every group at base_lr × factor (a tensor lr, as CUDA graphs need, is filled in place)."""
    for group in optimizer.param_groups:
        lr = group["base_lr"] * factor
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


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


def optimizer_factory(cfg: OptimConfig, device: torch.device, capturable: bool) -> OptimizerFactory:
    """Adam or AdamW (decoupled weight decay) over param groups: fused on CUDA (a few launches
    per step, not per tensor), capturable when the step is replayed as a CUDA graph, and then with
    tensor learning rates, so that the schedule changes them between replays."""
    fused = True if device.type == "cuda" else None
    kind = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam

    def make(groups: list[dict]) -> torch.optim.Optimizer:
        if capturable:
            groups = [{**g, "lr": torch.tensor(g["lr"], device=device)} for g in groups]
        return kind(groups, fused=fused, capturable=capturable)

    return make
