"""What a run or an evaluation reports: per-class tables (Markdown and CSV), the pictures
(training curves and confusion matrices as PNG files), and a guard that keeps reporting from
ever stopping the work.

matplotlib is imported inside the functions and drawn on an Agg canvas (no pyplot, no global
backend switch), so importing this module costs nothing and works without a display. Figures have
a fixed size in pixels (no tight bounding box) so that a reader, or a test, knows what to expect.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .atomic import atomic_path
from .errors import warn
from .metrics import format_table, per_class

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
CURVES_INCHES = (11.0, 4.2)
CONFUSION_INCHES = (8.0, 7.0)
CURVES_PIXELS = (round(CURVES_INCHES[0] * DPI), round(CURVES_INCHES[1] * DPI))  # (width, height)
CONFUSION_PIXELS = (round(CONFUSION_INCHES[0] * DPI), round(CONFUSION_INCHES[1] * DPI))
CSV_COLUMNS = ("class", "support", "accuracy", "precision", "recall", "f1")
COMPARISON_INCHES = (9.0, 4.5)
GALLERY_TILE_INCHES = 1.25


def _figure(inches: tuple[float, float]) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=inches, dpi=DPI, layout="constrained")  # fits labels inside the fixed size
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> None:
    """Atomically: a viewer refreshing the file never sees half a PNG."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)


def plot_curves(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Loss and accuracy, train and val, one point per epoch; dashed lines where a stage starts."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(CURVES_INCHES)
    loss_ax, acc_ax = fig.subplots(1, 2)
    x = np.arange(1, len(records) + 1)
    for ax, metric, label in ((loss_ax, "loss", "weighted cross-entropy"), (acc_ax, "acc", "accuracy")):
        for split, style in (("train", "-o"), ("val", "-s")):
            ax.plot(x, [r[f"{split}_{metric}"] for r in records], style, markersize=3, label=split)
        ax.set_xlabel("epoch (all stages)")
        ax.set_ylabel(label)
        ax.set_xlim(0.5, len(records) + 0.5)  # stage labels sit at the half-epoch boundaries
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    for i, record in enumerate(records):
        if i == 0 or record["stage_index"] != records[i - 1]["stage_index"]:
            for ax in (loss_ax, acc_ax):
                if i:
                    ax.axvline(i + 0.5, color="grey", linestyle="--", linewidth=1)
                ax.annotate(
                    record["stage"],
                    (i + 0.5, 1.01),
                    xycoords=("data", "axes fraction"),
                    va="bottom",
                    fontsize=8,
                    color="grey",
                )
    _save(fig, path)


def plot_confusion(
    cm: np.ndarray, class_names: Sequence[str], path: str | os.PathLike, title: str = "Confusion matrix"
) -> None:
    """Colours are row-normalised (recall per true class, comparable across class sizes); the
    numbers written in the cells are the raw counts."""
    cm = np.asarray(cm, dtype=np.int64)
    support = cm.sum(1, keepdims=True)
    fractions = np.divide(cm, support, out=np.zeros(cm.shape), where=support > 0)
    fig = _figure(CONFUSION_INCHES)
    ax = fig.subplots()
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    k = len(class_names)
    small = k > 12
    for (i, j), count in np.ndenumerate(cm):
        colour = "white" if fractions[i, j] > 0.55 else "black"
        ax.text(j, i, str(count), ha="center", va="center", color=colour, fontsize=6 if small else 8)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=7 if small else 8)
    ax.set_yticks(range(k), class_names, fontsize=7 if small else 8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = int(cm.sum())
    accuracy = np.trace(cm) / total if total else 0.0
    ax.set_title(f"{title} — {total} images, accuracy {accuracy:.3f}", fontsize=10)
    _save(fig, path)


def gallery_picks(labels: np.ndarray, probs: np.ndarray, per_class: int) -> list[tuple[list[int], list[int]]]:
    """For each true class: the `per_class` right predictions made with the highest probability,
    and the `per_class` wrong ones made with the highest probability (for the wrong class)."""
    preds, confidence = probs.argmax(1), probs.max(1)
    picks = []
    for k in range(probs.shape[1]):
        of_class = np.flatnonzero(labels == k)
        by_confidence = of_class[np.argsort(-confidence[of_class], kind="stable")]
        right = by_confidence[preds[by_confidence] == k][:per_class]
        wrong = by_confidence[preds[by_confidence] != k][:per_class]
        picks.append((right.tolist(), wrong.tolist()))
    return picks


def gallery_inches(classes: int, per_class: int) -> tuple[float, float]:
    """A tile per image, room for the class names on the left and the title on top."""
    return (GALLERY_TILE_INCHES * 2 * per_class + 1.6, GALLERY_TILE_INCHES * classes + 0.6)


def plot_gallery(
    images: Callable[[int], np.ndarray],
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    per_class: int = 4,
    title: str = "Most confident right and wrong",
) -> None:
    """A row per true class: its most confident right predictions (green), then its most
    confident wrong ones (red), each tile titled with the predicted class and its probability.
    `images(i)` returns image i as H×W×3 uint8."""
    picks = gallery_picks(labels, probs, per_class)
    rows, cols = len(class_names), 2 * per_class
    fig = _figure(gallery_inches(rows, per_class))
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    for k, (right, wrong) in enumerate(picks):
        for c in range(cols):
            ax = axes[k, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c == 0:
                ax.set_ylabel(f"{class_names[k]}\n({int((labels == k).sum())})", fontsize=7)
            chosen = right if c < per_class else wrong
            j = c if c < per_class else c - per_class
            if j >= len(chosen):
                continue
            i = chosen[j]
            pred = int(probs[i].argmax())
            ax.imshow(images(i))
            colour = "tab:green" if pred == k else "tab:red"
            ax.set_title(f"{class_names[pred]} {probs[i, pred]:.2f}", fontsize=6, color=colour)
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_color(colour)
                spine.set_linewidth(2)
    fig.suptitle(f"{title}: rows are the true class; right (green) | wrong (red)", fontsize=9)
    _save(fig, path)


def write_per_class(folder: Path, stem: str, cm: np.ndarray, class_names: Sequence[str]) -> str:
    """`stem`.csv (full precision for programs) and `stem`.md (for people); returns the Markdown."""
    table = format_table(cm, class_names)
    with atomic_path(folder / f"{stem}.md") as tmp:
        tmp.write_text(table + "\n")
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in per_class(cm, class_names):
        writer.writerow([row["class"], row["support"], *(f"{row[c]:.6f}" for c in CSV_COLUMNS[2:])])
    with atomic_path(folder / f"{stem}.csv") as tmp:
        tmp.write_text(text.getvalue())
    return table


class Guard:
    """Runs reporting steps that must never stop the work (training, an evaluation): the first
    failure prints one warning naming `what` and what goes on regardless, and every later step of
    this guard is skipped."""

    def __init__(
        self, what: str, regardless: str = "training continues, the run folder has everything else"
    ) -> None:
        self.what, self.regardless = what, regardless
        self.failed = False

    def run(self, step: Callable[..., object], *args: Any) -> None:
        if self.failed:
            return
        try:
            step(*args)
        except Exception as err:  # any failure of a reporter: the work matters more
            self.failed = True
            detail = f"{type(err).__name__}: {err}".strip().splitlines()[0]
            warn(f"{self.what} failed ({detail}); {self.regardless}")


def plot_comparison(
    settings: Sequence[str], points: Sequence[Sequence[float]], metric: str, path: str | os.PathLike
) -> None:
    """One column per setting: a point per seed, the mean and its standard deviation as a bar."""
    fig = _figure(COMPARISON_INCHES)
    ax = fig.subplots()
    for i, values in enumerate(points):
        if not len(values):
            continue
        ax.plot([i] * len(values), values, "o", color="tab:blue", alpha=0.5, markersize=5)
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        ax.errorbar([i + 0.15], [float(np.mean(values))], yerr=[std], fmt="s", color="black", capsize=4)
    ax.set_xticks(
        range(len(settings)),
        [s if len(s) < 40 else s[:37] + "…" for s in settings],
        rotation=20,
        ha="right",
        fontsize=8,
    )
    ax.set_xlim(-0.5, len(settings) - 0.5)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)
