"""Evaluate a trained model on one split of a prepared file and write its report.

    python -m galaxydist.evaluate RUN_DIR_or_CHECKPOINT [--split test|val] [--data PREPARED.h5] [--tta] [--out DIR]

A run folder means its checkpoints/best.pt. The data default to the checkpoint's own
`data.path`; the report (per_class.csv/.md, confusion_<split>.png, summary.json) goes to
`<run>/eval_<split>/`. `--tta` also averages the softmax over the 8 symmetries of the square
(4 rotations × optional mirror flip) and reports plain and TTA numbers side by side. One process;
the GPU when there is one.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint
from .allocator import keep_freed_memory
from .atomic import atomic_path, check_can_create
from .augment import normalise
from .data import GalaxyDataset, PreparedInfo, read_prepared
from .errors import UserError, run_cli
from .metrics import accuracy, balanced_accuracy, per_class
from .model import GalaxyCNN
from .plots import plot_confusion
from .progress import track
from .tracking import Guard, write_per_class

CHECKPOINT_KEYS = ("model", "config", "class_names", "mean", "std", "image_size")


@dataclass(frozen=True)
class ModelMeta:
    """What a checkpoint says about its inputs and outputs."""

    path: Path
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    crop: int  # side of the source square that was resized to image_size (= image_size if none)
    config: dict[str, Any]

    @property
    def mirror_symmetric(self) -> bool:
        """Trained with flips, so a mirror image is the same class (TTA may then use mirrors)."""
        augment = self.config.get("augment", {})
        return augment.get("hflip", 0) > 0 or augment.get("vflip", 0) > 0

    @property
    def run_dir(self) -> Path:
        """The run folder of RUN/checkpoints/X.pt, else the checkpoint's own folder."""
        parent = self.path.parent
        return parent.parent if parent.name == "checkpoints" else parent


def resolve_checkpoint(target: str | Path) -> Path:
    """A run folder stands for its best weights; a file is taken as given."""
    path = Path(target)
    if path.is_dir():
        path = path / "checkpoints" / "best.pt"
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    return path


def load_model(
    checkpoint_path: str | Path, device: torch.device | None = None
) -> tuple[GalaxyCNN, ModelMeta]:
    """The model of a checkpoint (or run folder), in eval mode, rebuilt from the checkpoint's
    own config and class list (weights_only load: no pickled code runs)."""
    path = resolve_checkpoint(checkpoint_path)
    state = checkpoint.load(path)
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise UserError(f"{path}: not a galaxydist model checkpoint (no {missing[0]!r})")
    config = state["config"]
    try:
        model_cfg = config["model"]
        model = GalaxyCNN(model_cfg["channels"], len(state["class_names"]), model_cfg["dropout"])
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: weights and saved config do not match ({first_line})") from None
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    if config.get("speed", {}).get("channels_last", False):
        model = model.to(memory_format=torch.channels_last)  # as trained: the same kernels, the same sums
    meta = ModelMeta(
        path=path,
        class_names=tuple(state["class_names"]),
        mean=tuple(state["mean"]),
        std=tuple(state["std"]),
        image_size=int(state["image_size"]),
        crop=int(state.get("crop", state["image_size"])),  # absent: the images were not resized
        config=config,
    )
    return model, meta


def symmetries(x: torch.Tensor, mirror: bool = True) -> Iterator[torch.Tensor]:
    """The 8 symmetries of the square (the dihedral group D4): 4 rotations, mirrored or not.
    A galaxy's class does not depend on its orientation on the sky; its handedness may (clockwise
    vs anticlockwise spirals), so without `mirror` only the 4 rotations."""
    for view in (x, x.flip(3)) if mirror else (x,):
        for k in range(4):
            yield torch.rot90(view, k, dims=(2, 3))


@torch.no_grad()
def predict_proba(
    model: torch.nn.Module,
    images_uint8_nchw: Any,
    mean: Sequence[float],
    std: Sequence[float],
    tta: bool = False,
    mirror: bool = True,
    batch: int = 256,
    description: str | None = "predict",
) -> np.ndarray:
    """Softmax probabilities (N, K) for N ≥ 1 uint8 N×C×H×W images, normalised as in training.

    `images_uint8_nchw` is anything sliceable along N that gives arrays or tensors (a numpy array,
    a SplitImages): only one batch is in memory at a time. With `tta`, the mean of the softmax
    over the 8 symmetries of the square. `description` labels the progress bar (None: no bar).
    """
    param = next(model.parameters())  # the first convolution's weight: its layout is the model's
    channels_last = param.dim() == 4 and param.is_contiguous(memory_format=torch.channels_last)
    device = param.device
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device)
    std_t = torch.tensor(std, dtype=torch.float32, device=device)
    n = len(images_uint8_nchw)
    starts = range(0, n, batch)
    out = []
    for start in track(starts, len(starts), description or "", enabled=description is not None):
        x = torch.as_tensor(np.asarray(images_uint8_nchw[start : start + batch])).to(device)
        x = normalise(x, mean_t, std_t, torch.float32)
        views = list(symmetries(x, mirror)) if tta else [x]
        probs = torch.zeros((), device=device)
        for view in views:
            if channels_last:
                view = view.contiguous(memory_format=torch.channels_last)
            probs = probs + torch.softmax(model(view).float(), dim=1)
        out.append((probs / len(views)).cpu().numpy())
    return np.concatenate(out)


class SplitImages:
    """One split of a prepared file as a lazily read N×C×H×W uint8 array (memory-mapped slices)."""

    def __init__(self, info: PreparedInfo, split: str) -> None:
        self.dataset = GalaxyDataset(info, split)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, part: slice) -> np.ndarray:
        images, _, _ = self.dataset[list(range(len(self)))[part]]
        return images.numpy()


def check_compatible(meta: ModelMeta, info: PreparedInfo) -> None:
    """The checkpoint's classes and image size against the data's: a mismatch is a user error."""
    if info.num_classes != len(meta.class_names):
        raise UserError(
            f"{meta.path}: a {len(meta.class_names)}-class model, but {info.path} has {info.num_classes} classes"
        )
    if info.class_names != meta.class_names:
        raise UserError(f"{meta.path}: trained on other class names than those of {info.path}")
    if info.image_size != meta.image_size:
        raise UserError(
            f"{meta.path}: trained on {meta.image_size}×{meta.image_size} images, "
            f"but {info.path} holds {info.image_size}×{info.image_size}; prepare the data at that size"
        )


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


def evaluate(
    target: str | Path,
    split: str = "test",
    data: str | None = None,
    tta: bool = False,
    out: str | None = None,
) -> dict[str, Any]:
    """Evaluate, write the report folder, and return its summary."""
    if split not in ("test", "val"):
        raise UserError(f"unknown split {split!r}; choose test or val")
    model, meta = load_model(target)
    if data is None:
        data = meta.config["data"]["path"]
        if not Path(data).exists():
            raise UserError(f"{data}: the checkpoint's data.path is not here; pass --data PREPARED.h5")
    info = read_prepared(data)
    check_compatible(meta, info)
    folder = Path(out) if out else meta.run_dir / f"eval_{split}"
    check_can_create(folder / "summary.json")
    images, labels = SplitImages(info, split), info.labels[info.splits[split]]
    runs = {"plain": False, "tta": True} if tta else {"plain": False}
    results = {
        name: scores(
            predict_proba(
                model,
                images,
                meta.mean,
                meta.std,
                use_tta,
                meta.mirror_symmetric,
                description=f"{split} ({name})",
            ),
            labels,
            info.class_weights,
            meta.class_names,
        )
        for name, use_tta in runs.items()
    }
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
    summary = {
        "checkpoint": str(meta.path),
        "data": str(info.path),
        "split": split,
        "images": len(labels),
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
    parser.add_argument("--out", help="report folder (default: <run>/eval_<split>)")
    args = parser.parse_args(argv)
    summary = evaluate(args.target, args.split, args.data, args.tta, args.out)
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
