"""Any timm architecture by name (`model.arch`), with a head sized from the prepared file."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError


def import_timm():
    try:
        import timm
    except ImportError as err:
        raise UserError(
            f"model.name=timm needs timm ({err}); install the extra: pip install 'galaxydist[zoo]'"
        ) from None
    return timm


class TimmModel(nn.Module):
    """A timm model behind the family interface: `forward`, `embed` (the pooled penultimate
    representation), `feature_width`, `layers` (timm's own parameter groups, stem to head)."""

    def __init__(self, arch: str, num_classes: int, dropout: float) -> None:
        super().__init__()
        timm = import_timm()
        if arch not in timm.list_models():
            raise UserError(
                f"config key 'model.arch': {arch!r} is not a timm architecture "
                f"(e.g. resnet18, efficientnet_lite0, convnext_nano; see timm.list_models())"
            )
        self.net = timm.create_model(
            arch, pretrained=False, num_classes=num_classes, in_chans=3, drop_rate=dropout
        )
        # embed() returns the head's pre-logits: wider than the trunk where a head has its own
        # hidden layer (MobileNetV3, GhostNet).
        self.feature_width = getattr(self.net, "head_hidden_size", None) or self.net.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

    def layers(self) -> list[list[str]]:
        from timm.models import group_parameters

        groups = group_parameters(self.net, self.net.group_matcher(coarse=True))
        return [[f"net.{name}" for name in groups[key]] for key in sorted(groups)]
