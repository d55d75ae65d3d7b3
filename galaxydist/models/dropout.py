"""Dropout whose masks are a function of each sample's key, not of a generator's state.

torch's dropout draws from a per-process generator: N ranks × B/N then drop other units than
one rank × B, and a run is not world-size invariant. `KeyedDropout` draws each unit's fate from a
hash of (the sample's key, the unit, the layer), on the device: the trainer hands every sample a
key made from (seed, stage, epoch, file row), so the same image loses the same units whatever
rank, batch or world size it lands on. The model holds no notion of ranks: it only reads keys.
Without keys (a model used outside the trainer) it is plain dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_MASK31 = 0x7FFFFFFF
_MULTIPLIER = 0x45D9F3B  # < 2^27: a 31-bit value times it stays below 2^63, no int64 overflow


def hash31(x: torch.Tensor) -> torch.Tensor:
    """A well-mixed hash of int64 values in [0, 2^31) (Mueller's integer hash on 31 bits)."""
    x = x ^ (x >> 16)
    x = (x * _MULTIPLIER) & _MASK31
    x = x ^ (x >> 16)
    x = (x * _MULTIPLIER) & _MASK31
    return x ^ (x >> 16)


def keyed_uniforms(keys: torch.Tensor, units: int, salt: int) -> torch.Tensor:
    """(N, units) uniforms in [0, 1): unit j of sample i is a hash of (keys[i], j, salt)."""
    unit = torch.arange(units, device=keys.device, dtype=torch.int64)
    start = hash31((keys & _MASK31) ^ (salt * 0x2545F49 & _MASK31))
    x = hash31((start[:, None] + unit[None, :] * 0x9E3779B) & _MASK31)
    return hash31(x).float() / float(_MASK31 + 1)


class KeyedDropout(nn.Module):
    """Dropout on (N, units) features with per-sample keyed masks (see the module docstring)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.keys: torch.Tensor | None = None  # (N,) int64, set by the trainer for each batch
        self.salt = 0  # tells this layer's masks from another KeyedDropout's in the same model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.keys is None:
            return F.dropout(x, self.p, training=True)
        keep = keyed_uniforms(self.keys, x[0].numel(), self.salt).view_as(x) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def keyed_dropouts(model: nn.Module) -> list[KeyedDropout]:
    """The model's KeyedDropout layers, each given its own salt."""
    layers = [m for m in model.modules() if isinstance(m, KeyedDropout)]
    for salt, layer in enumerate(layers):
        layer.salt = salt
    return layers
