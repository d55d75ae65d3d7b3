"""The shipped recipes: every configs/*.yaml is a valid config, the Galaxy10 cluster recipes'
headers name the prepare command of the file they train on, and both train through the real CLI."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, read_metrics, run_train, tiny_overrides
from test_models import lite0_weights_file

from galaxydist import synthetic
from galaxydist.config import load_config
from galaxydist.data.galaxy10 import prepare
from galaxydist.errors import UserError
from galaxydist.models import family_of

# configs/ and the recipes packaged with the code (some of configs/ link to those), each once.
SHIPPED = sorted(
    {p.resolve() for folder in ("configs", "galaxydist/configs") for p in (ROOT / folder).glob("*.yaml")}
)
E2CNN = ROOT / "configs" / "galaxy10_e2cnn.yaml"
PRETRAINED = ROOT / "configs" / "galaxy10_pretrained.yaml"
CLUSTER_RECIPES = [E2CNN, PRETRAINED]


def test_the_galaxy10_cluster_recipes_are_among_the_shipped_configs():
    assert set(CLUSTER_RECIPES) <= set(SHIPPED)  # else the loading test below would not see them


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_loads(path):
    """load_config rejects unknown keys, wrong types and impossible values (a UserError)."""
    cfg = load_config(path)
    assert cfg.stages and cfg.data.path


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("  group: D16", "  group: D16\n  groups: 4", "unknown config key 'model.groups'"),
        ("schedule: step,", "schedule: steps,", "'steps' is not one of constant | cosine | step"),
        ("weight_decay: 1.0e-4", "weight_decay: -1.0e-4", "'optim.weight_decay': must be >= 0"),
    ],
)
def test_a_recipe_with_a_bad_key_or_value_does_not_load(tmp_path, old, new, message):
    """What makes the loading test above able to fail: the same recipe, one key or value wrong."""
    text = E2CNN.read_text()
    assert old in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(old, new, 1))
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(bad)


def header_prepare(path: Path) -> list[str]:
    """The `python -m galaxydist.prepare ...` command in a recipe's header comment (continued over
    lines ending in a backslash), as arguments."""
    header = [line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")]
    for i, command in enumerate(header):
        if command.startswith("python -m galaxydist.prepare "):
            while command.endswith("\\") and i + 1 < len(header):
                i += 1
                command = command[:-1] + " " + header[i]
            return shlex.split(command)[3:]
    raise AssertionError(f"{path.name}: no prepare command in the header")


@pytest.mark.parametrize("path", CLUSTER_RECIPES, ids=lambda p: p.name)
def test_the_header_prepares_the_full_galaxy10_file_into_data_path_at_a_size_the_model_takes(path):
    args = header_prepare(path)
    cfg = load_config(path)
    assert args[0] == "Galaxy10_DECals.h5" and args[1] == cfg.data.path
    options = dict(zip(args[2::2], map(int, args[3::2]), strict=True))
    assert set(options) <= {"--crop", "--resize"} and options["--crop"] <= 256  # the real images are 256²
    side = options.get("--resize", options["--crop"])
    needs, _ = family_of(cfg.model).input_needs(cfg.model)
    # e2cnn's invariance is exact for the grid's symmetries only when every pool halves evenly.
    assert side % needs == 0 if cfg.model.name == "e2cnn" else side >= needs


def test_the_gz1_header_prepares_data_path_at_a_side_its_c8_pools_halve_evenly():
    args = header_prepare(ROOT / "configs" / "gz1.yaml")
    cfg = load_config(ROOT / "configs" / "gz1.yaml")
    options = dict(zip(args[:4:2] + args[5::2], args[1:4:2] + args[6::2], strict=True))  # args[4]: DST
    assert options["--images"] == "../shared/data/gz1-sdss/images" and args[4] == cfg.data.path
    needs, _ = family_of(cfg.model).input_needs(cfg.model)
    assert int(options["--resize"]) % needs == 0 and int(options["--crop"]) <= 423  # the cutouts are 423²


@pytest.fixture(scope="module")
def prepared_128(tmp_path_factory) -> Path:
    """200 synthetic images at 128² (the e2cnn recipe's 7 pooling blocks need at least 2^7): one
    step of the recipes' batch of 128 an epoch."""
    root = tmp_path_factory.mktemp("recipes")
    synthetic.generate(root / "raw.h5", n=200, seed=3, size=128, workers=1)
    prepare(str(root / "raw.h5"), str(root / "g10_128.h5"), crop=128, seed=0)
    return root / "g10_128.h5"


def recipe_overrides(recipe: Path, data: Path, out: Path, **extra: object) -> list[str]:
    """The recipe itself with conftest's test settings (data, output, no workers, W&B off), but
    not its stand-ins for the recipe's own batch, widths, dropout and stages; then `extra`."""
    stand_ins = {"data.batch_size", "model.channels", "model.dropout", "stages"}
    base = [o for o in tiny_overrides(data, out) if o.split("=", 1)[0] not in stand_ins]
    return ["--config", str(recipe), *base, *(f"{k}={v}" for k, v in extra.items())]


def check_run(run: Path, stages: list[str]) -> tuple[dict, list[dict]]:
    """The run folder of a finished run: its resolved config, metrics and summary."""
    saved = yaml.safe_load((run / "config.yaml").read_text())
    metrics = read_metrics(run)
    assert [m["stage"] for m in metrics] == stages
    summary = json.loads((run / "summary.json").read_text())
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and len(summary["class_names"]) == 10
    return saved, metrics


def test_the_e2cnn_recipe_trains_an_epoch_through_the_cli(prepared_128, tmp_path):
    """D16, AdamW, the step schedule and the paper's flips, at the recipe's depth (7 blocks) and
    batch; only the widths (fields per block) and the epoch count are cut."""
    run = tmp_path / "run"
    overrides = recipe_overrides(
        E2CNN, prepared_128, run, **{"model.channels": "[1,1,1,1,1,1,1]", "stages.0.max_epochs": 1}
    )
    # The full widths would take hours and ~16 GB here: make sure the cut reaches the config.
    assert load_config(E2CNN, overrides[2:]).model.channels == [1] * 7
    result = run_train(1, overrides, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    saved, metrics = check_run(run, ["train"])
    assert saved["model"]["group"] == "D16" and saved["model"]["channels"] == [1] * 7
    assert saved["optim"] == {"name": "adamw", "weight_decay": 1e-4}
    assert (saved["augment"]["hflip"], saved["augment"]["vflip"], saved["augment"]["rotate"]) == (
        0.3,
        0.3,
        180,
    )
    assert saved["data"]["batch_size"] == 128 and saved["loss"]["class_weight_power"] == 0
    assert saved["stages"][0]["schedule"] == "step" and saved["stages"][0]["step_epochs"] == 25
    assert metrics[0]["lr"] == pytest.approx(1e-2)  # epoch 0 of ×0.1 every 25 epochs, no warm-up


def test_the_pretrained_recipe_loads_imagenet_weights_and_trains_both_stages_through_the_cli(
    prepared_128, tmp_path
):
    """The offline ImageNet file in place of the hub's; the head stage, then every block with
    layer-wise decay and the warm-up; one epoch each."""
    run = tmp_path / "run"
    extra = {"model.pretrained": lite0_weights_file(), "stages.0.max_epochs": 1, "stages.1.max_epochs": 1}
    result = run_train(1, recipe_overrides(PRETRAINED, prepared_128, run, **extra), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "initialised fresh: net.classifier.weight, net.classifier.bias" in result.stdout
    saved, metrics = check_run(run, ["head", "all"])
    assert saved["model"]["arch"] == "efficientnet_lite0" and saved["model"]["dropout"] == 0.5
    assert [s["train"] for s in saved["stages"]] == ["head", "all"] and saved["stages"][1]["lr_decay"] == 0.75
    assert metrics[0]["lr"] == pytest.approx(1e-3)
    # One step (140 training images, batch 128) into a 100-step warm-up: 1/100 of the head's 5e-4.
    assert metrics[1]["lr"] == pytest.approx(5e-4 / 100)
