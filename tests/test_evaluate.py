"""evaluate and predict: the same numbers as training, the same answers on the same images."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

from galaxydist import evaluate, predict
from galaxydist.data.dataset import SplitImages
from galaxydist.data.format import read_prepared
from galaxydist.data.galaxy10 import prepare
from galaxydist.data.geometry import Geometry, centre_square
from galaxydist.errors import run_cli
from galaxydist.inference.engine import load_model, predict_proba
from galaxydist.models.cnn import GalaxyCNN
from galaxydist.reports import CONFUSION_PIXELS, DPI, gallery_inches, gallery_picks


def test_evaluate_cli_reproduces_the_runs_test_report_and_adds_tta(trained_run, tmp_path):
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "-m", "galaxydist.evaluate", str(trained_run.run), "--tta", "--out", str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    trained = json.loads((trained_run.run / "summary.json").read_text())
    report = json.loads((out / "summary.json").read_text())
    plain, tta = report["plain"], report["tta"]
    assert plain["confusion"] == trained["test_confusion"]
    assert plain["accuracy"] == trained["test_accuracy"]
    assert plain["loss"] == pytest.approx(trained["test_loss"], rel=1e-5)
    assert (out / "per_class.csv").read_text() == (trained_run.run / "per_class.csv").read_text()
    # TTA: its own report, both numbers side by side in the summary, the table and the console.
    assert np.sum(tta["confusion"]) == report["images"] == np.sum(plain["confusion"])
    assert report["tta_gain"] == pytest.approx(tta["accuracy"] - plain["accuracy"])
    assert (
        f"| **overall** | {report['images']} | {plain['accuracy']:.3f} | {tta['accuracy']:.3f} |"
        in (out / "tta.md").read_text()
    )
    assert f"accuracy {plain['accuracy']:.4f}" in result.stdout
    assert f"with TTA {tta['accuracy']:.4f}" in result.stdout
    for name in ("confusion_test.png", "confusion_test_tta.png"):
        with Image.open(out / name) as image:
            assert image.size == CONFUSION_PIXELS
    assert (out / "per_class_tta.csv").exists() and (out / "per_class_tta.md").exists()


def test_gallery_picks_the_most_confident_right_and_wrong_of_each_true_class():
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7], [0.45, 0.55], [0.95, 0.05], [0.1, 0.9]])
    assert gallery_picks(labels, probs, 1) == [([0], [2]), ([6], [5])]
    assert gallery_picks(labels, probs, 3) == [([0, 1], [2, 3]), ([6, 4], [5])]


def test_evaluate_gallery_draws_a_row_per_class(trained_run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert run_cli(evaluate.main, [str(trained_run.run), "--gallery", "3", "--out", str(out)]) == 0
    classes = len(json.loads((trained_run.run / "summary.json").read_text())["class_names"])
    width, height = gallery_inches(classes, 3)
    with Image.open(out / "gallery_test.png") as image:
        assert image.size == (round(width * DPI), round(height * DPI))
    assert (
        run_cli(evaluate.main, [str(trained_run.run), "--gallery", "-1", "--out", str(tmp_path / "x")]) == 2
    )
    assert "--gallery: must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_evaluate_a_checkpoint_file_on_val_writes_beside_its_run(trained_run, tmp_path):
    best = tmp_path / "copy" / "checkpoints" / "best.pt"
    best.parent.mkdir(parents=True)
    shutil.copy(trained_run.run / "checkpoints" / "best.pt", best)
    report = evaluate.evaluate(best, split="val")
    assert report["folder"] == str(tmp_path / "copy" / "eval_val")
    trained = json.loads((trained_run.run / "summary.json").read_text())
    assert report["plain"]["accuracy"] == trained["val_accuracy"]


def test_prior_shift_leans_to_rare_or_common_classes_in_a_report_of_its_own(
    trained_run, tiny_prepared, tmp_path
):
    best = tmp_path / "copy" / "checkpoints" / "best.pt"
    best.parent.mkdir(parents=True)
    shutil.copy(trained_run.run / "checkpoints" / "best.pt", best)
    weights = read_prepared(tiny_prepared).class_weights  # ∝ 1 / training frequency
    rare = int(weights.argmax())
    rarest, commonest = {rare}, set(np.flatnonzero(weights == weights.min()).tolist())
    plain = evaluate.evaluate(best)
    plain_predicted = set(np.asarray(plain["plain"]["confusion"]).sum(0).nonzero()[0].tolist())
    assert plain_predicted - rarest - commonest  # unshifted, it predicts other classes too
    for delta, only in ((1e4, rarest), (-1e4, commonest)):  # weight**1e4 alone would overflow
        report = evaluate.evaluate(best, prior_shift=delta)
        folder = tmp_path / "copy" / f"eval_test_shift{delta:+g}"
        assert (
            report["folder"] == str(folder)
            and json.loads((folder / "summary.json").read_text())["prior_shift"] == delta
        )
        predicted = np.asarray(report["plain"]["confusion"]).sum(0)
        assert set(predicted.nonzero()[0].tolist()) <= only and predicted.sum() == report["images"]
    assert (
        json.loads((tmp_path / "copy" / "eval_test" / "summary.json").read_text())["plain"] == plain["plain"]
    )
    mild = evaluate.evaluate(best, prior_shift=0.5)["plain"]["per_class_accuracy"]
    assert mild[rare] >= plain["plain"]["per_class_accuracy"][rare]


def test_evaluate_without_matplotlib_writes_the_numbers_and_warns_once(trained_run, tmp_path):
    """matplotlib missing or broken (a minimal GPU image): the report is complete but for the PNGs,
    one warning says so, and the command succeeds. It used to fail after all the work was done."""
    out = tmp_path / "eval"
    script = (
        "import sys; sys.modules['matplotlib'] = None\n"  # any import of it now fails
        "from galaxydist.evaluate import cli; cli()"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(trained_run.run), "--tta", "--out", str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (warning,) = result.stderr.strip().splitlines()
    assert warning.startswith("warning: drawing the confusion PNG failed (ModuleNotFoundError")
    trained = json.loads((trained_run.run / "summary.json").read_text())
    assert json.loads((out / "summary.json").read_text())["plain"]["confusion"] == trained["test_confusion"]
    written = sorted(p.name for p in out.iterdir())
    assert written == [
        "per_class.csv", "per_class.md", "per_class_tta.csv", "per_class_tta.md", "summary.json", "tta.md",
    ]  # fmt: skip


def test_tta_is_invariant_under_the_symmetries_of_the_square(trained_run, tiny_prepared):
    model, meta = load_model(trained_run.run)
    images = SplitImages(read_prepared(tiny_prepared), "test")[0:16]
    tta = predict_proba(model, images, meta.mean, meta.std, tta=True, description=None)
    for variant in (
        np.rot90(images, 1, axes=(2, 3)),
        images[..., ::-1],
        np.rot90(images[..., ::-1], 3, axes=(2, 3)),
    ):
        moved = predict_proba(
            model, np.ascontiguousarray(variant), meta.mean, meta.std, tta=True, description=None
        )
        np.testing.assert_allclose(moved, tta, atol=1e-5)
    plain = predict_proba(model, images, meta.mean, meta.std, description=None)
    assert not np.allclose(plain, tta, atol=1e-4)  # the views really differ
    np.testing.assert_allclose(tta.sum(1), 1.0, rtol=1e-5)


def test_predict_agrees_with_evaluate_on_png_files_and_the_raw_h5(
    trained_run, tiny_prepared, raw_small, tmp_path, capsys
):
    """Test images as PNGs at the training size and at the raw 48×48 (centre-cropped like prepare),
    and the raw Galaxy10-format file itself: the probabilities evaluate computes."""
    info = read_prepared(tiny_prepared)
    n = 12
    model, meta = load_model(trained_run.run)
    images = SplitImages(info, "test")[0:n]
    expected = predict_proba(model, images, meta.mean, meta.std, description=None)
    rows = info.splits["test"][:n]
    with h5py.File(raw_small) as f:
        raw = f["images"][np.sort(rows)]
        raw_count = len(f["images"])
    pngs = []
    for i in range(n):
        for kind, pixels in (("train", images[i].transpose(1, 2, 0)), ("raw", raw[i])):
            pngs.append(tmp_path / f"{kind}_{i:02d}.png")
            Image.fromarray(pixels).save(pngs[-1])
    out = tmp_path / "preds.csv"
    best = trained_run.run / "checkpoints" / "best.pt"
    inputs = [*map(str, pngs), str(raw_small), str(pngs[0])]
    assert run_cli(predict.main, [str(best), *inputs, "--out", str(out)]) == 0
    table = list(csv.DictReader(out.open()))
    assert len(table) == 2 * n + raw_count + 1
    # Input order is kept, an image file after an .h5 too (probabilities to float rounding: the
    # image shares its batch with other images the first time, not the second).
    labels_of = lambda row: {k: v for k, v in row.items() if not k.startswith("p_")}  # noqa: E731
    assert labels_of(table[-1]) == labels_of(table[0])
    p_keys = [k for k in table[0] if k.startswith("p_")]
    np.testing.assert_allclose(
        [float(table[-1][k]) for k in p_keys], [float(table[0][k]) for k in p_keys], atol=2e-6
    )
    probs = np.array([[float(r[f"p_{name}"]) for name in info.class_names] for r in table])
    np.testing.assert_allclose(probs[0 : 2 * n : 2], expected, atol=2e-6)  # PNGs at the training size
    np.testing.assert_allclose(probs[1 : 2 * n : 2], expected, atol=2e-6)  # raw PNGs, centre-cropped
    np.testing.assert_allclose(probs[2 * n : -1][rows], expected, atol=2e-6)  # rows of the raw .h5
    assert [int(r["predicted"]) for r in table[: 2 * n : 2]] == expected.argmax(1).tolist()
    assert all(r["class_name"] == info.class_names[int(r["predicted"])] for r in table)
    assert [(r["file"], r["index"]) for r in table[2 * n : 2 * n + 2]] == [
        (str(raw_small), "0"),
        (str(raw_small), "1"),
    ]
    printed = capsys.readouterr().out
    assert f"wrote {len(table)} predictions" in printed and printed.count("p=") == predict.PRINTED_ROWS


def test_geometry_cuts_the_training_square_or_the_largest_one():
    images = np.random.default_rng(0).integers(0, 256, (2, 48, 40, 3), dtype=np.uint8)
    as_trained = Geometry(size=32, crop=32, fit="crop").apply(images)
    assert np.array_equal(as_trained, images[:, 8:40, 4:36].transpose(0, 3, 1, 2))
    small = images[:, :20, :30]  # smaller than the crop: its largest central square, resized up
    assert np.array_equal(
        Geometry(32, 32, "crop").apply(small), centre_square(small[:, :, 5:25], 20, 32).transpose(0, 3, 1, 2)
    )
    resized = Geometry(16, 32, "resize").apply(images)  # `--fit resize`: the largest square, resized
    assert np.array_equal(resized, centre_square(images[:, 4:44], 40, 16).transpose(0, 3, 1, 2))
    # `prepare --crop 32 --resize 16` and a checkpoint trained on it cut the same pixels.
    assert np.array_equal(
        Geometry(16, 32, "crop").apply(images), centre_square(images, 32, 16).transpose(0, 3, 1, 2)
    )


def test_bad_inputs_exit_2_with_one_line(trained_run, tiny_prepared, raw_small, tmp_path, capsys):
    best = trained_run.run / "checkpoints" / "best.pt"
    state = torch.load(best, weights_only=True)
    five = tmp_path / "five.pt"
    channels = state["config"]["model"]["channels"]
    torch.save(
        {**state, "class_names": state["class_names"][:5], "model": GalaxyCNN(channels, 5).state_dict()}, five
    )
    hollow = tmp_path / "hollow.pt"
    torch.save({"model": state["model"]}, hollow)
    small = tmp_path / "small.h5"
    prepare(str(raw_small), str(small), crop=24)
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    no_images = tmp_path / "labels_only.h5"
    with h5py.File(no_images, "w") as f:
        f["ans"] = np.zeros(3, dtype=np.int64)
    cases = [
        (evaluate.main, [str(tmp_path / "missing")], "checkpoint not found"),
        (evaluate.main, [str(notes)], "not a loadable galaxydist checkpoint"),
        (evaluate.main, [str(hollow)], "not a galaxydist model checkpoint"),
        (evaluate.main, [str(five), "--data", str(tiny_prepared)], "a 5-class model, but"),
        (evaluate.main, [str(best), "--data", str(small)], "trained on 32×32 images"),
        (evaluate.main, [str(best), "--data", str(tmp_path / "nope.h5")], "not found"),
        (evaluate.main, [str(best), "--prior-shift", "nan"], "--prior-shift: must be a finite number"),
        (predict.main, [str(tmp_path / "missing.pt"), str(notes)], "checkpoint not found"),
        (predict.main, [str(best), str(notes)], "not an image Pillow can read"),
        (predict.main, [str(best), str(tmp_path / "nope.png")], "input not found"),
        (predict.main, [str(best), str(no_images)], "no 'images' dataset"),
    ]
    for main, argv, message in cases:
        assert run_cli(main, argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
    cli = subprocess.run(
        [sys.executable, "-m", "galaxydist.predict", str(tmp_path / "missing.pt"), str(notes)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert cli.returncode == 2 and cli.stderr.startswith("error: ") and cli.stderr.count("\n") == 1


def test_tta_keeps_handedness_when_training_kept_it():
    """Chiral classes (clockwise vs anticlockwise spirals) train without flips: TTA must not mirror."""
    from galaxydist.inference.engine import symmetries

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    rotations = list(symmetries(x, mirror=False))
    all_views = list(symmetries(x))
    assert len(rotations) == 4 and len(all_views) == 8
    mirrored = x.flip(3)
    assert not any(torch.equal(v, mirrored) for v in rotations)
    assert any(torch.equal(v, mirrored) for v in all_views)


def test_evaluate_and_predict_skip_mirrors_for_a_model_trained_without_flips(tiny_prepared, tmp_path):
    """Through the commands: a model trained with flips off gets TTA over the 4 rotations only
    (what a clockwise/anticlockwise classifier needs), not the 8 symmetries."""
    from conftest import run_train, tiny_overrides

    run = tmp_path / "chiral"
    stages = "[{name: t, lr: 0.003, max_epochs: 1, patience: 5}]"
    flips_off = {"augment.hflip": 0.0, "augment.vflip": 0.0, "stages": stages}
    assert run_train(0, tiny_overrides(tiny_prepared, run, **flips_off)).returncode == 0
    model, meta = load_model(run, torch.device("cpu"))
    info = read_prepared(tiny_prepared)
    images = SplitImages(info, "test")[:]
    rotations = predict_proba(model, images, meta.mean, meta.std, tta=True, mirror=False, description=None)
    everything = predict_proba(model, images, meta.mean, meta.std, tta=True, mirror=True, description=None)
    assert np.abs(rotations - everything).max() > 1e-4  # mirrors would change the numbers

    out = tmp_path / "preds.csv"
    result = subprocess.run(
        [sys.executable, "-m", "galaxydist.predict", str(run), str(tiny_prepared), "--tta", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    probs = np.array([[float(r[f"p_{name}"]) for name in meta.class_names] for r in rows])
    all_images = np.asarray(h5py.File(tiny_prepared)["images"]).transpose(0, 3, 1, 2)
    expected = predict_proba(model, all_images, meta.mean, meta.std, tta=True, mirror=False, description=None)
    np.testing.assert_allclose(probs, expected, atol=2e-6)

    report = evaluate.evaluate(run, "test", tta=True, out=str(tmp_path / "eval"))
    labels = info.labels[info.splits["test"]]
    assert (
        report["tta"]["confusion"]
        == np.bincount(labels * info.num_classes + rotations.argmax(1), minlength=info.num_classes**2)
        .reshape(info.num_classes, -1)
        .tolist()
    )
