"""The run folder and W&B: what a run logs, read back from the files it leaves."""

from __future__ import annotations

import csv
import json
import os
import shutil
import struct
import sys
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import WANDB_SECRET, read_metrics, run_train, tiny_overrides, wandb_env
from PIL import Image

from galaxydist import tracking
from galaxydist.config import load_config
from galaxydist.data.format import read_prepared
from galaxydist.metrics import confusion_matrix
from galaxydist.reports import CONFUSION_PIXELS, CURVES_PIXELS
from galaxydist.tracking import WANDB_ID_FILE, RunFolder, Tracker, resolve_wandb_mode

BLOCK = 32768  # wandb's LevelDB-style log: 32 KiB blocks of checksummed chunks
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list:
    """The `Record` messages of a .wandb file, checksums verified.

    The file starts with a 7-byte header (":W&B", uint16 magic, uint8 version) that counts as part
    of the first block; a chunk is crc32(type + data) uint32, length uint16, type uint8, data. A
    block tail shorter than a chunk header is padding.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, payloads, pending = 7, [], b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:
            pos += room
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if (crc, length, kind) == (0, 0, 0):  # zero padding to the end of the block
            pos += room
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad checksum at byte {pos}"
        pos += 7 + length
        if kind == FULL:
            payloads.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            payloads.append(pending + chunk)
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def unpack(items) -> dict:
    """History items, summary or config updates (key or nested_key + value_json) as a dict."""
    out: dict = {}
    for item in items:
        *parents, last = list(item.nested_key) or [item.key]
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = json.loads(item.value_json)
    return out


def wandb_files(run: Path) -> list[Path]:
    return sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))


def test_offline_wandb_run_logs_what_the_run_folder_holds(trained_run):
    run = trained_run.run
    (log,) = wandb_files(run)  # two ranks, one W&B run
    assert trained_run.output.count("Tracking run with wandb") == 1
    assert not (trained_run.home / "dir").exists()  # nothing went to WANDB_DIR: the run folder has it all
    records = wandb_records(log)

    runs = [r.run for r in records if r.HasField("run")]
    assert len(runs) == 1
    assert runs[0].run_id == (run / WANDB_ID_FILE).read_text().strip()
    assert (runs[0].run_group, list(runs[0].tags)) == ("tests", ["tiny", "ci"])
    config = unpack(runs[0].config.update)
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert {key: config[key] for key in resolved} == resolved

    rows = [unpack(r.history.item) for r in records if r.HasField("history")]
    metrics = read_metrics(run)
    epochs = [row for row in rows if "val_acc" in row]
    assert len(epochs) == len(metrics) == 2
    for row, record in zip(epochs, metrics, strict=True):
        assert {key: row[key] for key in record} == record  # the same keys, the same values
        assert row["val_confusion_table"]["_type"] == "table-file"

    summary = json.loads((run / "summary.json").read_text())
    names = summary["class_names"]
    final = rows[-1]
    files = log.parent / "files"
    table = json.loads((files / final["test_confusion_table"]["path"]).read_text())
    counts = np.zeros((len(names), len(names)), dtype=int)
    for actual, predicted, n in table["data"]:
        counts[names.index(actual), names.index(predicted)] = n
    assert counts.tolist() == summary["test_confusion"]
    per_class = json.loads((files / final["per_class_test"]["path"]).read_text())
    assert per_class["columns"] == ["class", "support", "accuracy", "precision", "recall", "f1"]
    assert [row[2] for row in per_class["data"]] == pytest.approx(summary["per_class_accuracy"])
    for name in ("curves", "confusion_val", "confusion_test"):
        with Image.open(files / final[name]["path"]) as image:
            assert image.size == Image.open(run / f"{name}.png").size

    wb_summary: dict = {}
    for record in records:
        if record.HasField("summary"):
            wb_summary.update(unpack(record.summary.update))
    for key in ("test_accuracy", "test_loss", "val_accuracy", "world_size"):
        assert wb_summary[key] == summary[key]


def test_no_secret_is_written_anywhere(trained_run):
    assert WANDB_SECRET not in trained_run.output
    checked = 0
    for folder, _, names in os.walk(trained_run.run):
        for name in names:
            path = Path(folder, name)
            if not path.is_symlink():
                assert WANDB_SECRET.encode() not in path.read_bytes(), path
                checked += 1
    assert checked > 10  # the wandb files were among them


def test_resumed_run_continues_the_same_wandb_run(trained_run, tiny_prepared, tmp_path):
    """A requeued job finds the run id in the run folder and resumes that W&B run."""
    run = tmp_path / "run"
    shutil.copytree(trained_run.run, run, symlinks=True)
    result = run_train(
        0, tiny_overrides(tiny_prepared, run, **{"tracking.wandb": "offline"}), extra_env=wandb_env(tmp_path)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout
    logs = wandb_files(run)
    assert len(logs) == 2
    starts = [r.run for log in logs for r in wandb_records(log) if r.HasField("run")]
    assert {s.run_id for s in starts} == {(run / WANDB_ID_FILE).read_text().strip()}
    assert all(s.resume for s in starts)  # resume="allow" on both attempts


def tiny_config(data: Path, out: Path, wandb: str):
    return load_config(None, tiny_overrides(data, out, **{"tracking.wandb": wandb}))


def drive(tracker: Tracker, k: int) -> None:
    """Two epochs and the final report, as train.py calls them."""
    rng = np.random.default_rng(0)
    for epoch in range(2):
        record = {
            "stage": "train", "stage_index": 0, "epoch": epoch, "train_loss": 2.0 - epoch, "train_acc": 0.2,
            "val_loss": 2.1, "val_acc": 0.3, "lr": 1e-3, "seconds": 1.0, "images_per_second": 99.0,
        }  # fmt: skip
        tracker.log_epoch(record, rng.integers(0, 9, (k, k)))
    test = rng.integers(0, 9, (k, k))
    tracker.finish({"test_accuracy": 0.5, "test_confusion": test.tolist()}, rng.integers(0, 9, (k, k)), test)


REPORT = ("metrics.jsonl", "summary.json", "per_class.csv", "per_class.md", "per_class_val.csv", "curves.png")


def test_disabled_creates_nothing_and_never_imports_wandb(tiny_prepared, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # an import would fail and warn
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    names = list(read_prepared(tiny_prepared).class_names)
    drive(Tracker(tiny_config(tiny_prepared, run.root, "disabled"), run, names), len(names))
    assert capsys.readouterr().err == ""
    assert not (run.root / "wandb").exists() and not (run.root / WANDB_ID_FILE).exists()
    assert all((run.root / name).exists() for name in (*REPORT, "confusion_test.png"))


def test_curves_are_drawn_after_the_first_epoch_then_at_most_every_interval(tiny_prepared, tmp_path):
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    names = list(read_prepared(tiny_prepared).class_names)
    tracker = Tracker(tiny_config(tiny_prepared, run.root, "disabled"), run, names)
    curves, k = run.root / "curves.png", len(names)
    record = {"stage": "train", "stage_index": 0, "train_loss": 2.0, "train_acc": 0.2, "val_loss": 2.1,
              "val_acc": 0.3, "lr": 1e-3, "seconds": 1.0, "images_per_second": 99.0}  # fmt: skip
    tracker.log_epoch({**record, "epoch": 0}, np.ones((k, k), dtype=int))
    assert curves.exists()
    curves.unlink()
    tracker.log_epoch({**record, "epoch": 1}, np.ones((k, k), dtype=int))  # well within the interval
    assert not curves.exists()
    tracker.curves_drawn_at -= tracking.CURVES_EVERY_S  # as if the interval had passed
    tracker.log_epoch({**record, "epoch": 2}, np.ones((k, k), dtype=int))
    assert curves.exists()


def test_missing_wandb_is_one_warning_and_the_run_folder_is_complete(
    tiny_prepared, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "wandb", None)
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    names = list(read_prepared(tiny_prepared).class_names)
    drive(Tracker(tiny_config(tiny_prepared, run.root, "offline"), run, names), len(names))
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "wandb cannot be imported" in err
    assert all((run.root / name).exists() for name in (*REPORT, "confusion_val.png", "confusion_test.png"))


class FailingRun:
    """Starts like a W&B run, then fails on the first log (a full disk, a dead service)."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs

    def log(self, data: dict) -> None:
        raise RuntimeError(f"cannot log with key {os.environ.get('WANDB_API_KEY')}")


def test_failing_wandb_warns_once_without_the_key_and_training_goes_on(
    tiny_prepared, tmp_path, monkeypatch, capsys
):
    started: list[FailingRun] = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: started.append(FailingRun(**kwargs)) or started[-1]
    fake.plot = types.SimpleNamespace(confusion_matrix=lambda **kwargs: "chart")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_SECRET)
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    cfg = tiny_config(tiny_prepared, run.root, "offline")
    names = list(read_prepared(tiny_prepared).class_names)
    drive(Tracker(cfg, run, names), len(names))
    (init,) = [r.kwargs for r in started]
    assert init["id"] == (run.root / WANDB_ID_FILE).read_text().strip()
    assert (init["resume"], init["mode"], init["dir"]) == ("allow", "offline", str(run.root))
    assert init["config"] == cfg.to_dict()
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "Weights & Biases failed" in err
    assert WANDB_SECRET not in err
    assert len(read_metrics(run.root)) == 2
    assert all((run.root / name).exists() for name in (*REPORT, "confusion_test.png"))


@pytest.fixture
def clean_wandb_auth(tmp_path, monkeypatch):
    """No credentials from this machine; wandb's settings re-read for each case."""
    import wandb

    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_BASE_URL", "https://api.example.test")
    wandb.teardown()
    yield wandb.teardown
    wandb.teardown()


def test_auto_mode_is_online_only_with_credentials(clean_wandb_auth, tmp_path, monkeypatch):
    key = "k" * 40
    assert resolve_wandb_mode("auto") == "offline"
    (tmp_path / "netrc").write_text(f"machine api.example.test\n  login user\n  password {key}\n")
    clean_wandb_auth()
    assert resolve_wandb_mode("auto") == "online"
    (tmp_path / "netrc").write_text(f"machine api.elsewhere.test\n  login user\n  password {key}\n")
    clean_wandb_auth()
    assert resolve_wandb_mode("auto") == "offline"  # a key for another host does not count
    monkeypatch.setenv("WANDB_API_KEY", key)
    clean_wandb_auth()
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")  # a cluster without internet says so
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.delenv("WANDB_MODE")
    with monkeypatch.context() as older:  # a wandb without wbauth: the key in the environment decides
        older.delattr(sys.modules["wandb.sdk.lib"], "wbauth")
        older.setitem(sys.modules, "wandb.sdk.lib.wbauth", None)
        assert resolve_wandb_mode("auto") == "online"
        older.delenv("WANDB_API_KEY")
        assert resolve_wandb_mode("auto") == "offline"
    assert [resolve_wandb_mode(m) for m in ("online", "offline", "disabled")] == [
        "online",
        "offline",
        "disabled",
    ]


def expected_per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Support, recall, precision and F1 straight from the matrix (rows true, columns predicted)."""
    cm = np.asarray(cm, dtype=float)
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(tp), where=total > 0)
    return {"support": support, "accuracy": recall, "precision": precision, "recall": recall, "f1": f1}


def test_per_class_tables_equal_the_numbers_of_the_confusion_matrix(trained_run, tiny_prepared):
    run = trained_run.run
    summary = json.loads((run / "summary.json").read_text())
    cm = np.array(summary["test_confusion"])
    expected = expected_per_class(cm)
    rows = list(csv.DictReader((run / "per_class.csv").open()))
    assert [r["class"] for r in rows] == summary["class_names"]
    for key, values in expected.items():
        np.testing.assert_allclose([float(r[key]) for r in rows], values, atol=1e-6, err_msg=key)
    assert summary["per_class_accuracy"] == pytest.approx(expected["accuracy"].tolist())

    lines = (run / "per_class.md").read_text().splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    body, overall = cells[:-1], cells[-1]
    assert [c[0] for c in body] == summary["class_names"]
    for column, key in enumerate(("support", "accuracy", "precision", "recall", "f1"), start=1):
        shown = [f"{v:.0f}" if key == "support" else f"{v:.3f}" for v in expected[key]]
        assert [c[column] for c in body] == shown, key
    assert overall[1:3] == [str(cm.sum()), f"{np.trace(cm) / cm.sum():.3f}"]

    val_rows = list(csv.DictReader((run / "per_class_val.csv").open()))
    assert sum(int(r["support"]) for r in val_rows) == len(read_prepared(tiny_prepared).splits["val"])


@pytest.mark.parametrize(
    "name,size",
    [
        ("curves.png", CURVES_PIXELS),
        ("confusion_val.png", CONFUSION_PIXELS),
        ("confusion_test.png", CONFUSION_PIXELS),
    ],
)
def test_pngs_are_real_images_of_the_expected_size(trained_run, name, size):
    with Image.open(trained_run.run / name) as image:
        assert (image.format, image.size) == ("PNG", size)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 20  # drawn, not blank


def test_confusion_matrix_counts_every_pair():
    g = torch.Generator().manual_seed(0)
    labels, preds = torch.randint(0, 4, (500,), generator=g), torch.randint(0, 4, (500,), generator=g)
    expected = np.zeros((4, 4), dtype=np.int64)
    np.add.at(expected, (labels.numpy(), preds.numpy()), 1)
    np.testing.assert_array_equal(confusion_matrix(labels, preds, 4).numpy(), expected)
    assert confusion_matrix(torch.tensor([3]), torch.tensor([0]), 4)[3, 0] == 1  # rows are the truth
