"""prepare: centre crop, stratified splits, class weights, layout, and every bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import SHARED_DATA

from galaxydist.data.format import read_prepared
from galaxydist.data.galaxy10 import CLASS_NAMES


def run_prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "galaxydist.prepare", *map(str, args)], capture_output=True, text=True
    )


def test_centre_crop_equals_source_centre(raw_small, tiny_prepared):
    with h5py.File(raw_small) as src, h5py.File(tiny_prepared) as dst:
        np.testing.assert_array_equal(dst["images"][()], src["images"][:, 8:40, 8:40, :])
        np.testing.assert_array_equal(dst["labels"][()], src["ans"][()])
        np.testing.assert_array_equal(dst["ra"][()], src["ra"][()])


def test_layout_is_contiguous_and_unfiltered(tiny_prepared):
    with h5py.File(tiny_prepared) as f:
        assert f["images"].chunks is None and f["images"].compression is None
        assert f["images"].id.get_offset() is not None
        assert f.attrs["crop"] == 32 and f.attrs["source_name"] == "galaxy10_small.h5"
        assert list(f.attrs["class_names"]) == list(CLASS_NAMES)


def test_splits_disjoint_complete_and_stratified(tiny_prepared):
    info = read_prepared(tiny_prepared)
    splits = info.splits
    joined = np.concatenate(list(splits.values()))
    assert len(joined) == len(np.unique(joined)) == info.shape[0]
    totals = np.bincount(info.labels, minlength=10)
    for name, frac in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
        counts = np.bincount(info.labels[splits[name]], minlength=10)
        assert np.all(np.abs(counts - frac * totals) <= 1.0), (name, counts, frac * totals)


def test_class_weights_match_formula(tiny_prepared):
    info = read_prepared(tiny_prepared)
    train_labels = info.labels[info.splits["train"]]
    n_c = np.bincount(train_labels, minlength=10)
    np.testing.assert_allclose(info.class_weights, len(train_labels) / (10 * n_c))
    # Balanced: each class contributes the same total weight.
    np.testing.assert_allclose(info.class_weights * n_c, len(train_labels) / 10)


def test_split_depends_on_seed(raw_small, tmp_path):
    for seed in (0, 1):
        assert run_prepare(raw_small, tmp_path / f"s{seed}.h5", "--crop", 16, "--seed", seed).returncode == 0
    a, b = (read_prepared(tmp_path / f"s{s}.h5").splits["val"] for s in (0, 1))
    assert not np.array_equal(a, b)


def test_normalisation_statistics_are_those_of_the_training_pixels(raw_small, tiny_prepared):
    info = read_prepared(tiny_prepared)
    with h5py.File(raw_small) as src:
        train = src["images"][np.sort(info.splits["train"]), 8:40, 8:40, :].reshape(-1, 3)
    assert info.mean == tuple(train.sum(0, dtype=np.int64) / len(train) / 255.0)  # exact sums
    np.testing.assert_allclose(info.std, (train / 255.0).std(0), rtol=1e-10)


def test_same_file_whatever_the_worker_count(raw_small, tiny_prepared, tmp_path, monkeypatch):
    from galaxydist.data import galaxy10 as prepare_module

    monkeypatch.setattr(prepare_module, "SLAB_BYTES", 48 * 48 * 3 * 50)  # 12 slabs of 50 images
    for workers in (1, 2):
        prepare_module.prepare(str(raw_small), str(tmp_path / f"w{workers}.h5"), crop=32, workers=workers)
    with h5py.File(tiny_prepared) as one_slab:
        for workers in (1, 2):
            with h5py.File(tmp_path / f"w{workers}.h5") as f:
                assert f["images"][()].tobytes() == one_slab["images"][()].tobytes()
                assert f.attrs["mean"].tobytes() == one_slab.attrs["mean"].tobytes()
                assert f.attrs["std"].tobytes() == one_slab.attrs["std"].tobytes()
    assert prepare_module._open_sources == {}  # the source handle read with 1 worker is closed


def test_damaged_chunk_read_by_a_worker_is_one_clear_error(tmp_path, monkeypatch):
    """A corrupt gzip chunk mid-file, decoded in a worker process: a UserError naming the rows
    (one `error:` line from the CLI), no output and no temporary file."""
    from galaxydist.data import galaxy10 as prepare_module
    from galaxydist.errors import UserError

    good = good_arrays(n=60)
    src = tmp_path / "damaged.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("images", data=good["images"], chunks=(1, 16, 16, 3), compression="gzip")
        f.create_dataset("ans", data=(np.arange(60) % 10).astype(np.uint8))
        chunk = f["images"].id.get_chunk_info(45)  # in the fourth slab of 15 images
    with open(src, "r+b") as f:
        f.seek(chunk.byte_offset + 2)
        f.write(b"\xff" * (chunk.size - 4))
    monkeypatch.setattr(prepare_module, "SLAB_BYTES", 16 * 16 * 3 * 15)
    dst = tmp_path / "out" / "dst.h5"
    with pytest.raises(UserError, match=r"damaged\.h5: images from row 45 cannot be read"):
        prepare_module.prepare(str(src), str(dst), crop=8, workers=2)
    assert not dst.parent.exists() or list(dst.parent.iterdir()) == []


@pytest.mark.usefixtures("shared_data")
def test_prepare_real_galaxy10_sample(tmp_path):
    src = SHARED_DATA / "galaxy10-decals-sample" / "Galaxy10_DECals_sample120.h5"
    dst = tmp_path / "sample.h5"
    result = run_prepare(src, dst, "--crop", 128)
    assert result.returncode == 0, result.stderr
    info = read_prepared(dst)
    assert info.shape == (120, 128, 128, 3)
    with h5py.File(src) as f:
        np.testing.assert_array_equal(np.asarray(info_images(dst)[5]), f["images"][5, 64:192, 64:192])
        assert "ra" not in h5py.File(dst)
    assert sum(len(r) for r in info.splits.values()) == 120


def info_images(path):
    with h5py.File(path) as f:
        return f["images"][()]


# --- bad input: one line naming the problem, exit 2, nothing written ------------------------


def write_h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            f.create_dataset(key, data=value)
    return path


def good_arrays(n=40, size=16):
    rng = np.random.default_rng(0)
    return {
        "images": rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8),
        "ans": (np.arange(n) % 10).astype(np.uint8),
    }


def bad_sources(tmp_path):
    good = good_arrays()
    truncated = write_h5(tmp_path / "truncated.h5", **good)
    size = os.path.getsize(truncated)
    with open(truncated, "r+b") as f:
        f.truncate(size // 2)
    (tmp_path / "text.h5").write_text("not hdf5 at all\n")
    few = good_arrays(n=20)
    few["ans"][:] = np.r_[np.zeros(18), np.ones(2)]
    return {
        "missing file": (tmp_path / "nope.h5", "not found"),
        "not HDF5": (tmp_path / "text.h5", "not an HDF5 file"),
        "truncated": (truncated, "truncated"),
        "missing images": (write_h5(tmp_path / "noimg.h5", ans=good["ans"]), "missing dataset 'images'"),
        "missing ans": (write_h5(tmp_path / "noans.h5", images=good["images"]), "missing dataset 'ans'"),
        "wrong ndim": (write_h5(tmp_path / "ndim.h5", images=good["images"][..., 0], ans=good["ans"]), "shape"),
        "wrong dtype": (write_h5(tmp_path / "dt.h5", images=good["images"].astype(np.float32), ans=good["ans"]), "dtype"),
        "wrong channels": (write_h5(tmp_path / "ch.h5", images=good["images"][..., :2], ans=good["ans"]), "(N, H, W, 3)"),
        "negative label": (write_h5(tmp_path / "neg.h5", images=good["images"], ans=good["ans"].astype(np.int64) - 1), "label -1"),
        "label >= K": (write_h5(tmp_path / "big.h5", images=good["images"], ans=good["ans"] + 1), "label 10"),
        "float labels": (write_h5(tmp_path / "fl.h5", images=good["images"], ans=good["ans"].astype(np.float32)), "integer"),
        "length mismatch": (write_h5(tmp_path / "len.h5", images=good["images"], ans=good["ans"][:-1]), "40 images but 39 labels"),
        "class too small": (write_h5(tmp_path / "few.h5", **few), "class 1 (Merging) has 2 images"),
    }  # fmt: skip


BAD_CASES = [
    "missing file", "not HDF5", "truncated", "missing images", "missing ans", "wrong ndim", "wrong dtype",
    "wrong channels", "negative label", "label >= K", "float labels", "length mismatch", "class too small",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_source_is_one_clear_line_exit_2_nothing_written(tmp_path, case):
    src, message = bad_sources(tmp_path)[case]
    dst = tmp_path / "out" / "dst.h5"
    result = run_prepare(src, dst, "--crop", 8)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(src.name) in lines[0], result.stderr
    assert not dst.exists()
    assert not dst.parent.exists() or not any(dst.parent.iterdir())


def test_crop_larger_than_image(tmp_path):
    src = write_h5(tmp_path / "ok.h5", **good_arrays())
    result = run_prepare(src, tmp_path / "dst.h5", "--crop", 17)
    assert result.returncode == 2 and "crop 17 does not fit images of 16×16" in result.stderr
    assert not (tmp_path / "dst.h5").exists()


def test_existing_destination_needs_force(tmp_path):
    src = write_h5(tmp_path / "ok.h5", **good_arrays())
    dst = tmp_path / "dst.h5"
    dst.write_bytes(b"precious")
    result = run_prepare(src, dst, "--crop", 8)
    assert result.returncode == 2 and "already exists" in result.stderr
    assert dst.read_bytes() == b"precious"
    assert run_prepare(src, dst, "--crop", 8, "--force").returncode == 0
    assert read_prepared(dst).shape == (40, 8, 8, 3)


def test_failure_midway_leaves_previous_destination(tmp_path, monkeypatch):
    """A crash while writing leaves no partial file: the old DST survives, no temp file remains."""
    from galaxydist.data import format as prepared_format
    from galaxydist.data.galaxy10 import prepare as prepare_galaxy10

    src = write_h5(tmp_path / "ok.h5", **good_arrays())
    dst = tmp_path / "dst.h5"
    dst.write_bytes(b"old")

    def explode(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(prepared_format, "class_weights", explode)
    with pytest.raises(RuntimeError):
        prepare_galaxy10(str(src), str(dst), crop=8, force=True)
    assert dst.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst.h5", "ok.h5"]


def test_source_is_never_opened_for_writing(raw_small, tmp_path):
    before = (os.path.getmtime(raw_small), raw_small.read_bytes()[:4096])
    os.chmod(raw_small, 0o444)
    try:
        assert run_prepare(raw_small, tmp_path / "p.h5", "--crop", 16).returncode == 0
    finally:
        os.chmod(raw_small, 0o644)
    assert (os.path.getmtime(raw_small), raw_small.read_bytes()[:4096]) == before
