"""Builders: everything checked before any write (the data against the run, the speed settings),
the run folder set up, and the parts the Trainer is handed (model, loaders, optimiser factory,
tracker)."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..atomic import atomic_path
from ..config import Config, dump_config
from ..data.augment import BatchTransform, swap_permutation
from ..data.dataset import GalaxyDataset, batch_source, keep_resident, prepared_path_hint
from ..data.format import PreparedInfo, read_prepared
from ..data.samplers import ShardBatches, TrainBatches
from ..data.staging import expected_checksum, is_good_copy, make_copy, staged_path, staging_root
from ..errors import UserError, os_error_reason, warn
from ..models import build_model, family_of
from ..models.pretrained import LoadReport, load_pretrained
from ..tracking import RunFolder, Tracker
from .ema import EMA
from .optim import optimizer_factory
from .trainer import Trainer, TrainingParts


def stage_data(cfg: Config, ctx: distributed.Context) -> str:
    """The prepared file each rank memory-maps: a node-local copy with `data.stage`, made once
    per node by its first rank (reused when an earlier job left a good one) while the others
    wait; the shared file itself without staging, or with a warning where the copy failed."""
    root = staging_root(cfg.data.stage, cfg.data.stage_dir, os.environ)
    if root is None or not Path(cfg.data.path).exists():
        return cfg.data.path  # (a missing file is check_data's one-line error)
    info = read_prepared(cfg.data.path)
    checksum = expected_checksum(info)
    copy = staged_path(root, info, checksum)
    if ctx.local_rank == 0 and not is_good_copy(copy, info, checksum):
        try:
            make_copy(info, copy, checksum)
        except OSError as err:
            warn(
                f"cannot stage {cfg.data.path} to {copy.parent} ({os_error_reason(err)}); reading the shared file"
            )
    distributed.barrier()
    return str(copy) if copy.is_file() else cfg.data.path


def check_data(cfg: Config, ctx: distributed.Context, path: str | None = None) -> PreparedInfo:
    """The prepared file (`path`: its staged copy), checked against this run's world size and
    batch before anything is written."""
    if not Path(cfg.data.path).exists():
        raise UserError(
            f"{cfg.data.path}: prepared data not found; make it with: {prepared_path_hint(cfg.data.path)}"
        )
    info = read_prepared(path or cfg.data.path)
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
    for i, pair in enumerate(cfg.augment.mirror_swap):
        if max(pair) >= info.num_classes:
            raise UserError(
                f"config key 'augment.mirror_swap.{i}': class {max(pair)} is not in {cfg.data.path} "
                f"({info.num_classes} classes: 0..{info.num_classes - 1})"
            )
    smallest, why = family_of(cfg.model).input_needs(cfg.model)
    if info.image_size < smallest:
        raise UserError(
            f"{cfg.data.path}: {info.image_size}² images are too small for {why}; they need at least {smallest}²"
        )
    return info


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


def checkpoint_bytes(cfg: Config, num_classes: int) -> int:
    """Room the checkpoints need: last.pt and best.pt, with Adam's two moments, plus one being written."""
    params = sum(p.numel() for p in build_model(cfg.model, num_classes).parameters())
    return 4 * params * (3 + 1 + 3) + 2**20


def prepare_run_folder(
    cfg: Config, ctx: distributed.Context, info: PreparedInfo, resume_path: Path | None
) -> None:
    """Before any training: the run folder must be one every rank sees (a shared file system);
    rank 0 creates it, checks there is room for the checkpoints, saves the resolved config, the
    ranks' nodes and data files (ranks.json), and adopts the best weights of a run resumed from
    elsewhere; every rank learns if that failed."""
    run = RunFolder(cfg.output_dir)
    distributed.check_shared_folder(ctx, run.root)
    ranks = distributed.gather_objects(
        {
            "rank": ctx.rank,
            "local_rank": ctx.local_rank,
            "node": distributed.node_name(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "data": info.path,
        }
    )

    def make() -> None:
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        free, needed = shutil.disk_usage(run.checkpoints).free, checkpoint_bytes(cfg, info.num_classes)
        if free < needed:
            reason = f"only {free / 2**20:.1f} MB free, checkpoints need {needed / 2**20:.1f} MB"
            raise OSError(errno.ENOSPC, reason)
        run.write_text("config.yaml", dump_config(cfg))
        run.write_text("ranks.json", json.dumps(ranks, indent=2) + "\n")
        if resume_path:
            adopt_best_weights(resume_path, run)

    distributed.on_main(ctx, run.root, make)


def adopt_best_weights(resume_path: Path, run: RunFolder) -> None:
    """Resuming from another run's checkpoint: bring its best.pt along, since the position's
    best score refers to those weights (stage changes and the final test load them)."""
    theirs, ours = resume_path.parent / "best.pt", run.checkpoints / "best.pt"
    if theirs.exists() and not ours.exists():
        with atomic_path(ours) as tmp:
            shutil.copyfile(theirs, tmp)


def build_run_model(cfg: Config, info: PreparedInfo) -> tuple[nn.Module, LoadReport | None]:
    """The run's model from the one factory, seeded (the same initial weights at every world
    size), with its pretrained weights: built before any write, so that a bad architecture or
    weights file fails with nothing written."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, info.num_classes)
    report = load_pretrained(model, cfg.model.pretrained) if cfg.model.pretrained else None
    return model, report


def logit_offsets(class_weights: np.ndarray, tau: float, device: torch.device) -> torch.Tensor:
    """τ·log(training class frequency), for the logit-adjusted loss: the prepared file's weights
    are N / (K·N_c), so −log(weight) is log frequency plus a constant, which softmax ignores."""
    return -tau * torch.tensor(class_weights, dtype=torch.float32, device=device).log()


def build_parts(cfg: Config, ctx: distributed.Context, info: PreparedInfo, model: nn.Module) -> TrainingParts:
    """The model synchronised and wrapped for the ranks, the loaders, and the run's reporting."""
    device, on_cuda = ctx.device, ctx.device.type == "cuda"
    if on_cuda:
        torch.backends.cudnn.benchmark = True
    run = RunFolder(cfg.output_dir)
    tracker = Tracker(cfg, run, list(info.class_names)) if ctx.is_main else None
    if cfg.speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    wrapped = distributed.wrap_model(model, ctx, cfg.distributed.exact_batchnorm)
    model = distributed.unwrap(wrapped)  # the same parameters, without DDP's hooks
    forward = torch.compile(wrapped) if cfg.speed.compile else wrapped

    train_set = GalaxyDataset(info, "train")
    per_rank_batch = distributed.split_batch(cfg.data.batch_size, ctx)
    train_batches = TrainBatches(len(train_set), ctx.rank, ctx.world_size, per_rank_batch, cfg.seed)
    split_rows = sum(len(info.splits[split]) for split in ("train", "val", "test"))
    resident = keep_resident(cfg.speed.resident, device, split_rows * math.prod(info.shape[1:]))
    workers = cfg.data.num_workers
    num_workers = (2 if on_cuda and not resident else 0) if workers == "auto" else workers
    eval_batch = max(1, cfg.data.eval_batch_size // ctx.world_size)
    eval_loaders = {}
    for split in ("val", "test"):
        dataset = GalaxyDataset(info, split)
        shards = ShardBatches(len(dataset), ctx.rank, ctx.world_size, eval_batch)
        eval_loaders[split] = batch_source(dataset, shards, device, resident, num_workers=0)
    # auto: graphs where they were measured (resident splits); `true` also graphs a streamed one.
    graphs = cfg.speed.cuda_graphs
    cuda_graphs = cuda_graphs_possible(cfg, ctx) and (graphs is True or (graphs == "auto" and resident))
    aug = cfg.augment
    transform = BatchTransform(
        mean=torch.tensor(info.mean, dtype=torch.float32, device=device),
        std=torch.tensor(info.std, dtype=torch.float32, device=device),
        hflip=aug.hflip,
        vflip=aug.vflip,
        rotate=aug.rotate,
        channels_last=cfg.speed.channels_last,
        swap=(
            torch.tensor(swap_permutation(aug.mirror_swap, info.num_classes), device=device)
            if aug.mirror_swap
            else None
        ),
    )
    return TrainingParts(
        model=model,
        forward=forward,
        train_batches=train_batches,
        train_loader=batch_source(train_set, train_batches, device, resident, num_workers),
        eval_loaders=eval_loaders,
        transform=transform,
        class_weights=torch.tensor(
            info.class_weights**cfg.loss.class_weight_power, dtype=torch.float32, device=device
        ),
        logit_offsets=logit_offsets(info.class_weights, cfg.loss.logit_adjustment, device),
        make_optimizer=optimizer_factory(cfg.optim, device, cuda_graphs),
        run=run,
        tracker=tracker,
        bf16=on_cuda if cfg.speed.bf16 == "auto" else cfg.speed.bf16,
        cuda_graphs=cuda_graphs,
        ema=EMA(model, cfg.ema.decay) if cfg.ema.decay is not None else None,
    )


def build_trainer(
    cfg: Config, ctx: distributed.Context, info: PreparedInfo, model: nn.Module | None = None
) -> Trainer:
    model = build_run_model(cfg, info)[0] if model is None else model
    return Trainer(cfg, ctx, info, build_parts(cfg, ctx, info, model))
