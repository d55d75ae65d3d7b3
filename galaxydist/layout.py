"""The prepared file's format version and split names: what prepare writes and data reads.

Kept free of torch: prepare's worker processes import the prepare module, and torch would cost
each of them seconds and ~100 MB.
"""

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
