"""An exponential moving average of the weights and of the BatchNorm statistics (`ema.decay`),
as timm's ModelEmaV2 keeps it: validated, selected for best.pt, saved and resumed exactly."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """`model`'s twin whose floating-point tensors follow ema ← decay·ema + (1−decay)·model after
    every optimiser step; integer buffers (BatchNorm's step count) are copied. One fused
    `_foreach_lerp_` per step, with no host synchronisation: capturable in a CUDA graph."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.reset(model)

    def reset(self, model: nn.Module) -> None:
        """Start again from `model` (a new stage starts from the best weights)."""
        self.sources = list(model.state_dict().values())
        self.targets = list(self.model.state_dict().values())
        with torch.no_grad():
            for target, source in zip(self.targets, self.sources, strict=True):
                target.copy_(source)
        floating = [i for i, t in enumerate(self.targets) if t.is_floating_point()]
        self.float_pairs = ([self.targets[i] for i in floating], [self.sources[i] for i in floating])
        self.other_pairs = [
            (t, s)
            for i, (t, s) in enumerate(zip(self.targets, self.sources, strict=True))
            if i not in floating
        ]

    def refresh(self) -> nn.Module:
        """The average, ready to evaluate. Some modules cache tensors derived from their weights
        when switched to eval mode (e2cnn's R2Conv expands its filter then), and the average's
        weights change in place: passing through train mode rebuilds those caches from them."""
        return self.model.train().eval()

    @torch.no_grad()
    def update(self) -> None:
        targets, sources = self.float_pairs
        torch._foreach_lerp_(targets, sources, 1.0 - self.decay)
        for target, source in self.other_pairs:
            target.copy_(source)
