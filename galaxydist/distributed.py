"""Everything that talks to torch.distributed: set-up from torchrun/SLURM env vars, synchronised
BatchNorm on any backend, reductions, and the protocols every rank follows together (a decision
all take, a write rank 0 makes and every rank learns the outcome of).

Without RANK/WORLD_SIZE in the environment the run is one process and every helper is a no-op.
"""

from __future__ import annotations

import datetime
import inspect
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .errors import UserError, os_error_reason


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


_store: dist.Store | None = None  # the process group's rendezvous store (see _restart_store)


def setup(timeout_s: float = 600.0, use_cuda: bool | None = None) -> Context:
    """Join the process group torchrun (or SLURM via submitit) described in the environment."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        global _store
        _store = _restart_store(rank, world_size, timeout)
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            store=_store,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            # device_id initialises NCCL eagerly; torch 2.6.x-2.7.0 can then hang at random
            # (pytorch/pytorch#153960): there the group binds lazily to the device set above.
            device_id=device if use_cuda and torch.__version__ >= "2.7.1" else None,
        )
    return Context(rank, world_size, local_rank, device)


def _restart_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """torch's own env:// rendezvous store, with keys private to this restart.

    torchrun keeps one store across `--max-restarts` restarts; a restarted group that read the
    addresses its killed predecessor left there would dial closed ports (seen here: gloo's
    "connectFullMesh failed ... Connection refused" after a kill -9).
    """
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise UserError(f"RANK is set but {missing[0]} is not: launch with torchrun (or set the rendezvous)")
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    return dist.PrefixStore(f"restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def teardown(together: bool = True) -> None:
    """Leave the process group; `together` (every rank on the same exit path) waits for all ranks
    first, so no rank closes its connections while a peer's transport still uses them (seen here:
    an occasional "terminate called without an active exception" abort in the later rank).

    The wait goes through the rendezvous store, not `dist.barrier()`: gloo's barrier keeps the
    collectives still in flight alive until its worker thread drops it, and DDP keeps the group,
    and so that thread, alive past `destroy_process_group`; when the thread then frees those
    tensors during interpreter shutdown it cannot take the GIL and the process aborts (the same
    message, seen in ~2 % of 2-rank CPU runs here; core dump: ~AsyncBarrierWork → decref_pyobject
    → take_gil → pthread_exit during Py_FinalizeEx; cf. pytorch/pytorch#179291).
    """
    if dist.is_initialized():
        if together and _store is not None:
            _store_barrier(_store, "teardown")
        elif together:  # a group set up by the caller, whose store we do not hold
            dist.barrier()
        dist.destroy_process_group()


def _store_barrier(store: dist.Store, name: str) -> None:
    """Every rank arrives before any leaves; only store requests, no collective work objects."""
    if store.add(f"{name}/arrived", 1) == dist.get_world_size():
        store.set(f"{name}/all", "1")
    store.wait([f"{name}/all"])


def split_batch(global_batch: int, ctx: Context, key: str = "data.batch_size") -> int:
    if global_batch % ctx.world_size:
        raise UserError(
            f"config key {key!r}: global batch {global_batch} does not divide over {ctx.world_size} ranks"
        )
    return global_batch // ctx.world_size


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (identity for one process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D `local`, stacked in rank order (world × len): one all-reduce of a
    zero-padded table (adding zeros is exact), which every backend supports."""
    if not dist.is_initialized():
        return local[None]
    table = local.new_zeros(dist.get_world_size(), len(local))
    table[dist.get_rank()] = local
    dist.all_reduce(table, op=dist.ReduceOp.SUM)
    return table


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any rank: one decision, taken together."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_objects(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    box: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(box, obj)
    return box


def node_name() -> str:
    """The node this process runs on: SLURM's name for it, else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def check_shared_folder(ctx: Context, folder: Path) -> None:
    """Rank 0 writes a token into `folder`; every rank must see it, or `folder` is not on a file
    system all nodes share (checkpoints rank 0 writes would be missing where another node resumes).
    One process: nothing to check. A folder rank 0 cannot write to stops every rank (exit 74)."""
    if not dist.is_initialized():
        return
    created = not folder.exists()

    def write_token() -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        token = folder / f".shared-check-{os.getpid()}-{time.time_ns()}"
        token.write_text(node_name())
        return token

    token = broadcast_object(on_main(ctx, folder, write_token))
    sees = gather_objects((ctx.rank, node_name(), Path(token).exists()))
    if ctx.is_main:
        Path(token).unlink()
        if created and not any(folder.iterdir()):
            folder.rmdir()  # the bad input leaves nothing behind
    blind = [(rank, node) for rank, node, seen in sees if not seen]
    if blind:
        rank, node = blind[0]
        raise UserError(
            f"config key 'output_dir': {folder} is not on a file system all nodes share (rank {rank} on "
            f"{node} does not see what rank 0 wrote there); put output_dir on a shared file system"
        )


def broadcast_object(obj: object) -> object:
    """Rank 0's value on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class CannotWrite(Exception):
    """Rank 0 could not write to the run folder (disk full, permissions): every rank stops together."""


def on_main(ctx: Context, target: Path | str, write: Callable[[], Any]) -> Any:
    """Rank 0 writes `target` (returns what `write` does there); every rank calls this at the
    same point and learns whether it worked, so a failed write (disk full, permissions) stops
    them all with its reason instead of crashing rank 0 alone."""
    error, failure, result = None, None, None
    if ctx.is_main:
        try:
            result = write()
        except Exception as err:  # whatever it is, the other ranks must hear of it, not wait
            failure, error = err, f"cannot write {target} ({describe_write_error(err, target)})"
    error = broadcast_object(error)
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


def _channel_dims(x: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The dimensions BatchNorm sums over (all but channels), and a per-channel view's shape."""
    return (0, *range(2, x.dim())), (1, x.shape[1], *([1] * (x.dim() - 2)))


class _GlobalBatchNormFunction(torch.autograd.Function):
    """BatchNorm whose statistics, and whose gradient's mean terms, are those of every rank's
    batch together.

    Each rank centres its batch on its own mean and sums with torch.sum (cascade summation,
    ~1e-7 relative): the fused CPU BatchNorm kernels accumulate naively (~4e-6 on the variance
    here), and Adam turns such noise into visible parameter differences between world sizes
    within a few steps. The ranks' (count, sum, centred sum of squares) are combined exactly
    (Chan et al.'s pairwise formula), so one collective per layer suffices in forward, and one
    (Σdy, Σdy·(x−μ)) in backward: every collective is a point where the ranks wait for each other.
    One process gets exactly the plain two-pass arithmetic.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float):
        dims, shape = _channel_dims(x)
        channels = x.shape[1]
        count = x.numel() / channels
        local_sum = x.sum(dims)
        local_mean = local_sum / max(count, 1)  # an empty rank adds nothing, and no NaN
        centred = x - local_mean.view(shape)  # on this rank's mean; x − μ = centred + shift
        local_m2 = centred.square().sum(dims)
        rows = gather_rows(torch.cat([x.new_tensor([count]), local_sum, local_m2]))
        counts, sums, m2s = rows[:, :1], rows[:, 1 : channels + 1], rows[:, channels + 1 :]
        total = counts.sum()
        mean = sums.sum(0) / total
        var = (m2s.sum(0) + (counts * (sums / counts.clamp_min(1) - mean).square()).sum(0)) / total
        shift = local_mean - mean  # exactly 0 for one process
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            running_var.mul_(1 - momentum).add_(var * total / (total - 1), alpha=momentum)
        invstd = torch.rsqrt(var + eps)
        scale = weight * invstd
        ctx.save_for_backward(centred, weight, invstd, total, shift)
        return torch.addcmul((bias + scale * shift).view(shape), centred, scale.view(shape))

    @staticmethod
    def backward(ctx, dy):
        centred, weight, invstd, total, shift = ctx.saved_tensors
        dims, shape = _channel_dims(centred)
        channels = centred.shape[1]
        sum_dy = dy.sum(dims)
        local = torch.cat([sum_dy, (dy * centred).sum(dims) + shift * sum_dy])  # Σdy, Σdy·(x−μ)
        mean_dy, mean_dy_centred = (all_reduce_sum(local.clone()) / total).split(channels)
        scale = weight * invstd
        k = scale * invstd * invstd * mean_dy_centred
        # dx = (w/σ)·(dy − mean dy − (x−μ)/σ²·mean dy·(x−μ)): the SyncBatchNorm formula
        dx = torch.addcmul((-scale * mean_dy - k * shift).view(shape), dy, scale.view(shape))
        dx.addcmul_(centred, (-k).view(shape))
        return dx, local[channels:] * invstd, local[:channels], None, None, None, None


class GlobalBatchNorm:
    """BatchNorm over the global batch for any backend (torch's SyncBatchNorm is CUDA-only).

    Forward and backward equal one BatchNorm over the concatenation of every rank's batch. One
    process may use it too (`distributed.exact_batchnorm`), so 1 rank and N ranks agree to float
    rounding. Evaluation uses the running statistics and makes no collective call.

    A mixin over the BatchNorm class it replaces, so that any BatchNorm (1d/2d/3d, or a library's
    subclass) keeps its parameters, buffers and state-dict keys. A subclass that follows the
    normalisation with its own `drop` and `act` modules (timm's BatchNormAct2d) keeps them.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        y = _GlobalBatchNormFunction.apply(
            x.float(),  # statistics in float32 even under CPU bf16 autocast
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            self.momentum,
            self.eps,
        )
        if isinstance(getattr(self, "act", None), nn.Module):
            y = self.act(self.drop(y))
        return y


class GlobalBatchNorm2d(GlobalBatchNorm, nn.BatchNorm2d):
    pass


_GLOBAL_CLASSES: dict[type, type] = {nn.BatchNorm2d: GlobalBatchNorm2d}


def _global_class(cls: type) -> type:
    """The GlobalBatchNorm subclass of a BatchNorm class (made once per class)."""
    if cls not in _GLOBAL_CLASSES:
        _GLOBAL_CLASSES[cls] = type(f"Global{cls.__name__}", (GlobalBatchNorm, cls), {})
    return _GLOBAL_CLASSES[cls]


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, (GlobalBatchNorm, nn.SyncBatchNorm)
    )


def _to_global_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm inside `module` made global, in place (same parameters and buffers)."""
    for child in module.modules():
        if _is_batchnorm(child):
            child.__class__ = _global_class(type(child))
    return module


def _to_sync_batchnorm(module: nn.Module) -> nn.Module:
    """CUDA: torch's SyncBatchNorm for plain BatchNorm layers (its fused kernels); subclasses with
    more in their forward (an activation) become GlobalBatchNorm, which keeps it."""
    for name, child in module.named_children():
        if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            setattr(module, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        elif _is_batchnorm(child):
            child.__class__ = _global_class(type(child))
        else:
            _to_sync_batchnorm(child)
    return module


# Synchronised BatchNorm keeps the running statistics equal on every rank, so DDP's broadcast of
# the buffers before each forward is wasted work. torch >= 2.13 deprecates `broadcast_buffers` for
# `forward_sync_buffers`, which still broadcasts once at start-up: harmless, every rank starts
# from the same seed.
_NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def wrap_model(model: nn.Module, ctx: Context, exact_batchnorm: bool = False) -> nn.Module:
    """Synchronised BatchNorm + DDP when there is a process group; the bare model otherwise.

    `exact_batchnorm` gives one CPU process the same BatchNorm arithmetic as N CPU ranks.
    """
    model = model.to(ctx.device)
    if ctx.device.type == "cuda":
        if not dist.is_initialized():
            return model
        model = _to_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[ctx.local_rank], **_NO_FORWARD_BUFFER_SYNC)
    if dist.is_initialized() or exact_batchnorm:
        model = _to_global_batchnorm(model)
    return DistributedDataParallel(model, **_NO_FORWARD_BUFFER_SYNC) if dist.is_initialized() else model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model
