"""What a run leaves behind: the run folder (always) and Weights & Biases (when enabled).

Only rank 0 constructs a Tracker; other ranks never touch the run folder or wandb.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .atomic import atomic_path
from .metrics import format_table, per_class

if TYPE_CHECKING:
    from .config import Config


class RunFolder:
    """config.yaml, metrics.jsonl, summary.json, per-class tables and checkpoints/ of one run."""

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
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def keep_metrics(self, before: tuple[int, int]) -> None:
        """Drop lines at or after (stage_index, epoch): a resumed run writes them again."""
        kept = [r for r in self.read_metrics() if (r["stage_index"], r["epoch"]) < before]
        self.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def write_report(self, split: str, cm: np.ndarray, class_names: list[str]) -> str:
        """per_class.csv / per_class.md for `split`; returns the Markdown table."""
        table = format_table(cm, class_names)
        suffix = "" if split == "test" else f"_{split}"
        self.write_text(f"per_class{suffix}.md", table + "\n")
        header = "class,support,accuracy,precision,recall,f1\n"
        rows = "".join(
            f'"{r["class"]}",{r["support"]},{r["accuracy"]:.6f},{r["precision"]:.6f},{r["recall"]:.6f},{r["f1"]:.6f}\n'
            for r in per_class(cm, class_names)
        )
        self.write_text(f"per_class{suffix}.csv", header + rows)
        return table

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.write_text("summary.json", json.dumps(summary, indent=2) + "\n")


class Tracker:
    """Rank 0's reporter: every epoch and the final report go to the run folder (always) and to
    Weights & Biases (when enabled). Training never fails because reporting did."""

    def __init__(self, cfg: Config, run: RunFolder, class_names: list[str]) -> None:
        self.cfg, self.run, self.class_names = cfg, run, class_names

    def resume_at(self, stage: int, epoch: int) -> None:
        """Forget epochs at or after the resume point: the resumed run logs them again."""
        self.run.keep_metrics(before=(stage, epoch))

    def log_epoch(self, record: dict[str, Any], val_confusion: np.ndarray) -> None:
        self.run.append_metrics(record)

    def epochs_per_stage(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self.run.read_metrics():
            counts[record["stage"]] = counts.get(record["stage"], 0) + 1
        return counts

    def finish(self, summary: dict[str, Any], val_confusion: np.ndarray, test_confusion: np.ndarray) -> str:
        """Write the final report; returns the test per-class table for the console."""
        self.run.write_report("val", val_confusion, self.class_names)
        table = self.run.write_report("test", test_confusion, self.class_names)
        self.run.write_summary(summary)
        return table
