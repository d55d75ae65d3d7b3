"""Inference: a checkpoint's model and preprocessing, and probabilities (+TTA) over batches;
shared by validation during training, `evaluate`, `predict` and batch inference."""
