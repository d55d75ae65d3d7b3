"""The training step: one optimiser step on a device batch (`TrainStep`), its all-reduced flags
read without stalling the device (`StepFlags`), and the step replayed as one CUDA graph
(`GraphedStep`).

At small batches an eager step on a GPU is bound by kernel launches, not by the GPU (see
BENCHMARKS.md §4); a replay launches the step's few hundred kernels at once. This is PyTorch's
"whole network capture" (the CUDA graphs section of the CUDA semantics notes): warm-up steps on
a side stream, one capture, then replays on static inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .. import distributed
from ..data.augment import BatchTransform
from ..models.dropout import keyed_dropouts
from .ema import EMA


class TrainStep:
    """One optimiser step on a batch already on the device; returns the step's all-reduced flags
    and its (weighted loss, weight, correct, count) sums. No host synchronisation, so that it can
    be captured as a CUDA graph."""

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        class_weights: torch.Tensor,
        transform: BatchTransform,
        ctx: distributed.Context,
        bf16: bool,
        label_smoothing: float = 0.0,
        ema: EMA | None = None,
        logit_offsets: torch.Tensor | None = None,
    ) -> None:
        self.forward, self.optimizer, self.weights = forward, optimizer, class_weights
        self.transform, self.ctx, self.bf16 = transform, ctx, bf16
        self.label_smoothing, self.ema, self.logit_offsets = label_smoothing, ema, logit_offsets
        self.dropouts = keyed_dropouts(forward) if isinstance(forward, torch.nn.Module) else []
        self.keys: torch.Tensor | None = None  # one tensor the dropout layers keep reading

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        draws: torch.Tensor,
        keys: torch.Tensor,
        stop: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = self.ctx
        self.share_keys(keys)
        x = self.transform(images, draws)
        labels = self.transform.targets(labels, draws)
        # No autocast cast cache: it cannot outlive a graph capture, and each weight is cast once
        # per forward anyway.
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            logits = self.forward(x)
        adjusted = logits.float() if self.logit_offsets is None else logits.float() + self.logit_offsets
        losses = F.cross_entropy(adjusted, labels, reduction="none", label_smoothing=self.label_smoothing)
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
        if self.ema is not None:
            self.ema.update()
        with torch.no_grad():
            count = (labels >= 0).sum()  # len(labels), counted on the device: no host-to-device copy
            correct = (logits.argmax(1) == labels).sum()
            return flags, torch.stack([weighted_sum.detach(), w.sum(), correct, count]).double()

    def share_keys(self, keys: torch.Tensor) -> None:
        """The batch's per-sample dropout keys into the one tensor every KeyedDropout reads (the
        same tensor at every step: a compiled or captured step sees no new attribute)."""
        if self.keys is None or self.keys.shape != keys.shape:
            self.keys = keys.clone()
            for layer in self.dropouts:
                layer.keys = self.keys
        else:
            self.keys.copy_(keys)


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


def seed_dropout(seed: int, device: torch.device) -> None:
    """Seed only the generator dropout draws from (torch.manual_seed visits every backend: ~0.1 ms)."""
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


class GraphedStep:
    """Calls `step(*inputs)` eagerly for `warmup` calls, then captures it and replays the graph.

    The graph reads its inputs from static copies and returns the same static outputs at every
    replay: use them before the next call. A call whose inputs differ in shape or dtype from the
    captured ones runs eagerly (a guard: the Trainer's training batches are all full). `step` must
    be capturable: no host synchronisation, and an optimiser made with `capturable=True`.

    Random draws follow the generator's state at each replay (PyTorch's graph-safe RNG), so
    seeding the generator before a call makes dropout a function of that seed, as it is eagerly.
    """

    def __init__(self, step: Callable[..., Any], warmup: int = 3) -> None:
        self.step, self.warmup = step, warmup
        self.side_stream = torch.cuda.Stream()  # one for every warm-up call: one memory cache
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: list[torch.Tensor] = []
        self.static_outputs: Any = None
        self.calls = 0

    def __call__(self, *inputs: torch.Tensor) -> Any:
        if self.graph is None and self.calls >= self.warmup:
            self.capture(inputs)
        if self.graph is None:
            self.calls += 1
            return self.on_side_stream(inputs)
        if not self.fits(inputs):
            return self.step(*inputs)
        for static, value in zip(self.static_inputs, inputs, strict=True):
            static.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.static_outputs

    def fits(self, inputs: Sequence[torch.Tensor]) -> bool:
        """Whether the captured graph can take `inputs` (same shapes, dtypes and devices)."""
        return len(inputs) == len(self.static_inputs) and all(
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            for a, b in zip(inputs, self.static_inputs, strict=True)
        )

    def on_side_stream(self, inputs: Sequence[torch.Tensor]) -> Any:
        """Warm-up (cuDNN autotuning, lazy workspaces, the optimiser's state) must not run on the
        stream that is captured later."""
        main = torch.cuda.current_stream()
        self.side_stream.wait_stream(main)
        with torch.cuda.stream(self.side_stream):
            outputs = self.step(*inputs)
        main.wait_stream(self.side_stream)
        return outputs

    def capture(self, inputs: Sequence[torch.Tensor]) -> None:
        """Record the step; nothing runs until the replay that follows. `thread_local`: a
        DataLoader's pin-memory thread allocating pinned memory meanwhile must not void it."""
        self.static_inputs = [value.clone() for value in inputs]
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.static_outputs = self.step(*self.static_inputs)
