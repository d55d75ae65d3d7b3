"""CUDA-only paths, run where a GPU is (skipped elsewhere: CI has none). On a lent device:
`python3 -m pytest tests/test_cuda.py` (benchmarks/gpu_session.sh runs it first)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import read_metrics, run_train
from torch import nn

from galaxydist.engine.step import GraphedStep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).cuda()  # fmt: skip


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer):
    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def test_graphed_step_trains_like_eager_on_fresh_inputs_each_call(monkeypatch):
    """Every replay must see that call's batch (not the captured one), carry the optimiser and
    BatchNorm state forward, and fall back to eager for a batch of another shape."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    eager_model = small_net()
    graphed_model = copy.deepcopy(eager_model)
    eager_opt = torch.optim.Adam(eager_model.parameters(), lr=1e-2, fused=True, capturable=True)
    graphed_opt = torch.optim.Adam(graphed_model.parameters(), lr=1e-2, fused=True, capturable=True)
    eager, graphed = make_step(eager_model, eager_opt), GraphedStep(make_step(graphed_model, graphed_opt))
    gen = torch.Generator(device="cuda").manual_seed(1)
    sizes = [16] * 6 + [5] + [16] * 3  # warm-up, capture, replays, a short batch, replays
    for size in sizes:
        x = torch.randn(size, 3, 8, 8, device="cuda", generator=gen)
        y = torch.randint(0, 4, (size,), device="cuda", generator=gen)
        expected, got = eager(x, y), graphed(x, y)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert graphed.graph is not None
    for a, b in zip(graphed_model.state_dict().values(), eager_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_graphed_dropout_follows_the_seed_set_before_each_replay():
    dropout = nn.Dropout(0.5)
    graphed = GraphedStep(lambda x: dropout(x) * 1.0)
    x = torch.ones(4096, device="cuda")
    masks = {}
    for seed in [1, 2, 3, 4, 5, 4, 1, 2]:  # 3 warm-up calls, then replays
        torch.cuda.manual_seed(seed)
        masks.setdefault(seed, []).append(graphed(x).clone())
    assert graphed.graph is not None
    torch.testing.assert_close(masks[4][1], masks[4][0])  # two replays, one seed: one mask
    assert not torch.equal(masks[4][0], masks[5][0])  # two replays, two seeds: two masks
    torch.testing.assert_close(masks[1][1], masks[1][0])  # a replay draws as eager does
    torch.testing.assert_close(masks[2][1], masks[2][0])


@pytest.mark.parametrize(
    "data",
    [["speed.resident=true"], ["speed.resident=false", "data.num_workers=2"]],
    ids=["resident", "streamed"],
)
def test_trainer_with_cuda_graphs_matches_eager(tmp_path, tiny_prepared, data):
    """The whole Trainer, graphed and eager, float32 without dropout: the same epochs. Streamed,
    the loader's pin-memory thread allocates while the step is captured."""
    common = [f"data.path={tiny_prepared}", "tracking.wandb=disabled", "speed.bf16=false", "model.dropout=0"]
    common += ["stages.0.max_epochs=2", "stages.1.max_epochs=1", "data.batch_size=32", *data]
    runs = {}
    for graphs in ("true", "false"):
        out = tmp_path / graphs
        result = run_train(0, [*common, f"output_dir={out}", f"speed.cuda_graphs={graphs}"])
        assert result.returncode == 0, result.stderr[-3000:]
        runs[graphs] = read_metrics(out)
        captured = json.loads((out / "summary.json").read_text())["cuda_graph_captured"]
        assert captured is (graphs == "true")  # the graphed run really replayed a captured step
    assert len(runs["true"]) == len(runs["false"]) == 3
    for graphed, eager in zip(runs["true"], runs["false"], strict=True):
        assert graphed["train_loss"] == pytest.approx(eager["train_loss"], rel=2e-2)
        assert graphed["val_loss"] == pytest.approx(eager["val_loss"], rel=5e-2)
