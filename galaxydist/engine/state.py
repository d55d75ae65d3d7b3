"""Where training stands (Position), early stopping, and the checks that let a checkpoint
resume this run exactly."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..config import Config, ModelConfig
from ..data.format import PreparedInfo
from ..errors import UserError
from ..tracking import RunFolder


@dataclass
class EarlyStopping:
    """Stop after `patience` validations without a better score."""

    patience: int
    best: float = -math.inf
    bad_epochs: int = 0

    def update(self, score: float) -> bool:
        if score > self.best:
            self.best, self.bad_epochs = score, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


@dataclass
class Position:
    """Where training stands: enough, with the weights and optimiser, to resume exactly."""

    stage: int = 0
    epoch: int = 0
    step: int = 0  # optimiser steps done in this epoch
    best_val: float = -math.inf  # best validation score (cfg.select_on) over all stages: best.pt
    stopper: dict[str, Any] = field(default_factory=dict)
    train_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    seconds: float = 0.0  # time already spent in this epoch before an interruption

    def record_score(self, score: float, stopper: EarlyStopping) -> bool:
        """A validation score into the stage's stopper and the overall best; True if the best."""
        improved = score > self.best_val
        stopper.update(score)
        self.best_val = max(self.best_val, score)
        return improved

    def advance(self) -> None:
        """One optimiser step done."""
        self.step += 1

    def next_epoch(self, stopper: EarlyStopping) -> None:
        self.epoch, self.step, self.seconds, self.train_sums = self.epoch + 1, 0, 0.0, [0.0] * 4
        self.stopper = {"best": stopper.best, "bad_epochs": stopper.bad_epochs}

    def next_stage(self) -> None:
        self.stage, self.epoch, self.step, self.stopper = self.stage + 1, 0, 0, {}

    def interrupt(self, train_sums: list[float], seconds: float) -> None:
        """Mid-epoch: the global sums so far and the time spent, for the resumed epoch to go on."""
        self.train_sums, self.seconds = train_sums, seconds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def same_model(saved: dict[str, Any], model: ModelConfig) -> bool:
    """A saved `model` section against this run's (keys added since it was saved take their defaults)."""
    return {**asdict(ModelConfig()), **saved} == asdict(model)


def load_resume_state(cfg: Config, info: PreparedInfo, resume: str | None) -> tuple[Path, dict] | None:
    """The checkpoint to continue from (`resume`, else output_dir's last.pt), checked against this
    run's model and classes; None for a fresh run."""
    path = Path(resume) if resume else RunFolder(cfg.output_dir).checkpoints / "last.pt"
    if not path.exists():
        if resume:
            raise UserError(f"{resume}: checkpoint not found")
        return None
    state = checkpoint.load(path)
    saved = state.get("config", {})
    if not same_model(saved.get("model", {}), cfg.model) or state.get("class_names") != list(
        info.class_names
    ):
        raise UserError(
            f"{path}: checkpoint is for another model or class list ({saved.get('model')}); "
            "use another output_dir or matching model settings"
        )
    # Mid-epoch, the position counts batches of one sample order: it must be this run's order.
    same_order = (saved.get("seed"), saved.get("data", {}).get("batch_size"), state.get("train_size")) == (
        cfg.seed,
        cfg.data.batch_size,
        len(info.splits["train"]),
    )
    if state.get("position", {}).get("step", 0) and not same_order:
        raise UserError(
            f"{path}: stopped mid-epoch with another seed, data.batch_size or training set; "
            "resume with the settings it was saved with"
        )
    return path, state


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """`saved` (an optimizer state_dict) into `optimizer`, adapted to where it runs now.

    torch restores the saving run's `fused` and `capturable` flags with the state (a CPU
    checkpoint would resume unfused on a GPU, and a graph could not capture a non-capturable Adam),
    and moments keep the saving run's memory layout (speed.channels_last may differ; CUDA's fused
    Adam refuses moments laid out unlike their parameters).
    """
    ours = optimizer.param_groups
    flags = {"fused": ours[0].get("fused"), "capturable": ours[0].get("capturable", False)}
    # The rates are this run's (the schedule sets them at every step; a CUDA-graphs run keeps them
    # as tensors); a checkpoint from before base_lr existed resumes too.
    rates = [{k: group[k] for k in ("lr", "base_lr") if k in group} for group in ours]
    if len(saved["param_groups"]) != len(ours):
        raise UserError(
            f"the checkpoint's optimiser has {len(saved['param_groups'])} parameter groups, this stage "
            f"{len(ours)}: resume with the stage settings it was saved with (train, lr_decay, optim)"
        )
    groups = [{**group, **flags, **rate} for group, rate in zip(saved["param_groups"], rates, strict=True)]
    optimizer.load_state_dict({**saved, "param_groups": groups})
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape:
                state[key] = torch.empty_like(param).copy_(value)
