"""Recipe features: schedules, AdamW, label smoothing, EMA, label-aware mirror flips; exact
resume and world-size invariance with all of them on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_bad_train_input, read_metrics, run_train, tiny_overrides
from test_train import assert_same_state, final_state

from galaxydist import evaluate, train
from galaxydist.config import StageConfig
from galaxydist.data.augment import BatchTransform, swap_permutation
from galaxydist.data.dataset import SplitImages
from galaxydist.data.format import class_weights, read_prepared
from galaxydist.engine import trainer as trainer_module
from galaxydist.engine.builders import logit_offsets
from galaxydist.engine.ema import EMA
from galaxydist.engine.optim import lr_factor, param_groups
from galaxydist.engine.step import TrainStep
from galaxydist.inference.engine import load_model, predict_proba
from galaxydist.metrics import scores
from galaxydist.models.cnn import GalaxyCNN

EVERY_FEATURE = {
    "optim.name": "adamw",
    "loss.logit_adjustment": 0.5,
    "optim.weight_decay": 0.05,
    "loss.label_smoothing": 0.1,
    "ema.decay": 0.9,
    "augment.mirror_swap": "[[1,2]]",
    "stages": "[{name: t, lr: 0.003, max_epochs: 3, patience: 9, schedule: cosine, warmup_steps: 5}]",
}


def test_schedules_follow_their_formulas():
    steps = 10  # per epoch
    cosine = StageConfig(max_epochs=4, schedule="cosine", warmup_steps=5)
    for t in (0, 3, 4):
        assert lr_factor(cosine, t, steps) == pytest.approx((t + 1) / 5 * (1 + math.cos(0)) / 2)
    for t in (5, 17, 39):
        assert lr_factor(cosine, t, steps) == pytest.approx(0.5 * (1 + math.cos(math.pi * (t - 5) / 35)))
    assert lr_factor(cosine, 40, steps) == pytest.approx(0.0, abs=1e-12)
    step = StageConfig(max_epochs=30, schedule="step", step_epochs=3, step_gamma=0.5)
    assert [lr_factor(step, e * steps, steps) for e in (0, 2, 3, 6, 8, 9)] == [1, 1, 0.5, 0.25, 0.25, 0.125]
    assert lr_factor(StageConfig(), 123, steps) == 1.0


def test_no_weight_decay_on_batchnorm_parameters_and_biases():
    model = GalaxyCNN([4, 8], 3)
    groups = param_groups(model, StageConfig(lr=0.1), weight_decay=0.05)
    decayed = {id(p) for g in groups if g["weight_decay"] for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() > 1), name
    assert all(g["base_lr"] == 0.1 for g in groups)


def test_ema_after_k_steps_is_the_hand_computed_average():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.8)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    values = []
    for k in range(3):
        with torch.no_grad():
            model[0].weight.add_(k + 1.0)
        model.train()(torch.randn(4, 2) + k)  # moves the BatchNorm statistics too
        values.append({key: v.clone() for key, v in model.state_dict().items()})
        ema.update()
    for key, v in ema.model.state_dict().items():
        if not v.is_floating_point():
            assert torch.equal(v, values[-1][key])  # num_batches_tracked: copied
            continue
        expected = start[key]
        for step in values:
            expected = 0.8 * expected + 0.2 * step[key]
        torch.testing.assert_close(v, expected)


def test_a_mirror_swapped_batch_has_swapped_labels_and_mirrored_pixels():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    labels = torch.tensor([1, 0])
    swap = torch.tensor(swap_permutation([[1, 2]], 3))
    flip = BatchTransform(torch.zeros(3), torch.ones(3), 1.0, 0.0, 0.0, False, swap)
    draws = torch.tensor([[0.2, 0.5, 0.5], [0.7, 0.5, 0.5]])  # sample 0 flipped (< hflip=1), sample 1 too
    x = flip(images * 255, draws)  # normalise divides by 255 (mean 0, std 1 here)
    torch.testing.assert_close(x, images.flip(3))
    assert flip.targets(labels, draws).tolist() == [2, 0]
    both = BatchTransform(torch.zeros(3), torch.ones(3), 1.0, 1.0, 0.0, False, swap)  # two flips: a rotation
    assert both.targets(labels, draws).tolist() == [1, 0]
    none = BatchTransform(torch.zeros(3), torch.ones(3), 0.0, 0.0, 0.0, False, swap)
    assert none.targets(labels, draws).tolist() == [1, 0]


class MirrorEquivariant(torch.nn.Module):
    """logits(mirror x) = P · logits(x) exactly, for the class permutation P."""

    def __init__(self, perm: list[int]) -> None:
        super().__init__()
        self.g = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3))
        self.perm = perm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.g(x) + self.g(x.flip(3))[:, self.perm]


def test_tta_with_swap_pairs_gives_an_image_and_its_mirror_swapped_probabilities():
    torch.manual_seed(0)
    perm = swap_permutation([[1, 2]], 3)
    model = MirrorEquivariant(perm)
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    model(images.float())
    common = {"mean": [0.5] * 3, "std": [0.2] * 3, "tta": True, "description": None}
    p = predict_proba(model, images, swap=perm, **common)
    p_mirror = predict_proba(model, images.flip(3), swap=perm, **common)
    np.testing.assert_allclose(p_mirror, p[:, perm], rtol=1e-5, atol=1e-6)
    unswapped = predict_proba(model, images, **common)  # averaging a mirror without the swap mixes 1 and 2
    assert np.abs(unswapped - p).max() > 1e-3


def tiny_batch() -> tuple[GalaxyCNN, torch.Tensor, torch.Tensor]:
    """A seeded one-block CNN and a batch of 4 random 8² images of 3 classes."""
    torch.manual_seed(0)
    model = GalaxyCNN([4], 3, dropout=0.0)
    return model, torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), torch.tensor([0, 1, 2, 0])


def loss_sum_of_one_step(model, images: torch.Tensor, labels: torch.Tensor, **options: object) -> float:
    """The weighted loss sum one TrainStep reports (at lr 0: the model stays as it is)."""
    from galaxydist import distributed

    ctx = distributed.Context(0, 1, 0, torch.device("cpu"))
    transform = BatchTransform(torch.zeros(3), torch.ones(3), 0.0, 0.0, 0.0, False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    step = TrainStep(model, optimizer, torch.ones(3), transform, ctx, False, **options)
    n = len(labels)
    draws, keys, stop = (
        torch.zeros(n, 3),
        torch.zeros(n, dtype=torch.int64),
        torch.zeros(1, dtype=torch.float64),
    )
    return step(images, labels, draws, keys, stop)[1][0].item()


def test_label_smoothing_enters_the_training_loss():
    model, images, labels = tiny_batch()
    sums = {s: loss_sum_of_one_step(model, images, labels, label_smoothing=s) for s in (0.0, 0.2)}
    logits = model(images.float() / 255)
    expected = torch.nn.functional.cross_entropy(logits, labels, reduction="sum", label_smoothing=0.2).item()
    assert sums[0.2] == pytest.approx(expected, rel=1e-5) and sums[0.2] != pytest.approx(sums[0.0])


def test_ema_of_an_equivariant_cnn_evaluates_its_averaged_filters():
    """e2cnn expands its filters when switched to eval mode; the average rebuilds them from its own
    weights as they move, not from those it was copied from."""
    pytest.importorskip("e2cnn")
    from galaxydist.models.equivariant import EquivariantCNN

    torch.manual_seed(0)
    model = EquivariantCNN("C4", [2, 2], 3, dropout=0.0)
    ema = EMA(model, decay=1e-6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(8, 3, 16, 16)
    for _ in range(3):
        model.train()
        optimizer.zero_grad()
        model(x).logsumexp(1).mean().backward()
        optimizer.step()
        ema.update()
    with torch.no_grad():
        trained = model.eval()(x)
        averaged = ema.refresh()(x)
    torch.testing.assert_close(averaged, trained, rtol=1e-4, atol=1e-5)


def test_a_run_trains_with_its_configured_ema_label_smoothing_and_logit_adjustment(
    tiny_prepared, tmp_path, monkeypatch
):
    """The config reaches the training step: an average with a tiny decay ends on the trained
    weights (not on those it started from), and label smoothing changes the training loss."""
    stages = "[{name: t, lr: 0.003, max_epochs: 1, patience: 1}]"
    losses = {}
    for smoothing, adjustment in ((0.0, 0.0), (0.3, 0.0), (0.0, 1.0)):
        run = tmp_path / f"run{smoothing}_{adjustment}"
        extra = {
            "loss.label_smoothing": smoothing,
            "loss.logit_adjustment": adjustment,
            "ema.decay": 1e-6,
            "stages": stages,
        }
        assert in_process(tiny_overrides(tiny_prepared, run, **extra), monkeypatch) == 0
        losses[smoothing, adjustment] = read_metrics(run)[0]["train_loss"]
        last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
        assert_same_state(last["ema"], last["model"], rtol=0, atol=1e-5)
    # One process, one seed: without the options reaching the loss the three are bit-equal.
    assert losses[0.3, 0.0] != losses[0.0, 0.0] and losses[0.0, 1.0] != losses[0.0, 0.0]


def test_logit_adjustment_adds_tau_log_frequency_to_the_logits_of_the_training_loss():
    model, images, labels = tiny_batch()
    offsets = 0.5 * torch.tensor([0.7, 0.2, 0.1]).log()
    loss_sum = loss_sum_of_one_step(model, images, labels, logit_offsets=offsets)
    logits = model(images.float() / 255)
    expected = torch.nn.functional.cross_entropy(logits + offsets, labels, reduction="sum").item()
    assert loss_sum == pytest.approx(expected, rel=1e-5)
    assert loss_sum != pytest.approx(
        torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
    )


def test_the_offsets_are_tau_log_frequency_up_to_a_constant():
    counts = np.array([700, 200, 100])
    weights = class_weights(np.repeat(np.arange(3), counts), 3)
    offsets = logit_offsets(weights, 0.5, torch.device("cpu")).double()
    expected = 0.5 * torch.tensor(counts / counts.sum()).log()
    torch.testing.assert_close(offsets - offsets.mean(), expected - expected.mean())


def test_class_weight_power_weights_the_loss_in_training_and_in_evaluate(
    tiny_prepared, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    stages = "[{name: t, lr: 0.003, max_epochs: 1, patience: 1}]"
    overrides = tiny_overrides(tiny_prepared, run, **{"loss.class_weight_power": 0.5, "stages": stages})
    assert in_process(overrides, monkeypatch) == 0
    trained = json.loads((run / "summary.json").read_text())
    report = evaluate.evaluate(run, out=str(tmp_path / "eval"))
    assert report["plain"]["loss"] == pytest.approx(trained["test_loss"], rel=1e-5)
    info = read_prepared(tiny_prepared)
    assert np.ptp(info.class_weights) > 0.1  # unequal classes, so the power changes the loss
    model, meta = load_model(run / "checkpoints" / "best.pt", torch.device("cpu"))
    probs = predict_proba(
        model, SplitImages(info, "test"), meta.mean, meta.std, False, False, description=None
    )
    labels = info.labels[info.splits["test"]]
    for power, same in ((0.5, True), (1.0, False)):
        loss = scores(probs, labels, info.class_weights**power, info.class_names)["loss"]
        assert (loss == pytest.approx(trained["test_loss"], rel=1e-5)) is same, power


def in_process(overrides: list[str], monkeypatch, stop_after: int | None = None) -> int:
    """galaxydist.train in this process; with `stop_after`, a stop request after that many steps
    (as a signal would set it), landing mid-epoch."""
    if stop_after is not None:
        calls = {"n": 0}
        original = TrainStep.__call__

        def counting(self, *args):
            calls["n"] += 1
            if calls["n"] == stop_after:
                monkeypatch.setattr(trainer_module, "_stop_requested", True)
            return original(self, *args)

        monkeypatch.setattr(TrainStep, "__call__", counting)
    try:
        return train.main(overrides)
    finally:
        monkeypatch.setattr(trainer_module, "_stop_requested", False)
        monkeypatch.setattr(TrainStep, "__call__", TrainStep.__call__)


def straight_and_stopped(tiny_prepared, tmp_path, monkeypatch, extra: dict) -> tuple[Path, Path, dict]:
    """A run straight through, and the same run stopped 5 steps into its second epoch: the two
    folders and the stopped run's last.pt."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert in_process(tiny_overrides(tiny_prepared, straight, **extra), monkeypatch) == 0
    steps = 420 // 32  # tiny_prepared's training split at batch 32
    with monkeypatch.context() as patch:
        args = tiny_overrides(tiny_prepared, resumed, **extra)
        assert in_process(args, patch, stop_after=steps + 5) == train.EXIT_INTERRUPTED
    return straight, resumed, torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)


def test_a_run_with_every_feature_resumed_mid_epoch_ends_like_an_uninterrupted_one(
    tiny_prepared, tmp_path, monkeypatch, capsys
):
    straight, resumed, stopped = straight_and_stopped(tiny_prepared, tmp_path, monkeypatch, EVERY_FEATURE)
    assert stopped["position"]["epoch"] == 1 and stopped["position"]["step"] == 6  # mid-epoch
    assert "ema" in stopped
    assert in_process(tiny_overrides(tiny_prepared, resumed, **EVERY_FEATURE), monkeypatch) == 0
    assert "resuming from" in capsys.readouterr().out
    a, b = (
        torch.load(straight / "checkpoints" / "last.pt", weights_only=True),
        torch.load(resumed / "checkpoints" / "last.pt", weights_only=True),
    )
    for part in ("model", "ema"):
        assert_same_state(a[part], b[part], rtol=0, atol=0)
    ma, mb = read_metrics(straight), read_metrics(resumed)
    assert [m["lr"] for m in ma] == [m["lr"] for m in mb]
    assert ma[0]["lr"] < 0.003  # the cosine has come down from its peak
    for key in ("train_loss", "val_loss", "val_acc"):
        assert [m[key] for m in ma] == [m[key] for m in mb], key
    # best.pt holds the moving average, which evaluate and predict use.
    best = torch.load(straight / "checkpoints" / "best.pt", weights_only=True)
    assert "ema" not in best
    summary = json.loads((straight / "summary.json").read_text())
    from galaxydist import evaluate

    assert evaluate.evaluate(straight, "test")["plain"]["confusion"] == summary["test_confusion"]


def test_an_e2cnn_run_with_ema_resumed_mid_epoch_in_its_second_stage_ends_like_an_uninterrupted_one(
    tiny_prepared, tmp_path, monkeypatch, capsys
):
    """e2cnn's expanded filters come and go with the mode: the checkpoints must load whichever mode
    wrote them, at a stage change (best.pt into the training model) and on resume (last.pt)."""
    pytest.importorskip("e2cnn")
    extra = {
        "model.name": "e2cnn",
        "model.group": "C4",
        "model.channels": "[2,4,4]",
        "ema.decay": 0.9,
        "loss.logit_adjustment": 0.5,
        "stages": "[{name: a, lr: 0.003, max_epochs: 1, patience: 9}, {name: b, lr: 0.001, max_epochs: 1, patience: 9}]",
    }
    straight, resumed, stopped = straight_and_stopped(tiny_prepared, tmp_path, monkeypatch, extra)
    assert (stopped["position"]["stage"], stopped["position"]["step"]) == (1, 6)
    assert in_process(tiny_overrides(tiny_prepared, resumed, **extra), monkeypatch) == 0
    assert "resuming from" in capsys.readouterr().out
    a, b = (torch.load(run / "checkpoints" / "last.pt", weights_only=True) for run in (straight, resumed))
    for part in ("model", "ema"):
        assert_same_state(a[part], b[part], rtol=0, atol=0)
    summary = json.loads((straight / "summary.json").read_text())
    assert evaluate.evaluate(straight, "test")["plain"]["confusion"] == summary["test_confusion"]


def test_two_ranks_of_32_equal_one_rank_of_64_with_every_feature(tiny_prepared, tmp_path):
    extra = {**EVERY_FEATURE, "data.batch_size": 64, "augment.hflip": 0.5}
    one = run_train(
        0, tiny_overrides(tiny_prepared, tmp_path / "one", **extra, **{"distributed.exact_batchnorm": "true"})
    )
    two = run_train(2, tiny_overrides(tiny_prepared, tmp_path / "two", **extra))
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_state(final_state(tmp_path / "one"), final_state(tmp_path / "two"))
    ema = [
        torch.load(tmp_path / r / "checkpoints" / "last.pt", weights_only=True)["ema"] for r in ("one", "two")
    ]
    assert_same_state(*ema)


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            {"augment.mirror_swap": "[[1,1]]"},
            "'augment.mirror_swap.0': [1, 1] must pair two different classes",
        ),
        ({"augment.mirror_swap": "[[1,12]]"}, "'augment.mirror_swap.0': class 12 is not in"),
        ({"augment.mirror_swap": "[[1,2],[2,3]]"}, "'augment.mirror_swap.1'"),
        ({"optim.name": "sgd"}, "'optim.name': 'sgd' is not one of adam | adamw"),
        ({"ema.decay": 1.5}, "'ema.decay': must be in (0, 1)"),
        ({"loss.label_smoothing": -0.1}, "'loss.label_smoothing'"),
        ({"loss.logit_adjustment": -1}, "'loss.logit_adjustment': must be >= 0"),
        ({"loss.class_weight_power": 2}, "'loss.class_weight_power': must be in [0, 1], got 2"),
        ({"stages.0.schedule": "linear"}, "'stages.0.schedule': 'linear' is not one of"),
    ],
)
def test_bad_recipe_input_is_one_line_exit_2_nothing_written(tiny_prepared, tmp_path, extra, message):
    assert_bad_train_input(tiny_prepared, tmp_path / "run", extra, message)
