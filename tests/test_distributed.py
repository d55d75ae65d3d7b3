"""The distributed helpers on real gloo process groups (spawned CPU processes)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port
from torch import nn

from galaxydist import distributed
from galaxydist.errors import UserError
from galaxydist.models.cnn import GalaxyCNN


def _in_group(rank: int, world: int, port: int, fn, queue) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    ctx = distributed.setup(timeout_s=60)
    try:
        queue.put((rank, fn(ctx)))
    finally:
        distributed.teardown()


def run_group(world: int, fn) -> dict[int, object]:
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_in_group, args=(world, free_port(), fn, queue), nprocs=world)
    return dict(queue.get() for _ in range(world))


def _any_rank_votes(ctx):
    return (
        distributed.any_rank(ctx.rank == 2, ctx.device),
        distributed.any_rank(False, ctx.device),
        distributed.any_rank(True, ctx.device),
    )


def test_any_rank_is_one_decision_for_all():
    assert set(run_group(3, _any_rank_votes).values()) == {(True, False, True)}


def _grads_against_one_big_batch(ctx):
    """Each rank: half of a batch through GlobalBatchNorm + DDP; rank 0 also the whole batch through
    plain nn.BatchNorm2d. Returns the largest gradient/output/running-stat differences."""
    torch.manual_seed(0)
    model = GalaxyCNN([8, 8, 16, 16, 16], 10, dropout=0.0)
    reference = GalaxyCNN([8, 8, 16, 16, 16], 10, dropout=0.0)
    reference.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    ddp = distributed.wrap_model(model, ctx)
    assert any(isinstance(m, distributed.GlobalBatchNorm2d) for m in ddp.modules())
    mine = slice(ctx.rank * 32, (ctx.rank + 1) * 32)
    out = ddp(x[mine])
    (nn.functional.cross_entropy(out, y[mine], reduction="sum") * ctx.world_size / 64).backward()
    ref_out = reference(x)
    nn.functional.cross_entropy(ref_out, y, reduction="mean").backward()
    grads = max(
        (p.grad - q.grad).abs().max().item()
        for p, q in zip(distributed.unwrap(ddp).parameters(), reference.parameters(), strict=True)
    )
    buffers = max(
        (a.float() - b.float()).abs().max().item()
        for a, b in zip(distributed.unwrap(ddp).buffers(), reference.buffers(), strict=True)
    )
    return grads, (out - ref_out[mine]).abs().max().item(), buffers


def test_global_batchnorm_equals_one_batchnorm_over_the_whole_batch():
    for grads, outputs, buffers in run_group(2, _grads_against_one_big_batch).values():
        assert grads < 1e-5 and outputs < 1e-5 and buffers < 1e-6


def test_global_batchnorm_without_process_group_is_plain_batchnorm():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    global_bn = distributed._to_global_batchnorm(nn.Sequential(nn.BatchNorm2d(4)))[0]
    x = torch.randn(8, 4, 5, 5) * 3 + 1
    torch.testing.assert_close(global_bn(x), bn(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(global_bn.running_var, bn.running_var)
    global_bn.eval(), bn.eval()
    torch.testing.assert_close(global_bn(x), bn(x))


def test_one_cpu_process_uses_fused_batchnorm_unless_exactness_is_asked_for():
    ctx = distributed.Context(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    kinds = lambda model: {type(m) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}  # noqa: E731
    assert kinds(distributed.wrap_model(GalaxyCNN([8, 8], 10), ctx)) == {nn.BatchNorm2d}
    exact = distributed.wrap_model(GalaxyCNN([8, 8], 10), ctx, exact_batchnorm=True)
    assert kinds(exact) == {distributed.GlobalBatchNorm2d}


def test_batch_must_divide_over_ranks():
    ctx = distributed.Context(rank=0, world_size=3, local_rank=0, device=torch.device("cpu"))
    assert distributed.split_batch(63, ctx) == 21
    with pytest.raises(UserError, match="global batch 64 does not divide over 3 ranks"):
        distributed.split_batch(64, ctx)
