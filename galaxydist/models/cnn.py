"""The galaxy CNN: a plain, distribution-agnostic nn.Module."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    # No conv bias: BatchNorm cancels it, so its true gradient is zero and Adam would turn float
    # noise in it into ±lr steps that differ between world sizes.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class GalaxyCNN(nn.Module):
    """Conv → BN → ReLU → MaxPool blocks, global average pooling, dropout, linear head."""

    def __init__(self, channels: Sequence[int], num_classes: int, dropout: float = 0.4) -> None:
        super().__init__()
        widths = [3, *channels]
        self.features = nn.Sequential(*(conv_block(a, b) for a, b in itertools.pairwise(widths)))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels[-1], num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
