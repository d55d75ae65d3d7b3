"""The data layer: the prepared file (format), its two sources (galaxy10, folder), geometry,
the memory-mapped dataset, samplers and batch augmentation. Knows nothing of models or training.

Kept import-light: prepare's worker processes import `format`, `galaxy10` and `folder`, which
need no torch.
"""
