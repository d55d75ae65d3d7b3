"""Catalogue inference (galaxydist.infer): the same files at any world size, resumable after a
kill -9, the training path's pixels and probabilities, embeddings, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, free_port, run_train, tiny_overrides, wait_for
from PIL import Image

from galaxydist.data.dataset import SplitImages
from galaxydist.data.format import read_prepared
from galaxydist.errors import UserError
from galaxydist.inference.batch import read_output
from galaxydist.inference.catalogue import check_kind, open_catalogue
from galaxydist.inference.engine import load_model, predict_proba

ONE_EPOCH = "[{name: t, lr: 0.003, max_epochs: 1, patience: 5}]"


def infer(*args: str, nproc: int = 0, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                    "--master_addr=127.0.0.1", f"--master_port={free_port()}"]  # fmt: skip
    else:
        launcher = [sys.executable]
    cmd = [*launcher, "-m", "galaxydist.infer", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def model_run(tmp_path_factory, tiny_prepared) -> Path:
    run = tmp_path_factory.mktemp("infer") / "run"
    result = run_train(0, tiny_overrides(tiny_prepared, run, stages=ONE_EPOCH))
    assert result.returncode == 0, result.stderr[-2000:]
    return run


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory, raw_small) -> Path:
    """A CSV of 150 PNG cut-outs (the raw 48² images) plus one missing file."""
    root = tmp_path_factory.mktemp("catalogue")
    (root / "img").mkdir()
    with h5py.File(raw_small) as f:
        images = f["images"][:150]
    lines = ["objid,file"]
    for i, image in enumerate(images):
        Image.fromarray(image).save(root / "img" / f"g{i}.png")
        lines.append(f"{5000 + i},img/g{i}.png")
    lines.append("9999,img/missing.png")
    (root / "cat.csv").write_text("\n".join(lines) + "\n")
    return root / "cat.csv"


def test_world_sizes_one_and_three_write_identical_files_in_catalogue_order(model_run, catalogue, tmp_path):
    one, three = tmp_path / "one", tmp_path / "three"
    args = ["--part-size", "40", "--workers", "0", "--embeddings"]
    a = infer(str(model_run), str(catalogue), "--out", str(one), *args)
    b = infer(str(model_run), str(catalogue), "--out", str(three), *args, nproc=3)
    assert a.returncode == 0, a.stderr[-2000:]
    assert b.returncode == 0, b.stderr[-2000:]
    parts = sorted(p.name for p in one.glob("part-*.parquet"))
    assert parts == [f"part-0000{i}.parquet" for i in range(4)]
    for name in parts:
        assert (one / name).read_bytes() == (three / name).read_bytes()
    table = read_output(one)
    assert table.column("id").to_pylist() == [str(5000 + i) for i in range(150)]  # every row once, in order
    assert (one / "_failed.csv").read_text().splitlines() == ["id,row,reason", "9999,150,file not found"]
    again = infer(str(model_run), str(catalogue), "--out", str(one), *args)
    assert again.returncode == 0 and "already complete" in again.stdout


def test_a_kill_9_then_the_same_command_gives_the_undisturbed_output(model_run, catalogue, tmp_path):
    """Killed once a few of its 151 parts are written (long enough that it cannot finish while
    the kill is on its way), then run again: the undisturbed output."""
    rows = [f"{i},img/g{i % 150}.png" for i in range(1500)]
    long = catalogue.parent / "long.csv"
    long.write_text("objid,file\n" + "\n".join(rows) + "\n9999,img/missing.png\n")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    args = ["--part-size", "10", "--workers", "0", "--batch-size", "2"]
    assert infer(str(model_run), str(long), "--out", str(reference), *args).returncode == 0
    cmd = [sys.executable, "-m", "galaxydist.infer", str(model_run), str(long), "--out", str(killed), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: len(list(killed.glob("part-*.parquet"))) >= 3, 120, "a few parts")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list(killed.glob("part-*.parquet")))
    assert 3 <= written < 151  # stopped midway
    resumed = infer(str(model_run), str(long), "--out", str(killed), *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert read_output(killed).equals(read_output(reference))
    assert (killed / "_failed.csv").read_text() == (reference / "_failed.csv").read_text()


def test_a_prepared_split_gets_evaluates_probabilities_and_the_embeddings_of_a_forward_pass(
    model_run, tiny_prepared, tmp_path
):
    out = tmp_path / "out"
    result = infer(
        str(model_run), str(tiny_prepared), "--split", "test", "--out", str(out), "--embeddings", "--tta"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    table = read_output(out)
    model, meta = load_model(model_run, torch.device("cpu"))
    info = read_prepared(tiny_prepared)
    images = SplitImages(info, "test")[:]
    expected = predict_proba(
        model, images, meta.mean, meta.std, tta=True, mirror=meta.mirror_symmetric, description=None
    )
    probs = np.stack([table.column(f"p_{name}").to_numpy() for name in meta.class_names], 1)
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert table.column("row").to_pylist() == list(range(len(images)))
    assert table.column("id").to_pylist() == [str(r) for r in info.splits["test"]]
    features = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    assert features.shape == (len(images), model.feature_width)
    x = (torch.from_numpy(images).float() / 255 - torch.tensor(meta.mean).view(1, 3, 1, 1)) / torch.tensor(
        meta.std
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        direct = model.embed(x.contiguous(memory_format=torch.channels_last)).numpy()
    np.testing.assert_allclose(features, direct, rtol=1e-5, atol=1e-6)


def test_image_files_get_the_pixels_and_probabilities_of_the_training_path(tmp_path, raw_small):
    """A folder prepared with --images, trained on, then classified from the same files: infer
    sees the pixels prepare wrote, so its probabilities equal evaluate's on the prepared file."""
    from galaxydist.prepare import main as prepare_main

    folder = tmp_path / "images"
    folder.mkdir()
    with h5py.File(raw_small) as f:
        images, labels = f["images"][()], f["ans"][()]
    lines = ["id,label"]
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image).save(folder / f"{i}.png")
        lines.append(f"{i},{label}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    prepared = tmp_path / "mine.h5"
    assert (
        prepare_main(
            [
                "--images",
                str(folder),
                "--labels",
                str(tmp_path / "labels.csv"),
                str(prepared),
                "--crop",
                "40",
                "--resize",
                "32",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    run = tmp_path / "run"
    assert (
        run_train(0, tiny_overrides(prepared, run, stages=ONE_EPOCH, **{"data.batch_size": 16})).returncode
        == 0
    )
    out = tmp_path / "out"
    result = infer(str(run), str(folder), "--out", str(out), "--workers", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    table = read_output(out)
    model, meta = load_model(run, torch.device("cpu"))
    info = read_prepared(prepared)
    stored = np.memmap(prepared, dtype=np.uint8, mode="r", offset=info.offset, shape=info.shape)
    ids = [int(i) for i in h5py.File(prepared)["ids"][()].astype(str)]
    expected = predict_proba(
        model, np.array(stored).transpose(0, 3, 1, 2), meta.mean, meta.std, description=None
    )
    by_id = dict(zip(ids, expected, strict=True))
    probs = np.stack([table.column(f"p_{name}").to_numpy() for name in meta.class_names], 1)
    got = dict(zip((int(i) for i in table.column("id").to_pylist()), probs, strict=True))
    assert sorted(got) == sorted(by_id)
    for key, value in got.items():
        np.testing.assert_allclose(value, by_id[key], atol=1e-6)


def test_strict_makes_an_unreadable_input_an_error(model_run, catalogue, tmp_path):
    result = infer(
        str(model_run), str(catalogue), "--out", str(tmp_path / "out"), "--strict", "--workers", "0"
    )
    assert result.returncode == 2
    assert "1 inputs could not be read" in result.stderr


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_column", "no file column"),
        ("duplicate_ids", "id '7' appears more than once"),
        ("no_rows", "no rows to classify"),
        ("other_classes", "trained on other classes"),
        ("other_checkpoint", "written for another checkpoint"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    model_run, catalogue, tmp_path, case, message, tiny_prepared
):
    out = tmp_path / "out"
    target = catalogue
    if case == "missing_column":
        target = tmp_path / "c.csv"
        target.write_text("objid,name\n1,a.png\n")
    elif case == "duplicate_ids":
        target = catalogue.parent / "dup.csv"
        target.write_text("objid,file\n7,img/g0.png\n7,img/g1.png\n")
    elif case == "no_rows":
        target = catalogue.parent / "empty.csv"
        target.write_text("objid,file\n")
    elif case == "other_classes":
        target = tmp_path / "renamed.h5"
        target.write_bytes(tiny_prepared.read_bytes())
        with h5py.File(target, "r+") as f:
            names = [f"c{i}" for i in range(len(f.attrs["class_names"]))]
            f.attrs["class_names"] = np.array(names, dtype=h5py.string_dtype())
    elif case == "other_checkpoint":
        assert infer(str(model_run), str(catalogue), "--out", str(out), "--workers", "0").returncode == 0
        other = tmp_path / "other.pt"
        state = torch.load(model_run / "checkpoints" / "best.pt", weights_only=True)
        state["val_accuracy"] = -1.0  # another file, another digest
        torch.save(state, other)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        result = infer(str(other), str(catalogue), "--out", str(out), "--workers", "0")
        assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, (
            result.stderr
        )
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched
        forced = infer(str(other), str(catalogue), "--out", str(out), "--workers", "0", "--force")
        assert forced.returncode == 0, forced.stderr[-2000:]
        assert json.loads((out / "_manifest.json").read_text())["checkpoint"] == str(other.resolve())
        return
    result = infer(str(model_run), str(target), "--out", str(out), "--workers", "0")
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not out.exists()


def test_an_output_the_file_system_refuses_is_exit_74(model_run, catalogue, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = infer(str(model_run), str(catalogue), "--out", str(blocker / "out"), "--workers", "0")
    assert result.returncode == 74, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1


def test_a_long_catalogue_holds_no_python_object_per_row(tmp_path):
    """200,000 rows opened, checked and digested: ids and paths live in Arrow buffers, so Python's
    own allocations stay far below the ~30 MB that two lists of 200,000 strings take."""
    rows = 200_000
    table = tmp_path / "long.csv"
    table.write_text("id,file\n" + "".join(f"{i:07d},img/g{i:07d}.jpg\n" for i in range(rows)))
    tracemalloc.start()
    try:
        catalogue = open_catalogue(str(table), None, None, None)
        check_kind(catalogue, None)
        catalogue.identity()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(catalogue) == rows
    assert catalogue.id_of(rows - 1) == f"{rows - 1:07d}"  # read as text: leading zeros kept
    assert catalogue.file_of(7) == tmp_path / "img" / "g0000007.jpg"
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MiB of Python allocations for {rows} rows"


def test_parquet_ids_of_any_type_become_text_and_an_empty_cell_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"objid": pa.array([7, 8], pa.int64()), "file": ["a.png", "b.png"]}), good)
    assert open_catalogue(str(good), None, None, None).ids.to_pylist() == ["7", "8"]
    holed = tmp_path / "holed.parquet"
    pq.write_table(pa.table({"objid": ["x", "y"], "file": ["a.png", None]}), holed)
    with pytest.raises(UserError, match=r"holed\.parquet: column 'file' is empty in data row 2"):
        open_catalogue(str(holed), None, None, None)


def test_csv_quirks_keep_the_ids_as_written(tmp_path):
    """Excel's byte-order mark, a repeated column name (the first is taken), a quoted newline."""
    table = tmp_path / "excel.csv"
    table.write_bytes(
        b'\xef\xbb\xbfobjid,file,file\n007,"a\nb.png",x.png\n12345678901234567890123,c.png,y.png\n'
    )
    catalogue = open_catalogue(str(table), None, None, None)
    assert catalogue.ids.to_pylist() == ["007", "12345678901234567890123"]
    assert catalogue.files.to_pylist() == ["a\nb.png", "c.png"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("id,file\n1,a.png\n2,\n", "column 'file' is empty in data row 2"),
        ("id,file\n1,a.png\n1,b.png\n", "id '1' appears more than once"),
    ],
)
def test_bad_catalogue_cells_are_named(tmp_path, content, message):
    table = tmp_path / "cat.csv"
    table.write_text(content)
    with pytest.raises(UserError, match=message):
        open_catalogue(str(table), None, None, None)


def test_float_ids_are_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = tmp_path / "floats.parquet"
    pq.write_table(pa.table({"id": [1.5e11, 2.0], "file": ["a.png", "b.png"]}), table)
    with pytest.raises(
        UserError, match="column 'id' holds double; ids and file names must be text or integers"
    ):
        open_catalogue(str(table), None, None, None)
