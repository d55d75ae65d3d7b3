"""The Trainer: handed built parts (see `builders`), it runs the stages top to bottom, saves
snapshots and resumes from them transparently."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoint, distributed
from ..config import Config, StageConfig
from ..data.augment import BatchTransform, derive_seed, sample_keys, uniforms
from ..data.dataset import host_to_device
from ..data.format import PreparedInfo
from ..data.samplers import TrainBatches
from ..inference.engine import logits as model_logits
from ..metrics import accuracy, balanced_accuracy, confusion_matrix, per_class
from ..progress import track
from ..tracking import RunFolder, Tracker
from .ema import EMA
from .optim import OptimizerFactory, frozen_batchnorms, lr_factor, param_groups, set_lr
from .state import EarlyStopping, Position, load_optimizer_state
from .step import GraphedStep, StepFlags, TrainStep, seed_dropout


class Interrupted(Exception):
    """A stop signal arrived; last.pt holds the position to resume from."""


class NonFiniteLoss(Exception):
    pass


_stop_requested = False


def request_stop(signum: int, frame: object) -> None:
    """Signal handler: every rank finishes its current step, then all stop together."""
    global _stop_requested
    _stop_requested = True


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    confusion: np.ndarray


@dataclass
class TrainingParts:
    """What the Trainer is handed, built by `builders.build_parts`."""

    model: nn.Module  # the bare module: its parameters are those `forward` trains
    forward: Callable[[torch.Tensor], torch.Tensor]  # DDP-wrapped (and maybe compiled) model
    train_batches: TrainBatches
    train_loader: Iterable
    eval_loaders: dict[str, Iterable]
    transform: BatchTransform
    class_weights: torch.Tensor
    logit_offsets: torch.Tensor  # added to the logits in the training loss (loss.logit_adjustment)
    make_optimizer: OptimizerFactory
    run: RunFolder
    tracker: Tracker | None
    bf16: bool
    cuda_graphs: bool
    ema: EMA | None = None


class Trainer:
    def __init__(
        self, cfg: Config, ctx: distributed.Context, info: PreparedInfo, parts: TrainingParts
    ) -> None:
        self.cfg, self.ctx, self.info, self.parts = cfg, ctx, info, parts
        self.model, self.run, self.tracker, self.ema = parts.model, parts.run, parts.tracker, parts.ema
        # What validation, best.pt and the final test see: the moving average when there is one.
        self.eval_model = self.ema.model if self.ema else self.model
        self.optimizer: torch.optim.Optimizer | None = None
        self.step: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
        self.frozen: list[nn.Module] = []  # BatchNorm layers of parameters this stage does not train
        self.captured_graph = False  # whether any training step was replayed as a CUDA graph

    # --- the run, top to bottom -------------------------------------------------------------
    def fit(self, resume: tuple[Path, dict] | None = None) -> dict[str, Any]:
        pos = self.restore(resume)
        stages = self.cfg.stages
        while pos.stage < len(stages):
            stage = stages[pos.stage]
            if pos.epoch >= stage.max_epochs:  # resumed with a lower max_epochs: this stage is done
                pos.next_stage()
                self.optimizer = None
                continue
            if self.optimizer is None:  # a fresh stage: best weights so far, a new optimiser
                if pos.stage > 0:
                    self.model.load_state_dict(checkpoint.load(self.run.checkpoints / "best.pt")["model"])
                if self.ema:
                    self.ema.reset(self.model)
                self.start_stage(stage)
            stopper = EarlyStopping(stage.patience, **pos.stopper)
            while pos.epoch < stage.max_epochs:
                train_loss, train_acc, seconds, images = self.train_epoch(pos)
                val = self.evaluate("val")
                improved = pos.record_score(self.score(val), stopper)
                record = {
                    "stage": stage.name,
                    "stage_index": pos.stage,
                    "epoch": pos.epoch,
                    "train_loss": train_loss,
                    "train_acc": train_acc,
                    "val_loss": val.loss,
                    "val_acc": val.accuracy,
                    "val_balanced_acc": balanced_accuracy(val.confusion),
                    "lr": float(self.optimizer.param_groups[0]["lr"]),  # the last step's (the head's)
                    "seconds": seconds,
                    "images_per_second": images / seconds,
                }
                self.report_epoch(record, val.confusion)
                self.log(
                    f"[{stage.name} {pos.epoch + 1}/{stage.max_epochs}] train loss {train_loss:.4f} "
                    f"acc {train_acc:.4f} | val loss {val.loss:.4f} acc {val.accuracy:.4f} | "
                    f"{images / seconds:.0f} img/s{' *' if improved else ''}"
                )
                pos.next_epoch(stopper)
                if improved:
                    self.save("best.pt", pos, val)
                stopping = distributed.any_rank(stopper.should_stop, self.ctx.device)
                stage_done = stopping or pos.epoch >= stage.max_epochs
                if stage_done:
                    pos.next_stage()
                    self.optimizer = None
                self.save("last.pt", pos)
                if stage_done:
                    break
        return self.finish()

    def train_epoch(self, pos: Position) -> tuple[float, float, float, int]:
        """One epoch (or its rest, after a resume); returns loss, accuracy, seconds, images."""
        cfg, ctx = self.cfg, self.ctx
        epoch_key = pos.stage * 10_000 + pos.epoch
        self.parts.forward.train()
        for module in self.frozen:
            module.eval()
        self.parts.train_batches.set_epoch(epoch_key, start=pos.step)
        # wloss, w, correct, n: this rank's running sums; after a resume rank 0 carries the global
        # sums of the steps done before the interruption.
        sums = torch.tensor(
            pos.train_sums if ctx.is_main else [0.0] * 4, dtype=torch.float64, device=ctx.device
        )
        started = time.perf_counter() - pos.seconds
        pending: StepFlags | None = None
        loader = self.parts.train_loader
        for images, labels, rows in track(loader, len(loader), f"epoch {pos.epoch + 1}", ctx.is_main):
            self.act_on(pending, pos, sums, started)
            set_lr(self.optimizer, self.lr_at(pos))
            seed_dropout(derive_seed(cfg.seed, epoch_key, pos.step, ctx.rank), ctx.device)
            draws = uniforms(cfg.seed, epoch_key, rows.numpy(), 3).astype(np.float32)
            keys = sample_keys(cfg.seed, epoch_key, rows.numpy())  # dropout masks, per sample
            stop = torch.full((1,), float(_stop_requested), dtype=torch.float64, device=ctx.device)
            # Under CUDA graphs, flags and step_sums are the graph's static outputs: the next step
            # overwrites them, so both are consumed (queued on the stream) right here.
            flags, step_sums = self.step(
                images.to(ctx.device, non_blocking=True),
                labels.to(ctx.device, non_blocking=True),
                host_to_device(torch.from_numpy(draws), ctx.device),
                host_to_device(torch.from_numpy(keys), ctx.device),
                stop,
            )
            pending = StepFlags(flags, pos.step)
            sums += step_sums
            pos.advance()
        self.act_on(pending, pos, sums, started)
        # A finite loss can still give non-finite gradients; the weights are the same on every rank,
        # so every rank takes this decision alike, before anything is evaluated or saved.
        if not torch.stack([p.isfinite().all() for p in self.model.parameters()]).all():
            raise NonFiniteLoss(
                f"non-finite weights after stage {pos.stage} epoch {pos.epoch} step {pos.step}"
            )
        seconds = time.perf_counter() - started
        wloss, wsum, correct, n = distributed.all_reduce_sum(sums).tolist()
        return wloss / wsum, correct / n, seconds, int(n)

    def lr_at(self, pos: Position) -> float:
        """The schedule's factor for the optimiser step at `pos` (see optim.lr_factor)."""
        steps = self.parts.train_batches.steps_per_epoch
        return lr_factor(self.cfg.stages[pos.stage], pos.epoch * steps + pos.step, steps)

    def start_stage(self, stage: StageConfig, saved_state: dict[str, Any] | None = None) -> None:
        """A new optimiser over the parameters this stage trains (restored from `saved_state`
        when resuming), and the step that uses it: a captured graph refers to one optimiser's
        tensors."""
        parts = self.parts
        groups = param_groups(self.model, stage, self.cfg.optim.weight_decay)
        self.frozen = frozen_batchnorms(self.model, groups)
        self.optimizer = parts.make_optimizer(groups)
        if saved_state is not None:
            load_optimizer_state(self.optimizer, saved_state)
        if isinstance(self.step, GraphedStep):
            self.captured_graph |= self.step.graph is not None
        step = TrainStep(
            parts.forward,
            self.optimizer,
            parts.class_weights,
            parts.transform,
            self.ctx,
            parts.bf16,
            self.cfg.loss.label_smoothing,
            self.ema,
            parts.logit_offsets,
        )
        self.step = GraphedStep(step) if parts.cuda_graphs else step

    def act_on(self, flags: StepFlags | None, pos: Position, sums: torch.Tensor, started: float) -> None:
        """Stop every rank together on the previous step's flags: a non-finite loss anywhere, or a
        stop signal (then last.pt records the position after that step)."""
        if flags is None:
            return
        _, stop, *bad = flags.values()
        bad_ranks = [r for r, is_bad in enumerate(bad) if is_bad]
        if bad_ranks:
            raise NonFiniteLoss(
                f"non-finite loss on rank {bad_ranks[0]} at stage {pos.stage} epoch {pos.epoch} step {flags.step}"
            )
        if stop:
            pos.interrupt(distributed.all_reduce_sum(sums.clone()).tolist(), time.perf_counter() - started)
            self.save("last.pt", pos)
            raise Interrupted(f"stage {pos.stage} epoch {pos.epoch} step {pos.step}")

    @torch.no_grad()
    def evaluate(self, split: str, full_precision: bool = False) -> Evaluation:
        """Exact metrics over the whole split: each rank its unpadded shard, then a sum.
        `full_precision` turns bf16 autocast off, for numbers `galaxydist.evaluate` reproduces."""
        ctx, k, parts = self.ctx, self.info.num_classes, self.parts
        # A bare module: no DDP buffer broadcast, no collective per batch.
        model = self.ema.refresh() if self.ema else self.model.eval()
        cm = torch.zeros(k, k, dtype=torch.int64, device=ctx.device)
        sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)
        transform, bf16 = parts.transform, parts.bf16 and not full_precision
        for images, labels, _rows in parts.eval_loaders[split]:
            images = images.to(ctx.device, non_blocking=True)
            y = labels.to(ctx.device, non_blocking=True)
            out = model_logits(model, images, transform.mean, transform.std, transform.channels_last, bf16)
            w = parts.class_weights[y]
            sums += torch.stack([(w * F.cross_entropy(out, y, reduction="none")).sum(), w.sum()]).double()
            cm += confusion_matrix(y, out.argmax(1), k)
        cm = distributed.all_reduce_sum(cm).cpu().numpy()
        wloss, wsum = distributed.all_reduce_sum(sums).tolist()
        return Evaluation(wloss / wsum, accuracy(cm), cm)

    def score(self, val: Evaluation) -> float:
        """What early stopping and best.pt follow (cfg.select_on)."""
        return val.accuracy if self.cfg.select_on == "accuracy" else balanced_accuracy(val.confusion)

    # --- checkpoints, resume and the end of the run -----------------------------------------
    def report_epoch(self, record: dict[str, Any], val_confusion: np.ndarray) -> None:
        distributed.on_main(
            self.ctx, self.run.metrics_path, lambda: self.tracker.log_epoch(record, val_confusion)
        )

    def save(self, name: str, pos: Position, val: Evaluation | None = None) -> None:
        path = self.run.checkpoints / name
        last = name == "last.pt"
        # best.pt holds the weights evaluated (the average, with EMA); last.pt what resumes training.
        model = self.model if last else self.eval_model
        optimizer = self.optimizer if last else None
        ema = self.ema.model if last and self.ema else None

        def write() -> None:
            state = checkpoint.training_state(
                model, self.cfg.to_dict(), self.info, pos.to_dict(), optimizer, val and val.accuracy, ema
            )
            checkpoint.save(state, path)

        distributed.on_main(self.ctx, path, write)

    def restore(self, resume: tuple[Path, dict] | None) -> Position:
        """Weights, optimiser and position from a checked checkpoint (see state.load_resume_state)."""
        pos = Position()
        if resume is not None:
            path, state = resume
            self.model.load_state_dict(state["model"])
            if self.ema:
                self.ema.reset(self.model)
                if "ema" in state:
                    self.ema.model.load_state_dict(state["ema"])
            pos = Position(**state["position"])
            if "optimizer" in state and pos.stage < len(self.cfg.stages):
                self.start_stage(self.cfg.stages[pos.stage], state["optimizer"])
            self.log(f"resuming from {path} at stage {pos.stage} epoch {pos.epoch} step {pos.step}")
        # Epochs at or after this position are (re)logged by this run; a fresh run keeps none of
        # an attempt that stopped before its first last.pt.
        distributed.on_main(
            self.ctx, self.run.metrics_path, lambda: self.tracker.resume_at(pos.stage, pos.epoch)
        )
        return pos

    def finish(self) -> dict[str, Any]:
        """Evaluate the best weights once on the untouched test split, in float32 like
        `galaxydist.evaluate`; write the summary."""
        self.eval_model.load_state_dict(checkpoint.load(self.run.checkpoints / "best.pt")["model"])
        test, val = self.evaluate("test", full_precision=True), self.evaluate("val", full_precision=True)
        names = list(self.info.class_names)
        summary = {
            "test_accuracy": test.accuracy,
            "test_loss": test.loss,
            "val_accuracy": val.accuracy,
            "per_class_accuracy": [row["accuracy"] for row in per_class(test.confusion, names)],
            "class_names": names,
            "epochs_per_stage": self.tracker.epochs_per_stage() if self.tracker else {},
            "world_size": self.ctx.world_size,
            "test_confusion": test.confusion.tolist(),
            "cuda_graph_captured": self.captured_graph or getattr(self.step, "graph", None) is not None,
        }
        table = distributed.on_main(
            self.ctx,
            f"the final report in {self.run.root}",
            lambda: self.tracker.finish(summary, val.confusion, test.confusion),
        )
        if self.tracker:
            self.log(f"\nTest split, best weights (val acc {val.accuracy:.4f}):\n{table}")
            self.log(f"test accuracy {test.accuracy:.4f} — run folder {self.run.root}")
        return summary

    def log(self, line: str) -> None:
        if self.ctx.is_main:
            print(line, flush=True)
