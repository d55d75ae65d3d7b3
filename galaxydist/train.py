"""Train the galaxy CNN, on one process or many.

    torchrun --nproc_per_node=4 -m galaxydist.train --config configs/galaxy10.yaml [key=value ...]
    python -m galaxydist.train ...                      # the same run as one process

Re-running with the same output_dir resumes from checkpoints/last.pt. SIGTERM or SIGUSR2 (SLURM
preemption, submitit's time-limit warning) finishes the current step on every rank, writes
last.pt and exits with EXIT_INTERRUPTED.
"""

from __future__ import annotations

import argparse
import errno
import math
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint, distributed
from .allocator import keep_freed_memory
from .atomic import atomic_path
from .augment import augment, derive_seed, normalise, uniforms
from .config import Config, dump_config, load_config
from .data import (
    GalaxyDataset,
    PreparedInfo,
    ShardBatches,
    TrainBatches,
    batch_source,
    host_to_device,
    keep_resident,
    prepared_path_hint,
    read_prepared,
)
from .errors import IO_ERROR, UserError, os_error_reason, run_cli
from .graphs import GraphedStep
from .metrics import accuracy, balanced_accuracy, confusion_matrix, per_class
from .model import GalaxyCNN
from .progress import is_terminal
from .tracking import RunFolder, Tracker

EXIT_NONFINITE = 3
EXIT_CANNOT_WRITE = IO_ERROR  # 74: rank 0 could not write to the run folder; the checkpoints written stay
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving last.pt; run again to resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class Interrupted(Exception):
    """A stop signal arrived; last.pt holds the position to resume from."""


class NonFiniteLoss(Exception):
    pass


class CannotWrite(Exception):
    """Rank 0 could not write to the run folder (disk full, permissions): every rank stops together."""


_stop_requested = False


def _request_stop(signum: int, frame: object) -> None:
    global _stop_requested
    _stop_requested = True


@dataclass
class EarlyStopping:
    """Stop after `patience` validations without a better accuracy."""

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


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    confusion: np.ndarray


class StepFlags:
    """A step's all-reduced flags, copied to the host without waiting: read at the next step, so
    the host never stalls the device mid-epoch (on CPU the copy is immediate)."""

    def __init__(self, flags: torch.Tensor, step: int) -> None:
        self.step = step
        self.host = flags.to("cpu", non_blocking=True)
        self.ready = None
        if flags.is_cuda:
            self.ready = torch.cuda.Event()
            self.ready.record()

    def values(self) -> list[float]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


def check_data(cfg: Config, ctx: distributed.Context) -> PreparedInfo:
    """The prepared file, checked against this run's world size and batch before anything is written."""
    if not Path(cfg.data.path).exists():
        raise UserError(
            f"{cfg.data.path}: prepared data not found; make it with: {prepared_path_hint(cfg.data.path)}"
        )
    info = read_prepared(cfg.data.path)
    for split, rows in info.splits.items():
        if len(rows) == 0:
            raise UserError(f"{cfg.data.path}: split {split!r} is empty")
        if len(rows) < ctx.world_size:
            raise UserError(
                f"{cfg.data.path}: split {split!r} has {len(rows)} images, fewer than the {ctx.world_size} ranks"
            )
    distributed.split_batch(cfg.data.batch_size, ctx)
    if len(info.splits["train"]) < cfg.data.batch_size:
        raise UserError(
            f"config key 'data.batch_size': {cfg.data.batch_size} exceeds the "
            f"{len(info.splits['train'])} training images of {cfg.data.path}"
        )
    smallest = 2 ** len(cfg.model.channels)  # each block halves the image
    if info.image_size < smallest:
        raise UserError(
            f"{cfg.data.path}: {info.image_size}² images are too small for {len(cfg.model.channels)} "
            f"pooling blocks (model.channels); they need at least {smallest}²"
        )
    return info


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
    if saved.get("model") != asdict(cfg.model) or state.get("class_names") != list(info.class_names):
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


def cuda_graphs_possible(cfg: Config, ctx: distributed.Context) -> bool:
    """Whether the training step can be captured as a CUDA graph here: one process on CUDA with
    an eager model (DDP's collectives are not captured; a compiled model would need compile's own
    `reduce-overhead` mode). `speed.cuda_graphs=true` where it cannot is an error."""
    possible = ctx.device.type == "cuda" and not ctx.distributed and not cfg.speed.compile
    if cfg.speed.cuda_graphs is True and not possible:
        where = ctx.device.type + (", under torch.distributed" if ctx.distributed else "")
        where += ", speed.compile=true" if cfg.speed.compile else ""
        raise UserError(
            "speed.cuda_graphs=true needs one process on a CUDA device with speed.compile=false "
            f"(here: {where}); use speed.cuda_graphs=auto"
        )
    return possible


def seed_dropout(seed: int, device: torch.device) -> None:
    """Seed only the generator dropout draws from (torch.manual_seed visits every backend: ~0.1 ms)."""
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: Config, ctx: distributed.Context, info: PreparedInfo) -> None:
        self.cfg, self.ctx, self.info = cfg, ctx, info
        self.per_rank_batch = distributed.split_batch(cfg.data.batch_size, ctx)
        self.eval_batch = max(1, cfg.data.eval_batch_size // ctx.world_size)
        on_cuda = ctx.device.type == "cuda"
        self.bf16 = on_cuda if cfg.speed.bf16 == "auto" else cfg.speed.bf16
        self.channels_last = cfg.speed.channels_last
        if on_cuda:
            torch.backends.cudnn.benchmark = True

        self.run = RunFolder(cfg.output_dir)
        self.tracker = Tracker(cfg, self.run, list(self.info.class_names)) if ctx.is_main else None
        torch.manual_seed(cfg.seed)  # the same initial weights at every world size
        self.model = GalaxyCNN(cfg.model.channels, self.info.num_classes, cfg.model.dropout)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ddp = distributed.wrap_model(self.model, ctx, cfg.distributed.exact_batchnorm)
        self.model = distributed.unwrap(self.ddp)  # the same parameters, without DDP's hooks
        self.step_fn = torch.compile(self.ddp) if cfg.speed.compile else self.ddp
        device = ctx.device
        self.weights = torch.tensor(self.info.class_weights, dtype=torch.float32, device=device)
        self.mean = torch.tensor(self.info.mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(self.info.std, dtype=torch.float32, device=device)

        self.train_set = GalaxyDataset(self.info, "train")
        self.train_batches = TrainBatches(
            len(self.train_set), ctx.rank, ctx.world_size, self.per_rank_batch, cfg.seed
        )
        split_rows = sum(len(self.info.splits[split]) for split in ("train", "val", "test"))
        resident = keep_resident(cfg.speed.resident, device, split_rows * math.prod(self.info.shape[1:]))
        workers = cfg.data.num_workers
        self.num_workers = (2 if on_cuda and not resident else 0) if workers == "auto" else workers
        self.train_loader = batch_source(
            self.train_set, self.train_batches, device, resident, self.num_workers
        )
        self.eval_loaders = {}
        for split in ("val", "test"):
            dataset = GalaxyDataset(self.info, split)
            shards = ShardBatches(len(dataset), ctx.rank, ctx.world_size, self.eval_batch)
            self.eval_loaders[split] = batch_source(dataset, shards, device, resident, num_workers=0)
        # auto: graphs where they were measured (resident splits); `true` also graphs a streamed one.
        graphs = cfg.speed.cuda_graphs
        self.cuda_graphs = cuda_graphs_possible(cfg, ctx) and (
            graphs is True or (graphs == "auto" and resident)
        )
        self.optimizer: torch.optim.Optimizer | None = None
        self.graphed_step: GraphedStep | None = None

    # --- the run, top to bottom -------------------------------------------------------------
    def fit(self, resume: tuple[Path, dict] | None = None) -> dict[str, Any]:
        pos = self.restore(resume)
        stages = self.cfg.stages
        while pos.stage < len(stages):
            stage = stages[pos.stage]
            if pos.epoch >= stage.max_epochs:  # resumed with a lower max_epochs: this stage is done
                pos.stage, pos.epoch, pos.step, pos.stopper = pos.stage + 1, 0, 0, {}
                self.optimizer = None
                continue
            if self.optimizer is None:  # a fresh stage: best weights so far, a new optimiser
                if pos.stage > 0:
                    self.model.load_state_dict(checkpoint.load(self.run.checkpoints / "best.pt")["model"])
                self.start_stage(stage.lr)
            stopper = EarlyStopping(stage.patience, **pos.stopper)
            while pos.epoch < stage.max_epochs:
                train_loss, train_acc, seconds, images = self.train_epoch(pos)
                val = self.evaluate("val")
                score = val.accuracy if self.cfg.select_on == "accuracy" else balanced_accuracy(val.confusion)
                improved_overall = score > pos.best_val
                stopper.update(score)
                pos.best_val = max(pos.best_val, score)
                record = {
                    "stage": stage.name,
                    "stage_index": pos.stage,
                    "epoch": pos.epoch,
                    "train_loss": train_loss,
                    "train_acc": train_acc,
                    "val_loss": val.loss,
                    "val_acc": val.accuracy,
                    "lr": stage.lr,
                    "seconds": seconds,
                    "images_per_second": images / seconds,
                }
                self.report_epoch(record, val.confusion)
                self.log(
                    f"[{stage.name} {pos.epoch + 1}/{stage.max_epochs}] train loss {train_loss:.4f} "
                    f"acc {train_acc:.4f} | val loss {val.loss:.4f} acc {val.accuracy:.4f} | "
                    f"{images / seconds:.0f} img/s{' *' if improved_overall else ''}"
                )
                pos.epoch, pos.step, pos.seconds, pos.train_sums = pos.epoch + 1, 0, 0.0, [0.0] * 4
                pos.stopper = {"best": stopper.best, "bad_epochs": stopper.bad_epochs}
                if improved_overall:
                    self.save("best.pt", pos, val)
                stage_done = distributed.any_rank(stopper.should_stop, self.ctx.device) or (
                    pos.epoch >= stage.max_epochs
                )
                if stage_done:
                    pos.stage, pos.epoch, pos.stopper = pos.stage + 1, 0, {}
                    self.optimizer = None
                self.save("last.pt", pos)
                if stage_done:
                    break
        return self.finish()

    def train_epoch(self, pos: Position) -> tuple[float, float, float, int]:
        """One epoch (or its rest, after a resume); returns loss, accuracy, seconds, images."""
        cfg, ctx = self.cfg, self.ctx
        epoch_key = pos.stage * 10_000 + pos.epoch
        self.ddp.train()
        self.train_batches.set_epoch(epoch_key, start=pos.step)
        # wloss, w, correct, n: this rank's running sums; after a resume rank 0 carries the global
        # sums of the steps done before the interruption.
        sums = torch.tensor(
            pos.train_sums if ctx.is_main else [0.0] * 4, dtype=torch.float64, device=ctx.device
        )
        started = time.perf_counter() - pos.seconds
        pending: StepFlags | None = None
        for images, labels, rows in self.progress(self.train_loader, f"epoch {pos.epoch + 1}"):
            self.act_on(pending, pos, sums, started)
            seed_dropout(derive_seed(cfg.seed, epoch_key, pos.step, ctx.rank), ctx.device)
            draws = uniforms(cfg.seed, epoch_key, rows.numpy(), 3).astype(np.float32)
            stop = torch.full((1,), float(_stop_requested), dtype=torch.float64, device=ctx.device)
            # Under CUDA graphs, flags and step_sums are the graph's static outputs: the next step
            # overwrites them, so both are consumed (queued on the stream) right here.
            flags, step_sums = (self.graphed_step or self.train_step)(
                images.to(ctx.device, non_blocking=True),
                labels.to(ctx.device, non_blocking=True),
                host_to_device(torch.from_numpy(draws), ctx.device),
                stop,
            )
            pending = StepFlags(flags, pos.step)
            sums += step_sums
            pos.step += 1
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

    def train_step(
        self, images: torch.Tensor, labels: torch.Tensor, draws: torch.Tensor, stop: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step on a batch already on the device; returns the step's all-reduced
        flags and its (weighted loss, weight, correct, count) sums. No host synchronisation, so
        that it can be captured as a CUDA graph."""
        ctx = self.ctx
        x = self.inputs(images, draws)
        # No autocast cast cache: it cannot outlive a graph capture, and each weight is cast once
        # per forward anyway.
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            logits = self.step_fn(x)
        losses = F.cross_entropy(logits.float(), labels, reduction="none")
        w = self.weights[labels]
        weighted_sum = (w * losses).sum()
        # One small collective per step: the global weight sum (the loss is normalised over the
        # GLOBAL batch), whether any rank must stop, and which ranks saw a non-finite loss.
        flags = torch.zeros(2 + ctx.world_size, dtype=torch.float64, device=ctx.device)
        flags[0] = w.sum()
        flags[1:2] = stop
        flags[2 + ctx.rank] = (~torch.isfinite(weighted_sum)).double()
        flags = distributed.all_reduce_sum(flags)
        loss = weighted_sum * ctx.world_size / flags[0]  # DDP averages over ranks
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            count = (labels >= 0).sum()  # len(labels), counted on the device: no host-to-device copy
            correct = (logits.argmax(1) == labels).sum()
            return flags, torch.stack([weighted_sum.detach(), w.sum(), correct, count]).double()

    def start_stage(self, lr: float, saved_state: dict[str, Any] | None = None) -> None:
        """A new Adam (restored from `saved_state` when resuming), and the step that uses it: a
        captured graph refers to one optimiser's tensors."""
        fused = True if self.ctx.device.type == "cuda" else None  # a few launches per step, not per tensor
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=lr, fused=fused, capturable=self.cuda_graphs
        )
        if saved_state is not None:
            checkpoint.load_optimizer_state(self.optimizer, saved_state)
        self.graphed_step = GraphedStep(self.train_step) if self.cuda_graphs else None

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
            pos.train_sums = distributed.all_reduce_sum(sums.clone()).tolist()
            pos.seconds = time.perf_counter() - started
            self.save("last.pt", pos)
            raise Interrupted

    @torch.no_grad()
    def evaluate(self, split: str, full_precision: bool = False) -> Evaluation:
        """Exact metrics over the whole split: each rank its unpadded shard, then a sum.
        `full_precision` turns bf16 autocast off, for numbers `galaxydist.evaluate` reproduces."""
        ctx, k = self.ctx, self.info.num_classes
        self.model.eval()  # the bare module: no DDP buffer broadcast, no collective per batch
        cm = torch.zeros(k, k, dtype=torch.int64, device=ctx.device)
        sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)
        for images, labels, _rows in self.eval_loaders[split]:
            x = self.inputs(images.to(ctx.device, non_blocking=True), None)
            y = labels.to(ctx.device, non_blocking=True)
            with torch.autocast(
                ctx.device.type, dtype=torch.bfloat16, enabled=self.bf16 and not full_precision
            ):
                logits = self.model(x).float()
            w = self.weights[y]
            sums += torch.stack([(w * F.cross_entropy(logits, y, reduction="none")).sum(), w.sum()]).double()
            cm += confusion_matrix(y, logits.argmax(1), k)
        cm = distributed.all_reduce_sum(cm).cpu().numpy()
        wloss, wsum = distributed.all_reduce_sum(sums).tolist()
        return Evaluation(wloss / wsum, accuracy(cm), cm)

    def inputs(self, images: torch.Tensor, draws: torch.Tensor | None) -> torch.Tensor:
        """uint8 batch on the device → normalised float images, augmented by `draws` if given."""
        x = normalise(images, self.mean, self.std, torch.float32)
        if draws is not None:
            aug = self.cfg.augment
            x = augment(x, draws, aug.hflip, aug.vflip, aug.rotate)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    # --- checkpoints, resume and the end of the run -----------------------------------------
    def report_epoch(self, record: dict[str, Any], val_confusion: np.ndarray) -> None:
        on_main(self.ctx, self.run.metrics_path, lambda: self.tracker.log_epoch(record, val_confusion))

    def save(self, name: str, pos: Position, val: Evaluation | None = None) -> None:
        path = self.run.checkpoints / name
        on_main(self.ctx, path, lambda: checkpoint.save(self.checkpoint_state(name, pos, val), path))

    def checkpoint_state(self, name: str, pos: Position, val: Evaluation | None) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "config": self.cfg.to_dict(),
            "class_names": list(self.info.class_names),
            "mean": list(self.info.mean),
            "std": list(self.info.std),
            "image_size": self.info.image_size,
            "crop": self.info.crop,
            "train_size": len(self.info.splits["train"]),
            "position": asdict(pos),
        }
        if name == "last.pt" and self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        if val is not None:
            state["val_accuracy"] = val.accuracy
        return state

    def restore(self, resume: tuple[Path, dict] | None) -> Position:
        """Weights, optimiser and position from a checked checkpoint (see load_resume_state)."""
        pos = Position()
        if resume is not None:
            path, state = resume
            self.model.load_state_dict(state["model"])
            pos = Position(**state["position"])
            if "optimizer" in state and pos.stage < len(self.cfg.stages):
                self.start_stage(self.cfg.stages[pos.stage].lr, state["optimizer"])
            self.log(f"resuming from {path} at stage {pos.stage} epoch {pos.epoch} step {pos.step}")
        # Epochs at or after this position are (re)logged by this run; a fresh run keeps none of
        # an attempt that stopped before its first last.pt.
        on_main(self.ctx, self.run.metrics_path, lambda: self.tracker.resume_at(pos.stage, pos.epoch))
        return pos

    def finish(self) -> dict[str, Any]:
        """Evaluate the best weights once on the untouched test split, in float32 like
        `galaxydist.evaluate`; write the summary."""
        self.model.load_state_dict(checkpoint.load(self.run.checkpoints / "best.pt")["model"])
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
        }
        report = f"the final report in {self.run.root}"
        table = on_main(self.ctx, report, lambda: self.tracker.finish(summary, val.confusion, test.confusion))
        if self.tracker:
            self.log(f"\nTest split, best weights (val acc {val.accuracy:.4f}):\n{table}")
            self.log(f"test accuracy {test.accuracy:.4f} — run folder {self.run.root}")
        return summary

    # --- output -----------------------------------------------------------------------------
    def log(self, line: str) -> None:
        if self.ctx.is_main:
            print(line, flush=True)

    def progress(self, loader, description: str):
        """A rich bar on rank 0 in a terminal; plain iteration elsewhere."""
        if not (self.ctx.is_main and is_terminal()):
            yield from loader
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        columns = (description, BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, transient=True) as bar:
            task = bar.add_task(description, total=len(loader))
            for batch in loader:
                yield batch
                bar.advance(task)


def on_main(ctx: distributed.Context, target: Path | str, write: Callable[[], Any]) -> Any:
    """Rank 0 writes `target` (returns what `write` does there); every rank calls this at the
    same point and learns whether it worked, so a failed write (disk full, permissions) stops
    them all with its reason instead of crashing rank 0 alone."""
    error, failure, result = None, None, None
    if ctx.is_main:
        try:
            result = write()
        except Exception as err:  # whatever it is, the other ranks must hear of it, not wait
            failure, error = err, f"cannot write {target} ({describe_write_error(err, target)})"
    error = distributed.broadcast_object(error)
    if failure is not None and not isinstance(failure, OSError):
        raise failure  # not the disk but a bug: its traceback on rank 0
    if error:
        raise CannotWrite(error)
    return result


def describe_write_error(err: Exception, target: Path | str) -> str:
    """The reason (say, No space left on device), with the file when it is not the target itself."""
    if not isinstance(err, OSError):
        return f"{type(err).__name__}: {err}"
    if str(err.filename2 or err.filename) == str(target):
        return err.strerror or str(err)
    return os_error_reason(err)


def checkpoint_bytes(cfg: Config, num_classes: int) -> int:
    """Room the checkpoints need: last.pt and best.pt, with Adam's two moments, plus one being written."""
    params = sum(p.numel() for p in GalaxyCNN(cfg.model.channels, num_classes).parameters())
    return 4 * params * (3 + 1 + 3) + 2**20


def prepare_run_folder(
    cfg: Config, ctx: distributed.Context, info: PreparedInfo, resume_path: Path | None
) -> None:
    """Before any training, rank 0 creates the run folder, checks there is room for the
    checkpoints, saves the resolved config and adopts the best weights of a run resumed from
    elsewhere; every rank learns if that failed."""
    run = RunFolder(cfg.output_dir)

    def make() -> None:
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        free, needed = shutil.disk_usage(run.checkpoints).free, checkpoint_bytes(cfg, info.num_classes)
        if free < needed:
            reason = f"only {free / 2**20:.1f} MB free, checkpoints need {needed / 2**20:.1f} MB"
            raise OSError(errno.ENOSPC, reason)
        run.write_text("config.yaml", dump_config(cfg))
        if resume_path:
            adopt_best_weights(resume_path, run)

    on_main(ctx, run.root, make)


def adopt_best_weights(resume_path: Path, run: RunFolder) -> None:
    """Resuming from another run's checkpoint: bring its best.pt along, since the position's
    best score refers to those weights (stage changes and the final test load them)."""
    theirs, ours = resume_path.parent / "best.pt", run.checkpoints / "best.pt"
    if theirs.exists() and not ours.exists():
        with atomic_path(ours) as tmp:
            shutil.copyfile(theirs, tmp)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m galaxydist.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML recipe (default: the packaged configs/galaxy10.yaml)")
    parser.add_argument(
        "--resume", help="checkpoint to resume from (default: output_dir/checkpoints/last.pt)"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. stages.0.lr=5e-4 data.batch_size=128"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    previous = {s: signal.signal(s, _request_stop) for s in STOP_SIGNALS}
    ctx = distributed.setup(cfg.distributed.timeout_s)
    together = False  # a crash on one rank: leave without waiting for the others
    try:
        # Every rank reads the same files, so a bad input fails on all of them alike, before any write.
        info = check_data(cfg, ctx)
        cuda_graphs_possible(cfg, ctx)  # an impossible speed setting fails here, before any write
        resume = load_resume_state(cfg, info, args.resume)
        prepare_run_folder(cfg, ctx, info, resume[0] if resume else None)
        Trainer(cfg, ctx, info).fit(resume)
        together = True
        return 0
    except Interrupted:
        together = True
        print(f"rank {ctx.rank}: stopped by signal; last.pt saved, run again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except NonFiniteLoss as err:
        together = True
        print(f"rank {ctx.rank}: {err}; stopping (last good checkpoint kept)", file=sys.stderr)
        return EXIT_NONFINITE
    except CannotWrite as err:
        together = True
        print(f"rank {ctx.rank}: rank 0 {err}; stopping", file=sys.stderr)
        return EXIT_CANNOT_WRITE
    except UserError:
        together = True  # bad input is seen alike by every rank
        raise
    finally:
        distributed.teardown(together)
        for s, handler in previous.items():
            signal.signal(s, handler)


def cli() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
