"""Confusion matrices and the numbers read off them (pure tensor/numpy code, no I/O)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """K×K counts, rows = true class, columns = predicted class (on the inputs' device).

    index_add_ rather than bincount: on CUDA bincount reads the input's range back to the host.
    """
    cells = labels * num_classes + preds
    counts = torch.zeros(num_classes**2, dtype=torch.int64, device=labels.device)
    return counts.index_add_(0, cells, torch.ones_like(cells)).view(num_classes, num_classes)


def accuracy(cm: np.ndarray) -> float:
    total = cm.sum()
    return float(np.trace(cm) / total) if total else 0.0


def per_class(cm: np.ndarray, class_names: Sequence[str]) -> list[dict]:
    """Support, accuracy (= recall), precision and F1 for each class; 0 where undefined."""
    cm = np.asarray(cm, dtype=np.float64)
    support = cm.sum(1)
    predicted = cm.sum(0)
    rows = []
    for c, name in enumerate(class_names):
        tp = cm[c, c]
        recall = tp / support[c] if support[c] else 0.0
        precision = tp / predicted[c] if predicted[c] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append(
            {
                "class": name,
                "support": int(support[c]),
                "accuracy": float(recall),
                "precision": float(precision),
                "recall": float(recall),
                "f1": float(f1),
            }
        )
    return rows


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean per-class recall over the classes present."""
    cm = np.asarray(cm, dtype=np.float64)
    support = cm.sum(1)
    present = support > 0
    return float((np.diag(cm)[present] / support[present]).mean()) if present.any() else 0.0


def format_table(cm: np.ndarray, class_names: Sequence[str]) -> str:
    """The per-class table as Markdown, overall and balanced accuracy last."""
    lines = [
        "| class | support | accuracy | precision | recall | F1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in per_class(cm, class_names):
        lines.append(
            f"| {row['class']} | {row['support']} | {row['accuracy']:.3f} | {row['precision']:.3f} "
            f"| {row['recall']:.3f} | {row['f1']:.3f} |"
        )
    lines.append(
        f"| **overall** | {int(np.asarray(cm).sum())} | {accuracy(cm):.3f} | | "
        f"balanced {balanced_accuracy(cm):.3f} | |"
    )
    return "\n".join(lines)


def scores(
    probs: np.ndarray, labels: np.ndarray, class_weights: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, the class-weighted loss of training, and the confusion matrix."""
    k = len(class_names)
    preds = probs.argmax(1)
    cm = np.bincount(labels * k + preds, minlength=k * k).reshape(k, k)
    w = class_weights[labels]
    nll = -np.log(np.maximum(probs[np.arange(len(labels)), labels].astype(np.float64), 1e-12))
    return {
        "accuracy": accuracy(cm),
        "balanced_accuracy": balanced_accuracy(cm),
        "loss": float((w * nll).sum() / w.sum()) if len(labels) else 0.0,
        "per_class_accuracy": [r["accuracy"] for r in per_class(cm, class_names)],
        "confusion": cm.tolist(),
    }
