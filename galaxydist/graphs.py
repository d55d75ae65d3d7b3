"""A training step replayed as one CUDA graph.

At the recipe's batch of 64 an eager step is bound by kernel launches, not by the GPU (measured
on an H200: the device busy 70 % of a bare step's wall time, and the whole loop with its
augmentation and bookkeeping ~40 % slower still). A replay launches the step's few hundred
kernels at once. This is PyTorch's "whole network capture" (the CUDA graphs section of the CUDA
semantics notes): warm-up steps on a side stream, one capture, then replays on static inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


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
