"""The one model factory: `build_model(model_cfg, num_classes)` for training, evaluation and
inference alike, and what each family declares about itself (see `registry`)."""

from .registry import FAMILIES, Family, build_model, family_of

__all__ = ["FAMILIES", "Family", "build_model", "family_of"]
