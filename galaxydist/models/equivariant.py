"""A rotation-equivariant CNN built with e2cnn (`model.name: e2cnn`).

`model.group` C_N: rotations by 2π/N only, so the output is invariant to rotations but not to
mirrors (clockwise and anticlockwise spirals stay distinguishable); D_N: rotations and mirrors
(mirror-invariant). Each block is R2Conv → InnerBatchNorm → ReLU → 2×2 max pool on regular
fields (`model.channels[i]` fields of |G| channels each); group pooling then global average
pooling make the features invariant. Invariance is exact for the 90° rotations (and, with D_N,
mirrors) of the pixel grid when the image side divides by 2^blocks.
"""

from __future__ import annotations

import re
import types
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from .dropout import KeyedDropout


def import_e2cnn():
    try:
        from e2cnn import gspaces
        from e2cnn import nn as enn
    except ImportError as err:
        raise UserError(
            f"model.name=e2cnn needs e2cnn ({err}); install the extra: pip install 'galaxydist[zoo]'"
        ) from None
    _adapt_to_numpy2()
    return gspaces, enn


def _array_allowing_copies(obj, *args, copy: bool | None = None, **kwargs) -> np.ndarray:
    """NumPy 1's `np.array(x, copy=False)` (copy only when needed) under NumPy 2."""
    return np.asarray(obj, *args, **kwargs) if copy is False else np.array(obj, *args, copy=copy, **kwargs)


def _hash_of_basis(self) -> int:
    """e2cnn's IrrepBasis __hash__ with `tobytes` for NumPy 2's removed `tostring`."""
    gamma = self.gamma.tobytes() if isinstance(self.gamma, np.ndarray) else self.gamma
    return hash(self.in_irrep) + hash(self.out_irrep) + hash(self.mu.tobytes()) + hash(gamma)


def _adapt_to_numpy2() -> None:
    """e2cnn 0.2.3 (its last release; escnn, its successor, does not build here) calls two NumPy
    APIs that NumPy 2 removed: `ndarray.tostring` in its kernel bases' hashes, and
    `np.array(..., copy=False)` in its kernel sampling. Both get their NumPy 1 meaning back,
    for e2cnn alone; nothing else changes."""
    from e2cnn.kernels import irreps_basis, utils

    if isinstance(utils.np, types.SimpleNamespace):
        return
    utils.np = types.SimpleNamespace(**{**vars(np), "array": _array_allowing_copies})
    for name in dir(irreps_basis):
        cls = getattr(irreps_basis, name)
        if isinstance(cls, type) and issubclass(cls, irreps_basis.IrrepBasis) and "__hash__" in vars(cls):
            cls.__hash__ = _hash_of_basis


# What e2cnn's R2Conv derives from its weights on entering eval mode, as buffers (see EquivariantCNN.train).
EXPANDED = ("filter", "expanded_bias")


def _drop_expanded(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """Load pre-hook: checkpoints written before the expanded filters left the state dict."""
    for key in [k for k in state_dict if k.startswith(prefix) and k.rsplit(".", 1)[-1] in EXPANDED]:
        del state_dict[key]


def parse_group(group: str) -> tuple[bool, int]:
    """'C8' → (False, 8), 'D4' → (True, 4); anything else is a config error."""
    match = re.fullmatch(r"([CD])([1-9]\d*)", group)
    if not match:
        raise UserError(f"config key 'model.group': {group!r} is not C<N> or D<N> (e.g. C8, D8)")
    return match.group(1) == "D", int(match.group(2))


class EquivariantCNN(nn.Module):
    def __init__(
        self, group: str, channels: Sequence[int], num_classes: int, dropout: float, kernel_size: int = 5
    ) -> None:
        super().__init__()
        gspaces, enn = import_e2cnn()
        mirrors, n = parse_group(group)
        space = gspaces.FlipRot2dOnR2(n) if mirrors else gspaces.Rot2dOnR2(n)
        self.in_type = enn.FieldType(space, 3 * [space.trivial_repr])
        blocks, field_in = [], self.in_type
        for width in channels:
            field_out = enn.FieldType(space, width * [space.regular_repr])
            blocks.append(
                enn.SequentialModule(
                    enn.R2Conv(field_in, field_out, kernel_size, padding=kernel_size // 2, bias=False),
                    enn.InnerBatchNorm(field_out),
                    enn.ReLU(field_out, inplace=True),
                    enn.PointwiseMaxPool(field_out, 2),
                )
            )
            field_in = field_out
        self.blocks = nn.ModuleList(blocks)
        self.group_pool = enn.GroupPooling(field_in)
        self.geometric_tensor = enn.GeometricTensor
        self.feature_width = channels[-1]
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), KeyedDropout(dropout), nn.Linear(channels[-1], num_classes)
        )
        self.register_load_state_dict_pre_hook(_drop_expanded)
        self._keep_expanded_out_of_state()

    def train(self, mode: bool = True) -> EquivariantCNN:
        """R2Conv registers its expanded filter as a buffer in eval mode and deletes it in train
        mode, so the state dict's keys would depend on the mode: a model saved training would not
        load into one built (which has them), nor the other way round. They are derived from the
        weights, so they stay out of the state dict, as non-persistent buffers."""
        super().train(mode)
        self._keep_expanded_out_of_state()
        return self

    def _keep_expanded_out_of_state(self) -> None:
        for module in self.modules():
            for name in EXPANDED:
                tensor = module._buffers.get(name)
                if tensor is not None:
                    module.register_buffer(name, tensor, persistent=False)

    def invariant_maps(self, x: torch.Tensor) -> torch.Tensor:
        y = self.geometric_tensor(x, self.in_type)
        for block in self.blocks:
            y = block(y)
        return self.group_pool(y).tensor

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head[:2](self.invariant_maps(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.invariant_maps(x))

    def layers(self) -> list[list[str]]:
        blocks = [
            [f"blocks.{i}.{n}" for n, _ in block.named_parameters()] for i, block in enumerate(self.blocks)
        ]
        return [*blocks, [f"head.{n}" for n, _ in self.head.named_parameters()]]
