"""What a run leaves behind: the run folder (always) and Weights & Biases (when enabled).

Only rank 0 constructs a Tracker; other ranks never touch the run folder or wandb. wandb is
imported lazily, inside the Tracker, so `tracking.wandb: disabled` (and every other rank) never
loads it, and a missing or broken wandb costs one warning instead of the training run.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .atomic import atomic_path
from .metrics import balanced_accuracy, per_class
from .reports import CSV_COLUMNS, Guard, plot_confusion, plot_curves, write_per_class

if TYPE_CHECKING:
    from .config import Config

CURVES_EVERY_S = 30.0
WANDB_ID_FILE = "wandb_run_id"  # in the run folder: a resumed or requeued run continues this W&B run


class RunFolder:
    """config.yaml, metrics.jsonl, summary.json, per-class tables, PNGs and checkpoints/ of one run."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    def write_text(self, name: str, text: str) -> None:
        with atomic_path(self.root / name) as tmp:
            tmp.write_text(text)

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        # Whole lines only: text after the last newline is an append cut short (a kill, a full
        # disk); the next run's keep_metrics drops it.
        complete = self.metrics_path.read_text().rpartition("\n")[0]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def keep_metrics(self, before: tuple[int, int]) -> None:
        """Drop lines at or after (stage_index, epoch): a resumed run writes them again."""
        kept = [r for r in self.read_metrics() if (r["stage_index"], r["epoch"]) < before]
        self.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def write_report(self, split: str, cm: np.ndarray, class_names: Sequence[str]) -> str:
        """per_class.csv/.md for the test split, per_class_<split>.csv/.md for another; returns
        the Markdown table."""
        return write_per_class(
            self.root, "per_class" if split == "test" else f"per_class_{split}", cm, class_names
        )

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.write_text("summary.json", json.dumps(summary, indent=2) + "\n")


def wandb_has_credentials() -> bool:
    """What wandb itself would find: WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, a netrc entry for
    the configured host (WANDB_BASE_URL or its default) or a key in wandb's settings files.
    Asked without prompting and without any network traffic."""
    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth
    except ImportError:  # a wandb without this module (older releases): the key in the environment
        return bool(os.environ.get("WANDB_API_KEY"))
    host = wandb_setup.singleton().settings.base_url
    found = wbauth.authenticate_session(host=host, source="galaxydist", prompt=False, update_session=False)
    return found is not None


def resolve_wandb_mode(setting: str) -> str:
    """`auto` → WANDB_MODE when the environment sets it (clusters without internet often do),
    else online when credentials are configured, else offline. Other settings are used as given:
    a mode written in the config is a decision, not a default."""
    if setting != "auto":
        return setting
    env_mode = os.environ.get("WANDB_MODE", "")
    env_mode = {"dryrun": "offline", "run": "online"}.get(env_mode, env_mode)
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    return "online" if wandb_has_credentials() else "offline"


def confusion_chart(wandb: Any, cm: np.ndarray, class_names: Sequence[str], title: str) -> Any:
    """wandb.plot.confusion_matrix wants one (label, prediction) pair per image: expand the counts."""
    k = len(class_names)
    counts = np.asarray(cm, dtype=np.int64).ravel()
    y_true = np.repeat(np.repeat(np.arange(k), k), counts).tolist()
    preds = np.repeat(np.tile(np.arange(k), k), counts).tolist()
    return wandb.plot.confusion_matrix(y_true=y_true, preds=preds, class_names=list(class_names), title=title)


class Tracker:
    """Rank 0's reporter: every epoch and the final report go to the run folder (always) and to
    Weights & Biases (when enabled). Training never fails because reporting did.

    curves.png is redrawn after the first epoch and then at most every CURVES_EVERY_S, so that a run
    can be watched without W&B: drawing takes ~0.2 s, which every rank waits for, and short GPU
    epochs would spend a good part of the run on it. It is drawn once more at the end, with the
    confusion PNGs.
    """

    def __init__(self, cfg: Config, run: RunFolder, class_names: list[str]) -> None:
        self.cfg, self.run, self.class_names = cfg, run, class_names
        self.plots = Guard("drawing the PNGs")
        self.curves_drawn_at = -math.inf
        self.wandb_guard = Guard("Weights & Biases")
        self.wandb: Any = None  # the module, once a run is started
        self.wandb_run: Any = None
        if cfg.tracking.wandb != "disabled":
            self.wandb_guard.run(self._start_wandb)

    def _start_wandb(self) -> None:
        try:
            import wandb
        except ImportError as err:
            raise RuntimeError(f"wandb cannot be imported ({err}); pip install wandb") from None
        mode = resolve_wandb_mode(self.cfg.tracking.wandb)
        if mode == "disabled":
            return
        run_id = self._wandb_id()
        tracking = self.cfg.tracking
        self.wandb_run = wandb.init(
            project=tracking.project,
            name=tracking.name,
            group=tracking.group,
            tags=tracking.tags or None,
            config=self.cfg.to_dict(),
            id=run_id,
            resume="allow",
            mode=mode,
            dir=str(self.run.root),  # its files go to <run folder>/wandb/
        )
        self.wandb = wandb

    def _wandb_id(self) -> str:
        """The id saved in the run folder, or a new one (8 characters of [a-z0-9], like wandb's
        own) saved before wandb.init, so that a run killed during init still resumes it."""
        path = self.run.root / WANDB_ID_FILE
        saved = path.read_text().strip() if path.exists() else ""
        if saved:
            return saved
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        self.run.write_text(WANDB_ID_FILE, run_id + "\n")
        return run_id

    def resume_at(self, stage: int, epoch: int) -> None:
        """Forget epochs at or after the resume point: the resumed run logs them again."""
        self.run.keep_metrics(before=(stage, epoch))

    def log_epoch(self, record: dict[str, Any], val_confusion: np.ndarray) -> None:
        self.run.append_metrics(record)
        if time.monotonic() - self.curves_drawn_at >= CURVES_EVERY_S:
            self.plots.run(plot_curves, self.run.read_metrics(), self.run.root / "curves.png")
            self.curves_drawn_at = time.monotonic()
        if self.wandb_run is not None:
            self.wandb_guard.run(self._log_wandb_epoch, record, val_confusion)

    def _log_wandb_epoch(self, record: dict[str, Any], val_confusion: np.ndarray) -> None:
        chart = confusion_chart(self.wandb, val_confusion, self.class_names, "Validation confusion")
        self.wandb_run.log({**record, "val_confusion": chart})

    def epochs_per_stage(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self.run.read_metrics():
            counts[record["stage"]] = counts.get(record["stage"], 0) + 1
        return counts

    def finish(self, summary: dict[str, Any], val_confusion: np.ndarray, test_confusion: np.ndarray) -> str:
        """Write the final report; returns the test per-class table for the console."""
        self.run.write_report("val", val_confusion, self.class_names)
        table = self.run.write_report("test", test_confusion, self.class_names)
        pictures = {
            "curves": self.run.root / "curves.png",
            "confusion_val": self.run.root / "confusion_val.png",
            "confusion_test": self.run.root / "confusion_test.png",
        }
        self.plots.run(self._draw_final, pictures, val_confusion, test_confusion)
        self.run.write_summary(summary)
        if self.wandb_run is not None:
            drawn = [] if self.plots.failed else list(pictures.values())
            self.wandb_guard.run(self._finish_wandb, summary, test_confusion, drawn)
        return table

    def _draw_final(self, pictures: dict[str, Path], val_cm: np.ndarray, test_cm: np.ndarray) -> None:
        plot_curves(self.run.read_metrics(), pictures["curves"])
        plot_confusion(val_cm, self.class_names, pictures["confusion_val"], "Validation (best weights)")
        plot_confusion(test_cm, self.class_names, pictures["confusion_test"], "Test (best weights)")

    def _finish_wandb(
        self, summary: dict[str, Any], test_confusion: np.ndarray, pictures: list[Path]
    ) -> None:
        wandb, rows = self.wandb, per_class(test_confusion, self.class_names)
        table = wandb.Table(columns=list(CSV_COLUMNS), data=[[r[c] for c in CSV_COLUMNS] for r in rows])
        self.wandb_run.log(
            {
                "test_confusion": confusion_chart(wandb, test_confusion, self.class_names, "Test confusion"),
                "per_class_test": table,
                **{p.stem: wandb.Image(str(p)) for p in pictures},
            }
        )
        # Scalars (and the small epochs_per_stage mapping) as summary metrics; lists went to the table.
        self.wandb_run.summary.update(
            {
                **{k: v for k, v in summary.items() if not isinstance(v, list)},
                "test_balanced_accuracy": balanced_accuracy(test_confusion),
                **{f"test_acc/{r['class']}": r["accuracy"] for r in rows},
            }
        )
        self.wandb_run.finish()
