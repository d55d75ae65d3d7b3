"""Evaluate a trained model on one split of a prepared file and write its report.

    python -m galaxydist.evaluate RUN_DIR_or_CHECKPOINT [--split test|val] [--data PREPARED.h5] [--tta]
        [--gallery K] [--prior-shift DELTA] [--out DIR]

A run folder means its checkpoints/best.pt. The data default to the checkpoint's own
`data.path`; the report (per_class.csv/.md, confusion_<split>.png, summary.json) goes to
`<run>/eval_<split>/`. `--tta` also averages the softmax over the 8 symmetries of the square
(4 rotations × optional mirror flip) and reports plain and TTA numbers side by side. `--gallery K`
draws gallery_<split>.png: per true class its K most confident right and K most confident wrong
predictions. `--prior-shift DELTA` decides on the probabilities divided by the training split's
class frequencies to the power DELTA (renormalised): > 0 leans to the rare classes, < 0 to the
common ones, the post-hoc form of the training loss's logit adjustment; its report goes to
`eval_<split>_shift<DELTA>/`. One process; the GPU when there is one.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .allocator import keep_freed_memory
from .atomic import atomic_path, check_can_create
from .data.dataset import SplitImages
from .data.format import read_prepared
from .errors import UserError, run_cli
from .inference.engine import check_compatible, load_model, mirror_swap, predict_proba
from .metrics import scores
from .reports import Guard, plot_confusion, plot_gallery, write_per_class


def side_by_side(plain: dict[str, Any], tta: dict[str, Any], class_names: Sequence[str]) -> str:
    """Per-class and overall accuracy, plain against TTA, as Markdown."""
    support = np.asarray(plain["confusion"]).sum(1)
    lines = ["| class | support | accuracy | TTA accuracy | change |", "|---|---:|---:|---:|---:|"]
    for name, n, a, b in zip(
        class_names, support, plain["per_class_accuracy"], tta["per_class_accuracy"], strict=True
    ):
        lines.append(f"| {name} | {n} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
    for key, label in (("accuracy", "**overall**"), ("balanced_accuracy", "balanced")):
        a, b = plain[key], tta[key]
        lines.append(f"| {label} | {int(support.sum())} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
    lines.append(
        f"| loss (weighted) | | {plain['loss']:.4f} | {tta['loss']:.4f} | {tta['loss'] - plain['loss']:+.4f} |"
    )
    return "\n".join(lines)


def shift_prior(probs: np.ndarray, class_weights: np.ndarray, delta: float) -> np.ndarray:
    """p · π^−δ, renormalised, with π the training class frequencies: the prepared file's class
    weights are N / (K·N_c), proportional to 1/π, so this is p · weight^δ (in logs, so that no
    δ overflows)."""
    with np.errstate(divide="ignore"):
        logits = np.log(probs.astype(np.float64)) + delta * np.log(class_weights)
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)


def evaluate(
    target: str | Path,
    split: str = "test",
    data: str | None = None,
    tta: bool = False,
    out: str | None = None,
    gallery: int = 0,
    prior_shift: float = 0.0,
) -> dict[str, Any]:
    """Evaluate, write the report folder, and return its summary."""
    if split not in ("test", "val"):
        raise UserError(f"unknown split {split!r}; choose test or val")
    if gallery < 0:
        raise UserError(f"--gallery: must be >= 0 images per class, got {gallery}")
    if not np.isfinite(prior_shift):
        raise UserError(f"--prior-shift: must be a finite number, got {prior_shift}")
    model, meta = load_model(target)
    if data is None:
        data = meta.config["data"]["path"]
        if not Path(data).exists():
            raise UserError(f"{data}: the checkpoint's data.path is not here; pass --data PREPARED.h5")
    info = read_prepared(data)
    check_compatible(meta, info)
    shifted = f"_shift{prior_shift:+g}" if prior_shift else ""
    folder = Path(out) if out else meta.run_dir / f"eval_{split}{shifted}"
    check_can_create(folder / "summary.json")
    images, labels = SplitImages(info, split), info.labels[info.splits[split]]
    runs = {"plain": False, "tta": True} if tta else {"plain": False}
    probs = {
        name: predict_proba(
            model,
            images,
            meta.mean,
            meta.std,
            use_tta,
            meta.mirror_symmetric,
            description=f"{split} ({name})",
            swap=mirror_swap(meta),
        )
        for name, use_tta in runs.items()
    }
    if prior_shift:
        probs = {name: shift_prior(p, info.class_weights, prior_shift) for name, p in probs.items()}
    weights = info.class_weights**meta.class_weight_power
    results = {name: scores(p, labels, weights, meta.class_names) for name, p in probs.items()}
    folder.mkdir(parents=True, exist_ok=True)
    pictures = Guard("drawing the confusion PNG", "the numbers and tables are written regardless")
    for name, result in results.items():
        suffix = "" if name == "plain" else f"_{name}"
        write_per_class(folder, f"per_class{suffix}", np.asarray(result["confusion"]), meta.class_names)
        title = f"{split.capitalize()}{' (TTA, 8 symmetries)' if name == 'tta' else ''}"
        pictures.run(
            plot_confusion,
            np.asarray(result["confusion"]),
            meta.class_names,
            folder / f"confusion_{split}{suffix}.png",
            title,
        )
    if gallery:
        pictures.run(
            plot_gallery,
            lambda i: images[i : i + 1][0].transpose(1, 2, 0),
            labels,
            probs["tta" if tta else "plain"],
            meta.class_names,
            folder / f"gallery_{split}.png",
            gallery,
            f"{split.capitalize()}{' (TTA)' if tta else ''}",
        )
    summary = {
        "checkpoint": str(meta.path),
        "data": str(info.path),
        "split": split,
        "images": len(labels),
        "prior_shift": prior_shift,
        "class_names": list(meta.class_names),
        **results,
    }
    if tta:
        summary["tta_gain"] = results["tta"]["accuracy"] - results["plain"]["accuracy"]
        with atomic_path(folder / "tta.md") as tmp:
            tmp.write_text(side_by_side(results["plain"], results["tta"], meta.class_names) + "\n")
    with atomic_path(folder / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    summary["folder"] = str(folder)
    return summary


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    parser = argparse.ArgumentParser(
        prog="python -m galaxydist.evaluate", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "target", metavar="RUN_DIR_or_CHECKPOINT", help="a run folder (its best.pt) or a .pt file"
    )
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--data", help="prepared .h5 (default: the checkpoint config's data.path)")
    parser.add_argument(
        "--tta",
        action="store_true",
        help="also average over the symmetries of the square (rotations only if trained without flips)",
    )
    parser.add_argument(
        "--gallery",
        type=int,
        default=0,
        metavar="K",
        help="draw gallery_<split>.png: per class the K most confident right and wrong predictions",
    )
    parser.add_argument(
        "--prior-shift",
        type=float,
        default=0.0,
        metavar="DELTA",
        help="decide on p / (training class frequency)^DELTA: > 0 favours rare classes, < 0 common ones",
    )
    parser.add_argument("--out", help="report folder (default: <run>/eval_<split>[_shift<DELTA>])")
    args = parser.parse_args(argv)
    summary = evaluate(args.target, args.split, args.data, args.tta, args.out, args.gallery, args.prior_shift)
    plain = summary["plain"]
    names = summary["class_names"]
    if args.tta:
        print(side_by_side(plain, summary["tta"], names))
    else:
        print((Path(summary["folder"]) / "per_class.md").read_text().rstrip())
    line = f"{args.split} accuracy {plain['accuracy']:.4f} (balanced {plain['balanced_accuracy']:.4f})"
    if args.tta:
        line += f", with TTA {summary['tta']['accuracy']:.4f} ({summary['tta_gain']:+.4f})"
    print(f"{line} on {summary['images']} images — report in {summary['folder']}")
    return 0


def cli() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
