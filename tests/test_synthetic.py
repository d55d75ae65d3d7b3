"""The synthetic Galaxy10 file: real layout and proportions, deterministic, and only shape tells classes apart."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from galaxydist.data.galaxy10 import CLASS_COUNTS, IMAGES_KEY, LABELS_KEY, OPTIONAL_COLUMNS
from galaxydist.errors import run_cli
from galaxydist.synthetic import draw_labels, generate, main, render

N_CLASSES = len(CLASS_COUNTS)


@pytest.fixture(scope="module")
def small_file(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("synthetic") / "g10.h5"
    generate(path, 300, seed=3, size=64, slab=128)
    return path


def test_layout_matches_the_real_file(small_file) -> None:
    with h5py.File(small_file, "r") as f:
        assert set(f) == {IMAGES_KEY, LABELS_KEY, *OPTIONAL_COLUMNS}
        images, ans = f[IMAGES_KEY], f[LABELS_KEY][:]
        assert images.shape == (300, 64, 64, 3) and images.dtype == np.uint8
        assert images.chunks == (1, 64, 64, 3) and images.compression == "gzip"
        assert ans.shape == (300,) and ans.dtype == np.uint8 and ans.max() < N_CLASSES
        for name in OPTIONAL_COLUMNS:
            assert f[name].shape == (300,) and f[name].dtype == np.float64
        assert np.all((f["ra"][:] >= 0) & (f["ra"][:] < 360))
        assert np.all((f["dec"][:] >= -30) & (f["dec"][:] <= 80))
        assert np.all((f["redshift"][:] >= 0.01) & (f["redshift"][:] <= 0.15))
        assert np.all(f["pxscale"][:] == 0.262)
        pixels = images[:]
        assert 10 < pixels.mean() < 120 and pixels.std() > 5  # dark sky with galaxies, not blank


def test_full_size_label_counts_equal_the_real_release() -> None:
    labels = draw_labels(sum(CLASS_COUNTS), np.random.default_rng(0))
    assert tuple(np.bincount(labels, minlength=N_CLASSES)) == CLASS_COUNTS
    assert not np.all(np.diff(labels.astype(int)) >= 0)  # shuffled, not sorted


@pytest.mark.parametrize("n", [1, 7, 300, 601, 5000])
def test_small_n_proportions_within_one_image(n: int) -> None:
    counts = np.bincount(draw_labels(n, np.random.default_rng(n)), minlength=N_CLASSES)
    expected = np.asarray(CLASS_COUNTS) * n / sum(CLASS_COUNTS)
    assert counts.sum() == n
    assert np.all(np.abs(counts - np.round(expected)) <= 1)


def test_deterministic_given_seed_whatever_the_workers(tmp_path) -> None:
    def image_bytes(seed: int, name: str, workers: int = 1) -> tuple[bytes, bytes]:
        generate(tmp_path / name, 40, seed=seed, size=32, slab=4, workers=workers)  # 10 slabs
        with h5py.File(tmp_path / name, "r") as f:
            return f[IMAGES_KEY][:].tobytes(), f[LABELS_KEY][:].tobytes()

    serial = image_bytes(5, "a.h5")
    assert serial == image_bytes(5, "b.h5") == image_bytes(5, "parallel.h5", workers=2)
    assert image_bytes(6, "c.h5")[0] != serial[0]


def _balanced_accuracy_ncm(features: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> float:
    """Nearest-class-mean classifier on standardised features, trained on 70 %, scored on the other 30 %."""
    order = rng.permutation(len(labels))
    train, test = order[: int(0.7 * len(order))], order[int(0.7 * len(order)) :]
    mu, sd = features[train].mean(0), features[train].std(0) + 1e-9
    z = (features - mu) / sd
    means = np.stack([z[train][labels[train] == c].mean(0) for c in range(N_CLASSES)])
    pred = np.argmin(((z[test][:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    recalls = [np.mean(pred[labels[test] == c] == c) for c in np.unique(labels[test])]
    return float(np.mean(recalls))


def _shape_features(images: np.ndarray) -> np.ndarray:
    """Axis ratio, concentration, extent, asymmetry of the sky-subtracted central light: blind to flux and colour."""
    lum = images.astype(np.float64).sum(-1)
    lum = np.clip(lum - np.median(lum, axis=(1, 2), keepdims=True), 0, None)
    size = lum.shape[1]
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    lum = lum * (x**2 + y**2 < (0.35 * size) ** 2)  # the galaxy, not stars near the edges
    w = lum / lum.sum(axis=(1, 2), keepdims=True)
    mx, my = (w * x).sum((1, 2)), (w * y).sum((1, 2))
    dx, dy = x - mx[:, None, None], y - my[:, None, None]
    ixx, iyy, ixy = (w * dx * dx).sum((1, 2)), (w * dy * dy).sum((1, 2)), (w * dx * dy).sum((1, 2))
    root = np.sqrt(((ixx - iyy) / 2) ** 2 + ixy**2)
    lam_max, lam_min = (ixx + iyy) / 2 + root, (ixx + iyy) / 2 - root
    concentration = lum.max(axis=(1, 2)) / lum.sum(axis=(1, 2))
    asymmetry = np.abs(lum - lum[:, ::-1, ::-1]).sum((1, 2)) / lum.sum((1, 2))  # disturbed, merging
    axis_ratio = np.sqrt(np.clip(lam_min, 0, None) / lam_max)
    return np.stack([axis_ratio, np.log(concentration), np.log(lam_max), asymmetry], axis=1)


def test_only_shape_predicts_the_class() -> None:
    rng = np.random.default_rng(11)
    labels = draw_labels(1000, rng)
    images = render(labels, rng, 64)
    nuisance = images.reshape(len(images), -1, 3).mean(1)  # mean colour; their sum is the total flux
    nuisance = np.concatenate([nuisance, nuisance.sum(1, keepdims=True)], axis=1)
    assert _balanced_accuracy_ncm(nuisance, labels, np.random.default_rng(0)) < 0.2
    assert _balanced_accuracy_ncm(_shape_features(images), labels, np.random.default_rng(0)) > 0.25


def test_refuses_existing_output_without_force(tmp_path) -> None:
    out = tmp_path / "g10.h5"
    out.write_bytes(b"precious")
    assert run_cli(main, [str(out), "--n", "4", "--size", "16"]) == 2
    assert out.read_bytes() == b"precious"
    assert run_cli(main, [str(out), "--n", "4", "--size", "16", "--force"]) == 0
    with h5py.File(out, "r") as f:
        assert f[IMAGES_KEY].shape == (4, 16, 16, 3)


@pytest.mark.parametrize("option", [["--n", "0"], ["--n", "-3"], ["--workers", "0"]])
def test_rejects_non_positive_counts(tmp_path, option: list[str], capsys) -> None:
    assert run_cli(main, [str(tmp_path / "g10.h5"), *option]) == 2
    assert f"{option[0]} must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "g10.h5").exists()
