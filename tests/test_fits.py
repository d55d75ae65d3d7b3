"""FITS cutouts through prepare --images, training and infer: the recorded stretch repeated, the
file layouts (cube, one HDU per band, NaNs, non-square, .fits.gz), and every bad input.

The cutouts hold real pixels: GZ1 SDSS JPEGs (../shared/data) turned back into fluxes by the
linear map flux = pixel / 255, with the g, r, z planes from the JPEG's B, G, R channels."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from astropy.io import fits
from conftest import ROOT, SHARED_DATA, require, run_train, tiny_overrides
from PIL import Image

from galaxydist.checkpoint import read_model
from galaxydist.data.fits import BadCutout, FitsStretch, read_bands, read_rgb
from galaxydist.data.format import read_prepared
from galaxydist.data.geometry import Geometry, centre_square
from galaxydist.errors import run_cli
from galaxydist.inference.batch import read_output
from galaxydist.inference.catalogue import Rows, open_catalogue
from galaxydist.inference.engine import load_model, predict_proba
from galaxydist.predict import main as predict_main
from galaxydist.prepare import main as prepare_main

GZ1 = SHARED_DATA / "gz1-sdss"
CLASSES = (0, 3, 5)  # Elliptical, Edge-on, Merger
PER_CLASS = 14
SIDE = 96  # the central square of each 423² JPEG kept in its cutout
CROP, SIZE = 64, 32
ONE_EPOCH = "[{name: t, lr: 0.003, max_epochs: 1, patience: 5}]"


def fluxes(jpeg: Path, height: int = SIDE, width: int = SIDE) -> np.ndarray:
    """A JPEG's central height×width as float32 fluxes, 3×H×W: g, r, z = B, G, R / 255."""
    with Image.open(jpeg) as image:
        pixels = np.asarray(image.convert("RGB"))
    top, left = (pixels.shape[0] - height) // 2, (pixels.shape[1] - width) // 2
    crop = pixels[top : top + height, left : left + width]
    return np.ascontiguousarray(crop[..., ::-1].transpose(2, 0, 1), dtype=np.float32) / 255


def write_cutout(path: Path, cube: np.ndarray, layout: str = "cube") -> Path:
    """One (bands, H, W) primary HDU, or ("mef") an empty primary and one image HDU per band."""
    if layout == "cube":
        hdus = fits.HDUList([fits.PrimaryHDU(cube)])
    else:
        planes = [fits.ImageHDU(plane, name=band) for plane, band in zip(cube, "GRZ", strict=False)]
        hdus = fits.HDUList([fits.PrimaryHDU(), *planes])
    hdus.writeto(path, overwrite=True)
    return path


@dataclass(frozen=True)
class FitsSet:
    folder: Path
    labels: Path  # objid,label of every cutout
    files: dict[str, Path]  # id → cutout
    labels_of: dict[str, int]
    special: dict[str, str]  # nan / mef / wide / gz / fit → the id written that way


@pytest.fixture(scope="module")
def fits_set(tmp_path_factory) -> FitsSet:
    """42 real cutouts of 3 classes: most a g/r/z cube, every 4th one HDU per band, one with NaNs,
    one non-square (96×120), one .fits.gz, one .fit."""
    require(SHARED_DATA.exists(), "../shared/data is not present")
    with open(GZ1 / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    rng = np.random.default_rng(0)
    chosen = []
    for label in CLASSES:
        of_class = [r for r in rows if int(r["label"]) == label]
        chosen += [of_class[i] for i in rng.choice(len(of_class), PER_CLASS, replace=False)]
    folder = tmp_path_factory.mktemp("fits") / "cutouts"
    folder.mkdir()
    special = {"nan": chosen[1]["objid"], "wide": chosen[2]["objid"], "gz": chosen[5]["objid"]}
    special["fit"] = chosen[6]["objid"]
    files, labels_of = {}, {}
    for i, row in enumerate(chosen):
        key = row["objid"]
        cube = fluxes(GZ1 / "images" / f"{key}.jpeg", SIDE, 120 if key == special["wide"] else SIDE)
        if key == special["nan"]:
            cube[:, 40:50, 40:50] = np.nan  # masked in every band: the centre, kept by the crop
            cube[0, 60, 30:70] = np.nan  # and in g alone
        suffix = {special["gz"]: ".fits.gz", special["fit"]: ".fit"}.get(key, ".fits")
        layout = "mef" if i % 4 == 0 else "cube"
        if layout == "mef":
            special.setdefault("mef", key)
        files[key] = write_cutout(folder / f"{key}{suffix}", cube, layout)
        labels_of[key] = int(row["label"])
    labels = folder.parent / "labels.csv"
    labels.write_text("objid,label\n" + "".join(f"{k},{v}\n" for k, v in labels_of.items()))
    return FitsSet(folder, labels, files, labels_of, special)


def prepare_cli(capsys, *args: object) -> tuple[int, str, str]:
    code = run_cli(prepare_main, [str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def prepare_fits(src: FitsSet, dst: Path, *extra: object) -> None:
    args = ["--images", src.folder, "--labels", src.labels, dst, "--crop", CROP, "--resize", SIZE]
    assert run_cli(prepare_main, [str(a) for a in [*args, "--workers", 1, *extra]]) == 0


def infer(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "galaxydist.infer", *map(str, args), "--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def catalogue_of(path: Path, files: dict[str, Path]) -> Path:
    path.write_text(
        "objid,file\n" + "".join(f"{k},{os.path.relpath(f, path.parent)}\n" for k, f in files.items())
    )
    return path


@dataclass(frozen=True)
class Trained:
    prepared: Path
    run: Path


@pytest.fixture(scope="module")
def trained(fits_set, tmp_path_factory) -> Trained:
    """The cutouts prepared with the default stretch (64² centre → 32²), a tiny model trained on them."""
    root = tmp_path_factory.mktemp("fits_run")
    prepared = root / "cutouts.h5"
    prepare_fits(fits_set, prepared)
    result = run_train(0, tiny_overrides(prepared, root / "run", stages=ONE_EPOCH, **{"data.batch_size": 16}))
    assert result.returncode == 0, result.stderr[-2000:]
    return Trained(prepared, root / "run")


def stored(prepared: Path) -> dict[str, np.ndarray]:
    """The prepared pixels by id, H×W×3."""
    with h5py.File(prepared) as f:
        return dict(zip(f["ids"][()].astype(str), f["images"][()], strict=True))


def probabilities(out: Path, class_names: tuple[str, ...]) -> dict[str, np.ndarray]:
    table = read_output(out)
    probs = np.stack([table.column(f"p_{name}").to_numpy() for name in class_names], 1)
    return dict(zip(table.column("id").to_pylist(), probs, strict=True))


def expected_probabilities(run: Path, pixels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The training path's probabilities (evaluate's `predict_proba`) on prepared pixels."""
    model, meta = load_model(run, torch.device("cpu"))
    images = np.stack(list(pixels.values())).transpose(0, 3, 1, 2)
    return dict(zip(pixels, predict_proba(model, images, meta.mean, meta.std, description=None), strict=True))


# --- (1) prepare + train + infer: the training path's pixels and probabilities ---------------


def test_fits_through_prepare_train_and_infer_gives_the_training_paths_probabilities(
    fits_set, trained, tmp_path
):
    catalogue = catalogue_of(tmp_path / "cat.csv", fits_set.files)
    out = tmp_path / "out"
    result = infer(trained.run, catalogue, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "_failed.csv").read_text() == "id,row,reason\n"
    pixels = stored(trained.prepared)
    meta, _ = read_model(trained.run)
    got, expected = probabilities(out, meta.class_names), expected_probabilities(trained.run, pixels)
    assert sorted(got) == sorted(expected) == sorted(fits_set.files)
    for key, value in got.items():
        np.testing.assert_allclose(value, expected[key], atol=1e-6)
    # The same pixels reach the model: infer's rows, through the checkpoint's geometry and stretch.
    rows = Rows(open_catalogue(str(catalogue), None, None, None), Geometry(SIZE, CROP, "crop", meta.fits))
    for i, key in enumerate(fits_set.files):
        np.testing.assert_array_equal(rows[i][1].numpy(), pixels[key].transpose(2, 0, 1))
    # predict reads them through the same stretch.
    some = [fits_set.special[k] for k in ("mef", "nan", "wide", "gz")]
    preds = tmp_path / "preds.csv"
    assert (
        run_cli(
            predict_main, [str(trained.run), *(str(fits_set.files[k]) for k in some), "--out", str(preds)]
        )
        == 0
    )
    with open(preds) as f:
        for key, row in zip(some, csv.DictReader(f), strict=True):
            predicted = [float(row[f"p_{name}"]) for name in meta.class_names]
            np.testing.assert_allclose(predicted, expected[key], atol=1e-6)


# --- (2) the stretch is recorded, carried into the checkpoint, and repeated by infer ----------


def test_the_stretch_is_recorded_in_the_prepared_file_and_checkpoint_and_infer_repeats_it(
    fits_set, trained, tmp_path
):
    with h5py.File(trained.prepared) as f:
        attrs = {k: f.attrs[k] for k in f.attrs if k.startswith("fits_")}
    assert attrs["fits_stretch"] == "lupton" and attrs["fits_bands"] == "auto"
    assert (attrs["fits_q"], attrs["fits_stretch_param"], list(attrs["fits_scales"])) == (8.0, 0.5, [1.0] * 3)
    assert read_prepared(trained.prepared).fits == FitsStretch()
    state = torch.load(trained.run / "checkpoints" / "best.pt", weights_only=True)
    assert state["fits"] == FitsStretch().to_dict()
    assert read_model(trained.run)[0].fits == FitsStretch()

    other = FitsStretch(stretch="asinh", scales=(1.0, 1.2, 1.5), q=3.0, stretch_param=0.2)
    prepared = tmp_path / "asinh.h5"
    prepare_fits(fits_set, prepared, "--fits-stretch", "asinh", "--fits-scales", "1,1.2,1.5", "--fits-q", "3",
                 "--fits-stretch-param", "0.2")  # fmt: skip
    assert read_prepared(prepared).fits == other
    before, after = stored(trained.prepared), stored(prepared)
    assert all(not np.array_equal(before[k], after[k]) for k in before)  # another stretch, other pixels

    # The same weights with the other stretch recorded: infer applies that one.
    state["fits"] = other.to_dict()
    checkpoint = tmp_path / "asinh.pt"
    torch.save(state, checkpoint)
    out = tmp_path / "out"
    result = infer(checkpoint, catalogue_of(tmp_path / "cat.csv", fits_set.files), "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    got, expected = probabilities(out, tuple(state["class_names"])), expected_probabilities(checkpoint, after)
    for key, value in got.items():
        np.testing.assert_allclose(value, expected[key], atol=1e-6)
    first = expected_probabilities(checkpoint, before)
    assert any(not np.allclose(got[k], first[k], atol=1e-4) for k in got)


# --- (3) the layouts: NaNs, one HDU per band, extra HDUs, non-square ----------------------------


def test_every_prepared_row_is_its_cutouts_stretch_centre_square(fits_set, trained):
    """NaN, multi-extension, non-square, .fits.gz and .fit cutouts alike: the stretch, then the
    JPEG path's central square and resize."""
    pixels = stored(trained.prepared)
    for key, path in fits_set.files.items():
        expected = centre_square(read_rgb(path, FitsStretch())[None], CROP, SIZE)[0]
        np.testing.assert_array_equal(pixels[key], expected, err_msg=path.name)
    wide = read_rgb(fits_set.files[fits_set.special["wide"]], FitsStretch())
    assert wide.shape == (SIDE, 120, 3)


def test_nans_are_the_sky_one_hdu_per_band_is_a_cube_and_bands_pick_planes(fits_set, tmp_path):
    nan_file = fits_set.files[fits_set.special["nan"]]
    cube = fits.getdata(nan_file)
    masked = ~np.isfinite(cube)
    assert masked.any()
    zeroed = write_cutout(tmp_path / "zeroed.fits", np.where(masked, 0, cube))
    for stretch in ("lupton", "asinh"):
        settings = FitsStretch(stretch=stretch)
        got = read_rgb(nan_file, settings)
        np.testing.assert_array_equal(got, read_rgb(zeroed, settings))
        assert np.all(got[40:50, 40:50] == 0) and got[:40].any()  # masked in every band: black

    mef = fits_set.files[fits_set.special["mef"]]
    with fits.open(mef) as hdus:
        assert hdus[0].data is None and [h.name for h in hdus[1:]] == ["G", "R", "Z"]
        planes = np.stack([h.data for h in hdus[1:]])
    as_cube = write_cutout(tmp_path / "cube.fits", planes)
    np.testing.assert_array_equal(read_rgb(mef, FitsStretch()), read_rgb(as_cube, FitsStretch()))

    # A Legacy Surveys cutout with its inverse variances after it: the first cube by default,
    # the others by plane number; the reddest listed band is R.
    invvar = planes[::-1] * 3
    both = tmp_path / "with_invvar.fits"
    fits.HDUList([fits.PrimaryHDU(planes), fits.ImageHDU(invvar)]).writeto(both)
    np.testing.assert_array_equal(read_rgb(both, FitsStretch()), read_rgb(as_cube, FitsStretch()))
    picked = read_rgb(both, FitsStretch(bands=(3, 4, 5)))
    np.testing.assert_array_equal(picked, read_rgb(write_cutout(tmp_path / "iv.fits", invvar), FitsStretch()))
    swapped = read_rgb(as_cube, FitsStretch(bands=(2, 1, 0)))
    np.testing.assert_array_equal(swapped, read_rgb(as_cube, FitsStretch())[..., ::-1])


@pytest.mark.parametrize(
    "content, message",
    [
        ("all_nan", "no finite pixels"),
        ("table_only", "no image data in any HDU"),
        ("two_bands", "has 2 band planes, not 3"),
        ("four_bands", "has 4 band planes, not 3"),
        ("sizes_differ", "its bands differ in size (96×96 and 96×96 and 48×48)"),
        ("truncated", "not a readable FITS file"),
        ("not_fits", "not a readable FITS file"),
    ],
)
def test_unusable_cutouts_say_why(fits_set, tmp_path, content, message):
    cube = read_bands(next(iter(fits_set.files.values())), None)
    path = tmp_path / "bad.fits"
    if content == "all_nan":
        write_cutout(path, np.full_like(cube, np.nan))
    elif content == "table_only":
        table = fits.BinTableHDU.from_columns([fits.Column(name="flux", format="E", array=np.ones(3))])
        fits.HDUList([fits.PrimaryHDU(), table]).writeto(path)
    elif content in ("two_bands", "four_bands"):
        write_cutout(path, cube[:2] if content == "two_bands" else np.concatenate([cube, cube[:1]]))
    elif content == "sizes_differ":
        write_cutout(path, cube, "mef")
        with fits.open(path, mode="update") as hdus:
            hdus[3].data = cube[2, ::2, ::2]
    else:
        write_cutout(path, cube)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if content == "truncated" else b"GIF89a" + data[6:])
    with pytest.raises(BadCutout, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_rgb(path, FitsStretch())


# --- (4) a corrupt cutout: prepare's bad-image report, infer's _failed.csv and --strict --------


def small_copy(src: FitsSet, root: Path, per_class: int = 4) -> tuple[Path, Path, list[str]]:
    """`per_class` cutouts of each class copied to `root` (the shared set stays intact)."""
    folder = root / "cutouts"
    folder.mkdir()
    keys = [k for c in CLASSES for k in [k for k, v in src.labels_of.items() if v == c][:per_class]]
    for key in keys:
        (folder / src.files[key].name).write_bytes(src.files[key].read_bytes())
    labels = root / "labels.csv"
    labels.write_text("objid,label\n" + "".join(f"{k},{src.labels_of[k]}\n" for k in keys))
    return folder, labels, keys


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_corrupt_cutout_is_a_bad_image_for_prepare(fits_set, tmp_path, capsys):
    folder, labels, keys = small_copy(fits_set, tmp_path)
    truncate(folder / fits_set.files[keys[5]].name)
    dst = tmp_path / "out" / "dst.h5"
    code, _, err = prepare_cli(capsys, "--images", folder, "--labels", labels, dst, "--crop", CROP)
    assert code == 2 and err.count("\n") == 1, err
    assert (
        f"1 of 12 images cannot be used: {keys[5]} (not a readable FITS file" in err and "--skip-bad" in err
    )
    assert not dst.parent.exists()
    dst.parent.mkdir()
    code, out, err = prepare_cli(
        capsys, "--images", folder, "--labels", labels, dst, "--crop", CROP, "--skip-bad"
    )
    assert code == 0, err
    assert f"skipped 1 of 12 images: {keys[5]} (not a readable FITS file" in out
    assert keys[5] not in stored(dst) and len(stored(dst)) == 11


def test_infer_lists_unusable_cutouts_and_strict_names_the_first(fits_set, trained, tmp_path):
    """A truncated cutout and one of 2 bands fail with their reasons; one smaller than the crop
    is classified from its largest central square, as a small JPEG is."""
    good = dict(list(fits_set.files.items())[:2])
    corrupt = tmp_path / "corrupt.fits"
    corrupt.write_bytes(next(iter(good.values())).read_bytes())
    truncate(corrupt)
    cube = read_bands(next(iter(good.values())), None)
    two_bands = write_cutout(tmp_path / "two.fits", cube[:2])
    small = write_cutout(tmp_path / "small.fits", cube[:, :40, :40])
    files = {"corrupt": corrupt, **good, "two": two_bands, "small": small}
    catalogue = catalogue_of(tmp_path / "cat.csv", files)
    out = tmp_path / "out"
    result = infer(trained.run, catalogue, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(out / "_failed.csv") as f:
        failed = list(csv.DictReader(f))
    assert [(r["id"], r["row"]) for r in failed] == [("corrupt", "0"), ("two", "3")]
    assert failed[0]["reason"].startswith("not a readable FITS file")
    assert failed[1]["reason"].startswith("has 2 band planes, not 3")
    meta, _ = read_model(trained.run)
    got = probabilities(out, meta.class_names)
    assert sorted(got) == sorted([*good, "small"])
    square = centre_square(read_rgb(small, meta.fits)[None], 40, SIZE)[0]
    np.testing.assert_allclose(
        got["small"], expected_probabilities(trained.run, {"small": square})["small"], atol=1e-6
    )

    strict = infer(trained.run, catalogue, "--out", tmp_path / "strict", "--strict")
    lines = strict.stderr.strip().splitlines()
    assert strict.returncode == 2 and len(lines) == 1, strict.stderr
    assert (
        f"{corrupt.resolve()}: not a readable FITS file" in lines[0]
        and "2 inputs could not be read" in lines[0]
    )


# --- (5) bad options and mismatched inputs: one line, exit 2, nothing written -------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--fits-bands", "0,1"], "--fits-bands 0,1: give three plane numbers"),
        (["--fits-bands", "g,r,z"], "--fits-bands g,r,z: give three plane numbers"),
        (["--fits-bands", "0,1,-2"], "--fits-bands 0,1,-2: give three plane numbers (0 = the first)"),
        (["--fits-scales", "1,0,1"], "--fits-scales 1,0,1: give three positive numbers"),
        (["--fits-scales", "1,2"], "--fits-scales 1,2: give three numbers"),
        (["--fits-q", "0"], "--fits-q 0: must be in (0, 1000]"),
        (["--fits-q", "eight"], "--fits-q eight: not a number"),
        (["--fits-stretch-param", "nan"], "--fits-stretch-param nan: must be a positive number"),
        (["--fits-stretch", "log"], "--fits-stretch log: choose lupton or asinh"),
    ],
)
def test_bad_fits_options_are_one_line_exit_2(tmp_path, capsys, args, message):
    dst = tmp_path / "out" / "dst.h5"
    code, _, err = prepare_cli(
        capsys, "--images", tmp_path, "--labels", tmp_path / "l.csv", dst, "--crop", 8, *args
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not dst.parent.exists()


def png_folder(root: Path, rows: int = 9) -> tuple[Path, Path]:
    folder = root / "pngs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(rows):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    labels = root / "pngs.csv"
    labels.write_text("id,label\n" + "".join(f"p{i},{i % 3}\n" for i in range(rows)))
    return folder, labels


def test_fits_options_go_with_fits_cutouts_and_a_folder_holds_one_kind(fits_set, tmp_path, capsys):
    dst = tmp_path / "out" / "dst.h5"

    def refused(message: str, *args: object) -> None:
        code, _, err = prepare_cli(capsys, *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, err)
        assert not dst.parent.exists()

    folder, labels = png_folder(tmp_path)
    refused("--fits-* options go with FITS cutouts", "--images", folder, "--labels", labels, dst, "--crop", 8,
            "--fits-q", 3)  # fmt: skip
    refused("--fits-q goes with --images DIR", tmp_path / "src.h5", dst, "--fits-q", 3)
    fits_folder, fits_labels, keys = small_copy(fits_set, tmp_path)
    form = ["--images", fits_folder, "--labels", fits_labels, dst]
    (fits_folder / "p0.png").write_bytes((folder / "p0.png").read_bytes())
    fits_labels.write_text(fits_labels.read_text() + "p0,0\n")
    refused("mixes FITS cutouts and JPEG/PNG images", *form, "--crop", 8)
    (fits_folder / "p0.png").unlink()
    fits_labels.write_text(fits_labels.read_text().replace("p0,0\n", ""))
    write_cutout(fits_folder / fits_set.files[keys[2]].name, read_bands(fits_set.files[keys[0]], None)[:2])
    refused(
        f"1 of 12 images cannot be used: {keys[2]} (has 2 band planes, not 3", *form, "--crop", 8
    )  # 2 workers
    refused("none of the 12 images can be used", *form, "--crop", 8, "--fits-bands", "0,1,3", "--workers", 1)
    refused(
        f"crop {SIDE + 1} does not fit this {SIDE}×{SIDE} image", *form, "--crop", SIDE + 1, "--workers", 1
    )


def test_a_model_takes_only_the_kind_it_was_trained_on(fits_set, trained, tmp_path):
    """FITS cutouts for a model trained on JPEG/PNG (no stretch recorded), JPEG/PNG for one
    trained on FITS: one line before any work, exit 2."""
    state = torch.load(trained.run / "checkpoints" / "best.pt", weights_only=True)
    state["fits"] = None
    jpeg_model = tmp_path / "jpeg_model.pt"
    torch.save(state, jpeg_model)
    folder, _ = png_folder(tmp_path)
    cases = [
        (jpeg_model, catalogue_of(tmp_path / "fits.csv", fits_set.files), "the model was trained on JPEG/PNG images"),
        (trained.run, folder, "not a FITS cutout, but the model was trained on FITS cutouts (lupton"),
    ]  # fmt: skip
    for checkpoint, target, message in cases:
        out = tmp_path / "out"
        result = infer(checkpoint, target, "--out", out)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
        assert not out.exists()
