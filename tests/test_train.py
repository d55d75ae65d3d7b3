"""Distributed training on real gloo process groups (torchrun, 2–3 CPU processes)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    COMPARED_LR,
    ROOT,
    free_port,
    read_metrics,
    reference_overrides,
    run_train,
    tiny_overrides,
    wait_for_epochs,
    without_timing,
)

from galaxydist import synthetic
from galaxydist.data.dataset import keep_resident
from galaxydist.data.format import read_prepared
from galaxydist.data.galaxy10 import prepare
from galaxydist.engine.state import load_optimizer_state
from galaxydist.models.cnn import GalaxyCNN

HELPERS = Path(__file__).parent / "helpers"


def torchrun_script(nproc: int, script: Path, args: list[str], timeout: float = 300):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), *args,
    ]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def assert_same_state(a: dict, b: dict, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_two_ranks_of_32_equal_one_rank_of_64(tiny_prepared, tmp_path, dropout):
    """SyncBatchNorm's CPU twin, global loss normalisation, sample order and per-sample dropout
    masks: same parameters."""
    overrides = lambda out: tiny_overrides(  # noqa: E731
        tiny_prepared,
        out,
        **{
            "model.dropout": dropout,
            "data.batch_size": 64,
            "stages": f"[{{name: t, lr: {COMPARED_LR}, max_epochs: 2, patience: 5}}]",
            "distributed.exact_batchnorm": "true",  # the one process sums as the ranks do
        },
    )
    one = run_train(0, overrides(tmp_path / "one"))
    two = run_train(2, overrides(tmp_path / "two"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "broadcast_buffers" not in two.stderr  # torch >= 2.13 warns about the old DDP argument
    a, b = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    assert any("running_var" in k for k in a)  # BatchNorm running statistics are compared too
    assert_same_state(a, b)
    m1, m2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    np.testing.assert_allclose([m["train_loss"] for m in m1], [m["train_loss"] for m in m2], rtol=1e-4)
    assert [m["val_acc"] for m in m1] == [m["val_acc"] for m in m2]


def test_compiled_training_follows_eager_and_saves_plain_checkpoints(tiny_prepared, tmp_path):
    """speed.compile=true (inductor, an empty cache): the same first epoch to float rounding, and a
    checkpoint whose keys are the plain model's, so evaluate/predict load it."""
    one_epoch = "[{name: t, lr: 0.003, max_epochs: 1, patience: 5}]"
    eager = run_train(0, tiny_overrides(tiny_prepared, tmp_path / "eager", stages=one_epoch))
    compiled = run_train(
        0,
        tiny_overrides(tiny_prepared, tmp_path / "compiled", stages=one_epoch, **{"speed.compile": "true"}),
        extra_env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")},
    )
    assert eager.returncode == 0, eager.stderr[-3000:]
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    (a,), (b,) = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
    assert final_state(tmp_path / "compiled").keys() == final_state(tmp_path / "eager").keys()
    assert any(p.suffix == ".py" for p in (tmp_path / "inductor").rglob("*"))  # inductor generated code


def test_data_stays_on_the_host_on_cpu_unless_asked_otherwise():
    cpu = torch.device("cpu")
    assert keep_resident("auto", cpu, nbytes=1) is False
    assert keep_resident(True, cpu, nbytes=10**15) is True
    assert keep_resident(False, cpu, nbytes=1) is False


def test_device_resident_data_trains_exactly_like_the_loader(tiny_prepared, tmp_path):
    """speed.resident (the CUDA default) serves the same batches, rows and draws as the memmap
    DataLoader; on the CPU both paths run, so they must give the same parameters."""
    loader = run_train(0, tiny_overrides(tiny_prepared, tmp_path / "loader", **{"data.num_workers": 2}))
    resident = run_train(
        0, tiny_overrides(tiny_prepared, tmp_path / "resident", **{"speed.resident": "true"})
    )
    assert loader.returncode == 0, loader.stderr[-3000:]
    assert resident.returncode == 0, resident.stderr[-3000:]
    assert_same_state(final_state(tmp_path / "loader"), final_state(tmp_path / "resident"), rtol=0, atol=0)
    a, b = (without_timing(read_metrics(tmp_path / r)) for r in ("loader", "resident"))
    assert a == b and len(a) == 2


def test_exact_evaluation_at_world_size_three(tiny_prepared, tmp_path):
    info = read_prepared(tiny_prepared)
    sizes = {split: len(info.splits[split]) for split in ("val", "test")}
    assert any(n % 3 for n in sizes.values()), sizes  # uneven shards are exercised
    args = tiny_overrides(
        tiny_prepared, tmp_path / "run", **{"data.batch_size": 48, "data.eval_batch_size": 12}
    )
    result = torchrun_script(3, HELPERS / "eval_ranks.py", [str(tmp_path), *args])
    assert result.returncode == 0, result.stderr[-3000:]
    single = subprocess.run(
        [sys.executable, str(HELPERS / "eval_ranks.py"), str(tmp_path), *args], capture_output=True, text=True
    )
    assert single.returncode == 0, single.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}_of_3.json").read_text()) for r in range(3)]
    alone = json.loads((tmp_path / "rank0_of_1.json").read_text())
    for split, n in sizes.items():
        assert np.sum(ranks[0][split]["confusion"]) == n
        assert all(r[split] == ranks[0][split] for r in ranks)  # identical metrics on every rank
        assert ranks[0][split]["confusion"] == alone[split]["confusion"]
        assert ranks[0][split]["loss"] == pytest.approx(alone[split]["loss"], rel=1e-5)


def test_one_rank_wanting_to_stop_stops_every_rank_on_the_same_epoch(tiny_prepared, tmp_path):
    run = tmp_path / "run"
    args = tiny_overrides(
        tiny_prepared,
        run,
        **{"stages": "[{name: t, lr: 0.003, max_epochs: 6, patience: 5}]", "distributed.timeout_s": 60},
    )
    result = torchrun_script(2, HELPERS / "patched_train.py", ["stop", "1", "2", "--", *args])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["epoch"] for m in read_metrics(run)] == [0, 1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_per_stage"] == {"t": 2}


def test_nan_on_one_rank_stops_every_rank_with_a_message(tiny_prepared, tmp_path):
    run = tmp_path / "run"
    args = tiny_overrides(tiny_prepared, run, **{"distributed.timeout_s": 60})
    steps_per_epoch = len(read_prepared(tiny_prepared).splits["train"]) // 32
    result = torchrun_script(
        2, HELPERS / "patched_train.py", ["nan", "1", str(steps_per_epoch + 2), "--", *args]
    )
    assert result.returncode != 0
    assert "exitcode  : 3" in result.stderr  # EXIT_NONFINITE, as documented
    assert "non-finite loss on rank 1 at stage 0 epoch 1 step 2" in result.stderr
    # Every rank stopped on that message (none hung or crashed elsewhere).
    assert result.stderr.count("non-finite loss on rank 1") == 2
    good = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert good["position"]["epoch"] == 1 and good["position"]["step"] == 0
    assert all(torch.isfinite(t).all() for t in good["model"].values() if t.is_floating_point())
    assert len(read_metrics(run)) == 1


def workers_of(proc: subprocess.Popen) -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "galaxydist.train" in " ".join(p.cmdline())
    ]


def start_torchrun(args: list[str], *torchrun_flags: str) -> subprocess.Popen:
    """torchrun with the c10d rendezvous, as a restartable (elastic) job is launched."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{free_port()}", *torchrun_flags, "-m", "galaxydist.train", *args,
    ]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_same_run(reference: Path, run: Path) -> None:
    """Same final parameters, and the same per-epoch metrics with no epoch lost or repeated."""
    assert_same_state(final_state(reference), final_state(run), rtol=1e-5, atol=1e-6)
    a, b = read_metrics(reference), read_metrics(run)
    assert [m["epoch"] for m in b] == [m["epoch"] for m in a] == [0, 1, 2, 3]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        np.testing.assert_allclose([m[key] for m in a], [m[key] for m in b], rtol=1e-5, err_msg=key)
    summary_a, summary_b = (json.loads((r / "summary.json").read_text()) for r in (reference, run))
    assert summary_a["test_confusion"] == summary_b["test_confusion"]


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM])
def test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(
    tiny_prepared, reference_run, tmp_path, sig
):
    """4 epochs straight ≡ stopped by a signal mid-run, then resumed by running the same command."""
    run = tmp_path / "resumed"
    args = reference_overrides(tiny_prepared, run)
    proc = start_torchrun(args)
    wait_for_epochs(run, 2)
    started = time.monotonic()
    for worker in workers_of(proc):
        worker.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert time.monotonic() - started < 30  # every rank left within seconds
    assert (
        len(set(re.findall(r"stopped by signal at (stage \d+ epoch \d+ step \d+); last.pt saved", stderr)))
        == 1
    )
    assert stderr.count("stopped by signal at") == 2, stderr[-3000:]
    assert "exitcode  : 75" in stderr  # EXIT_INTERRUPTED, as documented
    stopped = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["position"]
    assert (stopped["stage"], stopped["epoch"]) < (1, 0)  # it really stopped before the end

    resumed = run_train(2, args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert_same_run(reference_run, run)


def test_a_signal_to_one_rank_stops_every_rank_on_the_same_step(tiny_prepared, reference_run, tmp_path):
    """SIGTERM to rank 1 alone: the stop flag rides the step's all-reduce, so rank 0 stops on the
    same step, both exit 75, and the same command resumes exactly."""
    run = tmp_path / "resumed"
    args = reference_overrides(tiny_prepared, run)
    proc = start_torchrun(args)
    wait_for_epochs(run, 2)
    (rank1,) = [w for w in workers_of(proc) if w.environ().get("RANK") == "1"]
    rank1.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    positions = re.findall(r"rank (\d): stopped by signal at (stage \d+ epoch \d+ step \d+)", stderr)
    assert sorted(rank for rank, _ in positions) == ["0", "1"], stderr[-3000:]
    assert len({position for _, position in positions}) == 1  # the same step on both ranks
    assert "exitcode  : 75" in stderr
    resumed = run_train(2, args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert_same_run(reference_run, run)


def test_resumed_adam_takes_this_runs_kernel_and_memory_layout():
    """A checkpoint from an unfused NCHW run, resumed with channels_last and fused Adam (as a CPU
    checkpoint resumed on a GPU): the flag is this run's, the moments are laid out like their
    parameters (CUDA's fused Adam refuses them otherwise), their values are unchanged."""
    torch.manual_seed(0)
    saving_model = GalaxyCNN([4, 8], 3)
    saving = torch.optim.Adam(saving_model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    F.cross_entropy(saving_model(x), y).backward()
    saving.step()
    model = GalaxyCNN([4, 8], 3)
    model.load_state_dict(saving_model.state_dict())
    model = model.to(memory_format=torch.channels_last)
    resumed = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    load_optimizer_state(resumed, saving.state_dict())
    assert resumed.param_groups[0]["fused"] is True
    conv = model.features[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    for old, new in zip(saving_model.parameters(), model.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            assert resumed.state[new][key].stride() == new.stride()
            torch.testing.assert_close(resumed.state[new][key], saving.state[old][key], rtol=0, atol=0)
    F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y).backward()
    resumed.step()


def test_demo_recipe_learns_far_above_chance(tmp_path_factory):
    """The demo config on synthetic data: a broken pipeline stays near 10 % (balanced chance)."""
    root = tmp_path_factory.mktemp("learn")
    synthetic.generate(root / "raw.h5", n=1500, seed=3, size=64)
    prepare(str(root / "raw.h5"), str(root / "p.h5"), crop=48)
    result = run_train(
        2,
        [
            "--config", str(ROOT / "configs" / "demo.yaml"), f"data.path={root / 'p.h5'}", f"output_dir={root / 'run'}",
            "stages=[{name: train, lr: 0.002, max_epochs: 6, patience: 6}]",
        ],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.45, summary
    assert np.mean(summary["per_class_accuracy"]) > 0.35


def test_checkpoint_of_a_cuda_graphs_run_resumes_on_the_cpu():
    """A GPU run with CUDA graphs saves a capturable Adam (its step counts on the device); the
    resuming run's own flag must win, or the CPU step refuses the capturable state."""
    torch.manual_seed(0)
    model = GalaxyCNN([4, 8], 3)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    saving = torch.optim.Adam(model.parameters(), lr=1e-3)
    F.cross_entropy(model(x), y).backward()
    saving.step()
    saved = saving.state_dict()
    saved["param_groups"] = [{**group, "capturable": True} for group in saved["param_groups"]]
    resumed = torch.optim.Adam(model.parameters(), lr=1e-3)
    load_optimizer_state(resumed, saved)
    assert resumed.param_groups[0]["capturable"] is False
    F.cross_entropy(model(x), y).backward()
    resumed.step()
    assert all(int(state["step"]) == 2 for state in resumed.state.values())
