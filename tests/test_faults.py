"""Failure injection: real processes, real signals, real gloo groups; and the bad-input table."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest
import torch
from conftest import (
    read_metrics,
    reference_overrides,
    require,
    run_train,
    tiny_overrides,
    wait_for,
    wait_for_epochs,
)
from test_train import HELPERS, assert_same_run, start_torchrun, torchrun_script, workers_of

from galaxydist import checkpoint
from galaxydist.data.format import write_prepared
from galaxydist.errors import UserError
from galaxydist.tracking import RunFolder


def test_kill_9_of_one_worker_restarts_and_ends_like_an_undisturbed_run(
    tiny_prepared, reference_run, tmp_path
):
    run = tmp_path / "killed"
    proc = start_torchrun(reference_overrides(tiny_prepared, run), "--max-restarts=1")
    wait_for_epochs(run, 2)
    victim = workers_of(proc)[-1]
    victim.kill()
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    # The restarted group resumed from last.pt (at an epoch start) rather than training afresh. An
    # epoch's metrics line is written before its last.pt, so the kill may land between the two:
    # then the group resumes at the start of the second epoch and redoes it.
    resumed = re.search(r"resuming from \S+last\.pt at stage 0 epoch (\d+) step 0", stdout)
    assert resumed and int(resumed.group(1)) >= 1, stdout[-2000:]
    assert_same_run(reference_run, run)


def leftover_processes(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if marker in " ".join(p.info["cmdline"] or []):
                found.append(p)
    return found


def test_exception_on_one_rank_ends_every_rank_within_the_collective_timeout(tiny_prepared, tmp_path):
    run = tmp_path / "crash"
    timeout_s = 20
    args = tiny_overrides(tiny_prepared, run, **{"distributed.timeout_s": timeout_s})
    started = time.monotonic()
    result = torchrun_script(2, HELPERS / "patched_train.py", ["raise", "1", "3", "--", *args], timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stderr
    assert elapsed < timeout_s + 30, elapsed
    assert leftover_processes(str(run)) == []


def test_a_hung_rank_ends_every_rank_within_the_collective_timeout(tiny_prepared, tmp_path):
    """Rank 1 stays alive but never reaches its next collective: rank 0's all-reduce fails after
    distributed.timeout_s (not sooner: nothing else tells it), torchrun ends the hung rank, no
    process is left. Without the timeout this would hang until the test's own limit."""
    run = tmp_path / "hang"
    timeout_s = 15
    args = tiny_overrides(tiny_prepared, run, **{"distributed.timeout_s": timeout_s})
    started = time.monotonic()
    result = torchrun_script(2, HELPERS / "patched_train.py", ["hang", "1", "3", "--", *args], timeout=420)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "rank 1 hangs at step 3" in result.stderr
    # At least the timeout (nothing else ends rank 0's wait); a run that ignored the timeout would
    # hang until this test's own 420 s limit. Start-up on a loaded 2-core machine took up to ~2 min.
    assert timeout_s <= elapsed < timeout_s + 300, elapsed
    assert leftover_processes(str(run)) == []


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    script = f"""
import os, pathlib, signal, torch
from galaxydist import checkpoint
checkpoint.save({{"step": 1, "w": torch.ones(3)}}, {str(path)!r})

def dies_halfway(self, data):
    with open(self, "wb") as out:
        out.write(bytes(data)[: len(data) // 2])
        out.flush()
    os.kill(os.getpid(), signal.SIGKILL)

pathlib.Path.write_bytes = dies_halfway
checkpoint.save({{"step": 2, "w": torch.zeros(3)}}, {str(path)!r})
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL
    state = checkpoint.load(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    partial = [p for p in path.parent.iterdir() if p.name != "last.pt"]
    assert len(partial) == 1 and partial[0].name.startswith(".last.pt.")  # never named like a checkpoint


def test_checkpoint_write_on_a_full_disk_is_an_os_error_and_keeps_the_previous_file(tmp_path):
    """A write the kernel refuses (here RLIMIT_FSIZE's EFBIG, which fails a write as ENOSPC does)
    must reach the Trainer as an OSError, the error it stops every rank on; torch.save(state, path)
    raised a bare RuntimeError from its C++ writer instead."""
    path = tmp_path / "last.pt"
    script = f"""
import errno, resource, signal, torch
from galaxydist import checkpoint
checkpoint.save({{"w": torch.ones(3)}}, {str(path)!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
try:
    checkpoint.save({{"w": torch.zeros(2**20)}}, {str(path)!r})  # 4 MiB
except OSError as err:
    print(errno.errorcode[err.errno])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["EFBIG"]
    assert torch.equal(checkpoint.load(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize(
    "blocked, epochs, checkpoints",
    [
        ("checkpoints/best.pt", [0], ["best.pt"]),  # a checkpoint, after the first epoch
        ("metrics.jsonl", None, []),  # the first epoch's record
        ("summary.json", [0, 1], ["best.pt", "last.pt"]),  # the final report, after training
    ],
    ids=["checkpoint", "metrics", "final-report"],
)
def test_failed_run_folder_write_stops_every_rank_with_its_reason(
    tiny_prepared, tmp_path, blocked, epochs, checkpoints
):
    """Rank 0 cannot write to the run folder (here: a directory stands in its way; a full disk
    or lost permissions alike): both ranks stop on it with the reason rather than a traceback,
    exit 74, and no temporary file is left behind."""
    run = tmp_path / "run"
    (run / blocked).mkdir(parents=True)
    (run / "checkpoints").mkdir(exist_ok=True)
    result = run_train(2, tiny_overrides(tiny_prepared, run))
    assert result.returncode != 0
    # The first rank out exits 74; torchrun may then stop the other before its own exit.
    assert "exitcode  : 74" in result.stderr, result.stderr[-3000:]
    target = f"the final report in {run}" if blocked == "summary.json" else run / blocked
    for rank in (0, 1):
        assert f"rank {rank}: rank 0 cannot write {target} (" in result.stderr
    assert "IsADirectoryError" not in result.stderr  # a reason, not a rank's traceback
    if epochs is not None:
        assert [r["epoch"] for r in read_metrics(run)] == epochs  # it trained, then stopped there
    assert list(run.rglob("*.tmp")) == []
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints


def test_an_append_cut_short_is_not_a_record_and_goes_at_the_next_start(tmp_path):
    """A full disk or a kill mid-append leaves part of a metrics line: readers skip it, and the
    trimming every start does (keep_metrics) removes it."""
    run = RunFolder(tmp_path)
    records = [{"stage": "train", "stage_index": 0, "epoch": e, "val_acc": 0.5 + e} for e in range(2)]
    for record in records:
        run.append_metrics(record)
    with run.metrics_path.open("a") as f:
        f.write('{"stage": "train", "stage_in')
    assert run.read_metrics() == records
    run.keep_metrics(before=(0, 1))
    assert run.metrics_path.read_text() == json.dumps(records[0]) + "\n"


def test_fresh_run_logs_only_its_own_epochs_after_an_attempt_died_before_its_first_checkpoint(
    tiny_prepared, tmp_path
):
    """The folder of an attempt that stopped in its first epochs (no last.pt): a line of its own
    and an append cut short. The new run starts over and its record is its own alone."""
    run = tmp_path / "run"
    run.mkdir()
    stale = {"stage": "train", "stage_index": 0, "epoch": 0, "train_loss": 123.0, "train_acc": 0.0,
             "val_loss": 123.0, "val_acc": 0.0, "lr": 0.003, "seconds": 1.0, "images_per_second": 1.0}  # fmt: skip
    (run / "metrics.jsonl").write_text(json.dumps(stale) + "\n" + '{"stage": "tra')
    result = run_train(0, tiny_overrides(tiny_prepared, run))
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(run)
    assert [r["epoch"] for r in records] == [0, 1] and 123.0 not in [r["train_loss"] for r in records]
    assert json.loads((run / "summary.json").read_text())["epochs_per_stage"] == {"train": 2}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_data_command_leaves_no_worker_and_no_partial_file(tmp_path, sig):
    """prepare/synthetic's worker pool under `kill` and `kill -9` of the command: the workers go
    with it (the kernel kills them for -9), and after a SIGTERM the temporary output is removed."""
    fifo, dst = tmp_path / "never-written", tmp_path / "out.txt"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, str(HELPERS / "blocked_pool.py"), str(fifo), str(dst)])

    def pool_workers() -> list[psutil.Process]:
        children = psutil.Process(proc.pid).children()
        return [
            p
            for p in children
            if "spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())
        ]

    def temporary_files() -> list[Path]:
        return [p for p in tmp_path.iterdir() if p.name.startswith(".out.txt.")]

    wait_for(lambda: len(pool_workers()) == 2 and temporary_files(), 60, "two workers and a temporary file")
    workers = pool_workers()
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == (128 + sig if sig == signal.SIGTERM else -sig)
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert alive == []
    assert not dst.exists()
    if sig == signal.SIGTERM:
        assert temporary_files() == []


def image_folder(root: Path) -> tuple[Path, Path]:
    """Nine 40² PNGs in three classes and their labels CSV: a valid image-folder source."""
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True)
    rows = ["objid,label"]
    for i in range(9):
        Image.fromarray(np.full((40, 40, 3), 20 * i, np.uint8)).save(images / f"g{i}.png")
        rows.append(f"g{i},{i % 3}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return images, root / "labels.csv"


@pytest.mark.parametrize("command", ["evaluate", "predict", "synthetic", "prepare", "prepare-folder"])
def test_output_path_through_a_file_is_one_line_exit_74_before_any_work(
    command, trained_run, raw_small, tmp_path
):
    """An output the file system refuses (here a path through a file; no space or no permission
    alike): one `error:` line naming it, exit 74, decided before the work (predict prints its
    first predictions as it goes: nothing is printed)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    run, out = str(trained_run.run), blocker / "out"
    if command == "evaluate":
        args = [run, "--out", str(out)]
    elif command == "predict":
        args = [run, str(raw_small), "--out", str(out)]
    elif command == "synthetic":
        args = [str(out), "--n", "20", "--size", "32"]
    elif command == "prepare":
        args = [str(raw_small), str(out), "--crop", "32"]
    else:
        images, labels = image_folder(tmp_path / "source")
        args = ["--images", str(images), "--labels", str(labels), str(out), "--crop", "32"]
    module = command.removesuffix("-folder")
    result = subprocess.run(
        [sys.executable, "-m", f"galaxydist.{module}", *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 74, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [f"error: Not a directory: {blocker}"]
    assert result.stdout == ""
    assert (
        sorted(p.name for p in tmp_path.iterdir())
        == ["a-file", "source"][: 1 + (command == "prepare-folder")]
    )


def test_bad_input_is_reported_before_a_bad_output(tmp_path):
    """Inputs first, then the output, then the work: with both wrong, the input's error (exit 2)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = subprocess.run(
        [sys.executable, "-m", "galaxydist.predict", str(tmp_path / "missing.pt"), str(blocker),
         "--out", str(blocker / "preds.csv")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.pt'}: checkpoint not found"]


def test_unwritable_output_folder_fails_before_training(tiny_prepared, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = run_train(0, tiny_overrides(tiny_prepared, blocker / "run"))
    assert result.returncode == 74
    (line,) = result.stderr.strip().splitlines()
    assert f"rank 0 cannot write {blocker / 'run'} (Not a directory" in line and "epoch" not in result.stdout


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)]).returncode == 0
    require(mounted, "cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_disk_filling_up_during_a_data_write_is_one_line_exit_74_and_leaves_nothing(tiny_disk):
    """No space left in the middle of an HDF5 write (h5py's error, with no errno and a message of
    several lines): one `error:` line naming the file, exit 74, no temporary file."""
    out = tiny_disk / "raw.h5"
    result = subprocess.run(
        [sys.executable, "-m", "galaxydist.synthetic", str(out), "--n", "300", "--size", "64"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 74, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and line.endswith(f": {out}")
    assert list(tiny_disk.iterdir()) == []


def test_full_output_disk_fails_before_training(tiny_prepared, tiny_disk):
    result = run_train(0, tiny_overrides(tiny_prepared, tiny_disk / "run"))
    assert result.returncode == 74
    (line,) = result.stderr.strip().splitlines()
    assert "MB free, checkpoints need" in line and "epoch" not in result.stdout
    assert not (tiny_disk / "run" / "config.yaml").exists()


# --- bad input: one line naming the problem, exit 2, nothing written ------------------------


def bad_prepared(tmp_path: Path, tiny_prepared: Path, change: str) -> Path:
    path = tmp_path / f"{change}.h5"
    path.write_bytes(tiny_prepared.read_bytes())
    if change == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 4096)
    else:
        with h5py.File(path, "r+") as f:
            if change == "version":
                f.attrs["galaxydist_format"] = 99
            elif change == "empty_split":
                del f["splits/val"]
                f.create_dataset("splits/val", data=np.zeros(0, dtype=np.int64))
            elif change == "modified_shape":
                del f["labels"]
                f.create_dataset("labels", data=np.zeros(5, dtype=np.int64))
    return path


def two_image_splits(tmp_path: Path) -> Path:
    """A prepared file whose splits hold 2 images each (2 classes × 3 images)."""
    path = tmp_path / "two.h5"
    labels = np.array([0, 0, 0, 1, 1, 1])
    slabs = [np.zeros((6, 8, 8, 3), dtype=np.uint8)]
    write_prepared(str(path), slabs, labels, 8, ["a", "b"], 0, {}, {"source_name": "test"})
    return path


def foreign_checkpoint(tmp_path: Path, tiny_prepared: Path) -> Path:
    """A real checkpoint from a run with other channels."""
    run = tmp_path / "other-model"
    overrides = tiny_overrides(tiny_prepared, run, **{"model.channels": "[4,4,4,4,4]"})
    overrides[-1] = "stages=[{name: t, lr: 0.003, max_epochs: 1, patience: 1}]"
    assert run_train(0, overrides).returncode == 0
    return run / "checkpoints" / "last.pt"


BAD_TRAIN_INPUTS = {  # case: (options, overrides applied last, message)
    "unknown config key": ([], ["data.shufle=true"], "unknown config key 'data.shufle'"),
    "wrong type": ([], ["data.batch_size=big"], "'data.batch_size': expected int"),
    "negative lr": ([], ["stages.0.lr=-0.1"], "'stages.0.lr': must be positive"),
    "zero patience": ([], ["stages.0.patience=0"], "'stages.0.patience'"),
    "bad wandb mode": ([], ["tracking.wandb=maybe"], "'tracking.wandb'"),
    "override without =": ([], ["seed"], "expected key=value"),
    "missing config file": (["--config", "/nonexistent/c.yaml"], [], "cannot read config"),
    "missing data path": ([], ["data.path=/nonexistent/p.h5"], "prepared data not found"),
    "batch larger than train split": ([], ["data.batch_size=4096"], "exceeds the"),
    "resume checkpoint missing": (["--resume", "/nonexistent/last.pt"], [], "checkpoint not found"),
    "images too small for the model": (
        [],
        ["model.channels=[4,4,4,4,4,4]"],
        "too small for 6 pooling blocks",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TRAIN_INPUTS))
def test_bad_train_input(case, tiny_prepared, tmp_path):
    options, overrides, message = BAD_TRAIN_INPUTS[case]
    out = tmp_path / "run"
    result = run_train(0, [*options, *tiny_overrides(tiny_prepared, out), *overrides])
    assert_one_line_error(result, message)
    assert not out.exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ("version", "prepared with format 99"),
        ("truncated", "truncated"),
        ("empty_split", "split 'val' is empty"),
        ("modified_shape", "labels do not match the images"),
    ],
)
def test_bad_prepared_file(change, message, tiny_prepared, tmp_path):
    out = tmp_path / "run"
    result = run_train(0, tiny_overrides(bad_prepared(tmp_path, tiny_prepared, change), out))
    assert_one_line_error(result, message)
    assert not out.exists()


def test_batch_not_divisible_by_world_size(tiny_prepared, tmp_path):
    out = tmp_path / "run"
    result = run_train(2, tiny_overrides(tiny_prepared, out, **{"data.batch_size": 33}))
    assert result.returncode != 0
    assert "exitcode  : 2" in result.stderr  # bad input, as documented
    assert (
        result.stderr.count(
            "error: config key 'data.batch_size': global batch 33 does not divide over 2 ranks"
        )
        == 2
    )
    assert not out.exists()


def test_world_size_larger_than_a_split(tmp_path):
    out = tmp_path / "run"
    data = two_image_splits(tmp_path)
    result = run_train(3, tiny_overrides(data, out, **{"data.batch_size": 3}))
    assert result.returncode != 0
    assert "exitcode  : 2" in result.stderr
    assert result.stderr.count("split 'train' has 2 images, fewer than the 3 ranks") == 3
    assert not out.exists()


def test_checkpoint_from_another_model_shape(tiny_prepared, tmp_path):
    other = foreign_checkpoint(tmp_path, tiny_prepared)
    out = tmp_path / "run"
    result = run_train(0, ["--resume", str(other), *tiny_overrides(tiny_prepared, out)])
    assert_one_line_error(result, "checkpoint is for another model")
    assert not out.exists()


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr[-2000:]


# --- security ----------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs a shell command: what a crafted checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_checkpoint_does_not_execute(tmp_path, tiny_prepared):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload(marker)}, evil)
    with open(tmp_path / "control.pkl", "wb") as f:  # the payload is live: plain pickle runs it
        pickle.dump(Payload(tmp_path / "control"), f)
    with open(tmp_path / "control.pkl", "rb") as f:
        pickle.load(f)
    assert (tmp_path / "control").exists()

    with pytest.raises(UserError, match="not a loadable galaxydist checkpoint"):
        checkpoint.load(evil)
    result = run_train(0, ["--resume", str(evil), *tiny_overrides(tiny_prepared, tmp_path / "run")])
    assert_one_line_error(result, "not a loadable galaxydist checkpoint")
    assert not marker.exists()


def test_yaml_config_cannot_construct_objects(tmp_path):
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f'seed: !!python/object/apply:os.system ["touch {marker}"]\n')
    result = run_train(0, ["--config", str(config)])
    assert_one_line_error(result, "not valid YAML")
    assert not marker.exists()


def test_no_secret_reaches_the_run_folder_or_logs(tiny_prepared, tmp_path):
    secret = "secret-sentinel-4b1d"
    out = tmp_path / "run"
    env = {"WANDB_API_KEY": secret, "HF_TOKEN": secret, "GITHUB_TOKEN": secret}
    overrides = tiny_overrides(tiny_prepared, out, **{"tracking.wandb": "offline"})
    result = run_train(2, overrides, extra_env={**env, "WANDB_DIR": str(out), "WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert secret not in result.stdout + result.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.suffix == ".pt" for p in files)
    for path in files:
        assert secret.encode() not in path.read_bytes(), path


def test_resume_position_is_checked_against_the_run(tiny_prepared, tmp_path):
    """A finished 1-epoch run, its last.pt edited to stand mid-stage / mid-epoch."""
    run = tmp_path / "run"
    stages = (
        "[{name: t, lr: 0.003, max_epochs: 1, patience: 5}, {name: f, lr: 0.001, max_epochs: 1, patience: 5}]"
    )
    assert run_train(0, tiny_overrides(tiny_prepared, run, stages=stages)).returncode == 0
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)

    # Stopped after epoch 2 of stage 0, resumed with stage 0 cut to 1 epoch: the stage is over.
    state["position"].update(stage=0, epoch=2, step=0)
    checkpoint.save(state, last)
    resumed = run_train(0, tiny_overrides(tiny_prepared, run, stages=stages), timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "[f 1/1]" in resumed.stdout and "[t " not in resumed.stdout

    # Stopped mid-epoch: the batch count means nothing under another global batch size.
    state["position"].update(stage=0, epoch=0, step=3)
    checkpoint.save(state, last)
    other_batch = run_train(0, tiny_overrides(tiny_prepared, run, stages=stages, **{"data.batch_size": 16}))
    assert_one_line_error(other_batch, "stopped mid-epoch with another seed, data.batch_size or training set")
