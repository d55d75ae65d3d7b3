"""The galaxy CNN: a plain, distribution-agnostic nn.Module."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from .dropout import KeyedDropout


def conv_block(c_in: int, c_out: int, pool: bool = True) -> nn.Sequential:
    # No conv bias: BatchNorm cancels it, so its true gradient is zero and Adam would turn float
    # noise in it into ±lr steps that differ between world sizes.
    layers = [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


class GalaxyCNN(nn.Module):
    """Conv → BN → ReLU (→ MaxPool) blocks, global average pooling, dropout, linear head.

    `pool[i]` says whether block i halves the image (default: every block does, the seed's CNN);
    the seed report suggests keeping the resolution in the first two blocks.
    """

    def __init__(
        self,
        channels: Sequence[int],
        num_classes: int,
        dropout: float = 0.4,
        pool: Sequence[bool] | None = None,
    ) -> None:
        super().__init__()
        pool = [True] * len(channels) if pool is None else list(pool)
        widths = [3, *channels]
        self.features = nn.Sequential(
            *(conv_block(a, b, p) for (a, b), p in zip(itertools.pairwise(widths), pool, strict=True))
        )
        self.feature_width = channels[-1]
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), KeyedDropout(dropout), nn.Linear(channels[-1], num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate representation: pooled features, before dropout and the linear head."""
        return self.head[:2](self.features(x))

    def layers(self) -> list[list[str]]:
        """Parameter names by layer, input to output; the head last (for freezing and lr decay)."""
        blocks = [
            [f"features.{i}.{n}" for n, _ in block.named_parameters()]
            for i, block in enumerate(self.features)
        ]
        return [*blocks, [f"head.{n}" for n, _ in self.head.named_parameters()]]
