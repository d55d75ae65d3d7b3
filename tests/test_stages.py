"""Stage changes and what early stopping follows: each stage starts from best.pt, a stop in
stage 2 resumes exactly, and select_on picks its own best epoch and stopping epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_metrics, tiny_overrides
from test_recipes import in_process
from test_train import assert_same_state

from galaxydist import train
from galaxydist.engine.trainer import Evaluation, Trainer
from galaxydist.metrics import accuracy

TWO_STAGES = (
    "[{name: a, lr: 0.01, max_epochs: 6, patience: 9}, {name: b, lr: 0.001, max_epochs: 3, patience: 9}]"
)
STEPS = 420 // 32  # optimiser steps per epoch of tiny_prepared at batch 32


def script_validation(patch: pytest.MonkeyPatch, script: list[tuple[int, int]]) -> list[dict]:
    """Training stays real; the validation confusion matrix the trainer sees after epoch i is a
    two-class one with script[i] = (right of 90, right of 10), so that which epoch is best does not
    hang on the CPU's float rounding. Returns the weights each scripted score was given to."""
    original, evaluated = Trainer.evaluate, []

    def scripted(self, split, full_precision=False):
        real = original(self, split, full_precision)
        if split != "val" or full_precision:  # the end-of-run evaluations stay real
            return real
        right_of_90, right_of_10 = script[len(evaluated)]
        evaluated.append({k: v.clone() for k, v in self.eval_model.state_dict().items()})
        cm = np.zeros_like(real.confusion)
        cm[0, 0], cm[0, 1], cm[1, 1], cm[1, 0] = right_of_90, 90 - right_of_90, right_of_10, 10 - right_of_10
        return Evaluation(real.loss, accuracy(cm), cm)

    patch.setattr(Trainer, "evaluate", scripted)
    return evaluated


def test_the_second_stage_starts_from_the_best_weights_not_the_last(
    tiny_prepared, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    starts = {}
    original = Trainer.start_stage

    def recording(self, stage, saved_state=None):
        if saved_state is None:
            starts[stage.name] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return original(self, stage, saved_state)

    monkeypatch.setattr(Trainer, "start_stage", recording)
    stage_a = [(50, 2), (60, 3), (85, 8), (70, 5), (72, 5), (74, 5)]  # accuracy peaks at epoch 3 of 6
    evaluated = script_validation(monkeypatch, [*stage_a, (60, 5), (60, 5), (60, 5)])
    assert in_process(tiny_overrides(tiny_prepared, run, stages=TWO_STAGES), monkeypatch) == 0
    assert [r["val_acc"] for r in read_metrics(run)][:6] == [(a + b) / 100 for a, b in stage_a]
    assert_same_state(starts["b"], evaluated[2], rtol=0, atol=0)  # stage b began from epoch 3's weights
    with pytest.raises(AssertionError):
        assert_same_state(starts["b"], evaluated[5], rtol=0, atol=0)  # not from stage a's last


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


# Accuracy peaks at epoch 2 (0.81), balanced accuracy at epoch 5 (0.756): with patience 3,
# selecting on accuracy stops after 5 epochs, on balanced accuracy after 8.
SCRIPTED_VAL = [(50, 2), (80, 1), (70, 5), (60, 7), (55, 9), (75, 3), (65, 6), (60, 8), (50, 5), (50, 5)]


def test_select_on_balanced_accuracy_picks_its_own_best_epoch_and_stopping_epoch(
    tiny_prepared, tmp_path, monkeypatch, capsys
):
    stages = "[{name: a, lr: 0.01, max_epochs: 10, patience: 3}]"

    def train_selecting(select: str) -> tuple[Path, list[dict], list[dict]]:
        run = tmp_path / select
        with monkeypatch.context() as patch:
            evaluated = script_validation(patch, SCRIPTED_VAL)
            overrides = tiny_overrides(tiny_prepared, run, seed=1, select_on=select, stages=stages)
            assert in_process(overrides, patch) == 0
        return run, read_metrics(run), evaluated

    expected = {"accuracy": (5, 2), "balanced_accuracy": (8, 5)}  # (epochs run, best epoch)
    for select, key in (("accuracy", "val_acc"), ("balanced_accuracy", "val_balanced_acc")):
        run, records, evaluated = train_selecting(select)
        scores = [r[key] for r in records]
        assert len(records) == stops_where_patience_says(records, key, patience=3, max_epochs=10), select
        assert (len(records), scores.index(max(scores)) + 1) == expected[select], select
        best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
        assert best["position"]["epoch"] == expected[select][1], select  # saved after that epoch
        assert best["position"]["best_val"] == max(scores)
        assert_same_state(best["model"], evaluated[expected[select][1] - 1], rtol=0, atol=0)
