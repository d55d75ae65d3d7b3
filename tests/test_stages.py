"""Stage changes and what early stopping follows: each stage starts from best.pt, a stop in
stage 2 resumes exactly, and select_on picks its own best epoch and stopping epoch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, tiny_overrides
from test_recipes import in_process
from test_train import assert_same_state

from galaxydist import checkpoint, train
from galaxydist.engine.trainer import Trainer

# Measured on the tiny synthetic set: with these settings stage "a" peaks at epoch 4 of 6 (seed 0),
# and accuracy and balanced accuracy peak at different epochs (seed 1). The tests check that
# premise first, so that a change of arithmetic shows up as such, not as a pass.
TWO_STAGES = (
    "[{name: a, lr: 0.01, max_epochs: 6, patience: 9}, {name: b, lr: 0.001, max_epochs: 3, patience: 9}]"
)
STEPS = 420 // 32  # optimiser steps per epoch of tiny_prepared at batch 32


def test_the_second_stage_starts_from_the_best_weights_not_the_last(
    tiny_prepared, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    starts = {}
    original = Trainer.start_stage

    def recording(self, stage, saved_state=None):
        if saved_state is None:
            best = self.run.checkpoints / "best.pt"
            starts[stage.name] = (
                {k: v.clone() for k, v in self.model.state_dict().items()},
                checkpoint.load(best)["model"] if best.exists() else None,
            )
        return original(self, stage, saved_state)

    monkeypatch.setattr(Trainer, "start_stage", recording)
    assert in_process(tiny_overrides(tiny_prepared, run, stages=TWO_STAGES), monkeypatch) == 0
    records = read_metrics(run)
    stage_a = [r["val_acc"] for r in records if r["stage"] == "a"]
    assert len(stage_a) == 6 and stage_a.index(max(stage_a)) < 5  # premise: best is not the last
    weights, best = starts["b"]
    assert_same_state(weights, best, rtol=0, atol=0)  # stage b began from best.pt


def test_a_stop_in_the_second_stage_resumes_exactly(tiny_prepared, tmp_path, monkeypatch, capsys):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert in_process(tiny_overrides(tiny_prepared, straight, stages=TWO_STAGES), monkeypatch) == 0
    args = tiny_overrides(tiny_prepared, stopped, stages=TWO_STAGES)
    with monkeypatch.context() as patch:
        assert in_process(args, patch, stop_after=6 * STEPS + 5) == train.EXIT_INTERRUPTED
    position = torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)["position"]
    assert (position["stage"], position["epoch"], position["step"]) == (1, 0, 6)
    assert in_process(args, monkeypatch) == 0
    a, b = (
        torch.load(r / "checkpoints" / "last.pt", weights_only=True)["model"] for r in (straight, stopped)
    )
    assert_same_state(a, b, rtol=0, atol=0)
    assert read_metrics(straight) == [
        {**r, "seconds": s["seconds"], "images_per_second": s["images_per_second"]}
        for r, s in zip(read_metrics(stopped), read_metrics(straight), strict=True)
    ]


def stops_where_patience_says(records: list[dict], key: str, patience: int, max_epochs: int) -> int:
    """The epoch count the stopping rule gives for the series `key`: patience epochs past the
    last strict improvement, or max_epochs."""
    best, last_improvement = -1.0, 0
    for i, r in enumerate(records):
        if r[key] > best:
            best, last_improvement = r[key], i
        if i - last_improvement >= patience:
            return i + 1
    return max_epochs


def test_select_on_balanced_accuracy_picks_its_own_best_epoch_and_stopping_epoch(
    tiny_prepared, tmp_path, monkeypatch, capsys
):
    stages = "[{name: a, lr: 0.01, max_epochs: 10, patience: 3}]"

    def train_selecting(select: str, seed: int) -> tuple[Path, list[dict]]:
        run = tmp_path / f"{select}-{seed}"
        overrides = tiny_overrides(tiny_prepared, run, seed=seed, select_on=select, stages=stages)
        assert in_process(overrides, monkeypatch) == 0
        return run, read_metrics(run)

    # The premise: a seed whose two scores peak at different epochs. Which seeds do depends on the
    # CPU's float rounding, so the first of a few that does; the other run follows the same epochs.
    for seed in range(1, 6):
        by_balanced = train_selecting("balanced_accuracy", seed)
        acc = [r["val_acc"] for r in by_balanced[1]]
        bal = [r["val_balanced_acc"] for r in by_balanced[1]]
        if acc.index(max(acc)) != bal.index(max(bal)):
            break
    else:
        pytest.fail("no seed in 1-5 where accuracy and balanced accuracy peak at different epochs")
    runs = {"balanced_accuracy": by_balanced, "accuracy": train_selecting("accuracy", seed)}
    for select, key in (("accuracy", "val_acc"), ("balanced_accuracy", "val_balanced_acc")):
        run, records = runs[select]
        assert len(records) == stops_where_patience_says(records, key, patience=3, max_epochs=10), select
        scores = [r[key] for r in records]
        best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
        assert best["position"]["epoch"] == scores.index(max(scores)) + 1, select  # saved after that epoch
        assert best["position"]["best_val"] == max(scores)
        summary = json.loads((run / "summary.json").read_text())
        assert summary["val_accuracy"] == records[scores.index(max(scores))]["val_acc"]
