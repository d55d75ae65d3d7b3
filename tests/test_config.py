"""The config: YAML + dotted overrides, typed; bad keys and values are errors naming the key."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import ROOT, run_train

from galaxydist.config import Config, dump_config, load_config
from galaxydist.errors import UserError


def test_baseline_recipe_is_the_packaged_default():
    cfg = load_config()
    assert cfg.data.batch_size == 64 and cfg.model.channels == [32, 64, 128, 256, 512]
    assert [(s.name, s.lr, s.max_epochs, s.patience) for s in cfg.stages] == [
        ("train", 1e-3, 50, 5),
        ("finetune", 5e-4, 50, 5),
    ]
    assert load_config(ROOT / "configs" / "galaxy10.yaml") == cfg


def test_dotted_overrides_reach_nested_keys_and_lists():
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [
            "stages.0.lr=5e-4",
            "model.channels=[8,8,8,8,8]",
            "augment.hflip=0",
            "tracking.tags=[a,b]",
            "seed=3",
        ],
    )
    assert cfg.stages[0].lr == 5e-4 and isinstance(cfg.augment.hflip, float) and cfg.augment.hflip == 0.0
    assert cfg.model.channels == [8] * 5 and cfg.tracking.tags == ["a", "b"] and cfg.seed == 3
    assert load_config(ROOT / "configs" / "demo.yaml", ["data.num_workers=auto"]).data.num_workers == "auto"


def test_resolved_config_round_trips(tmp_path):
    """The config.yaml a run saves loads back as the same config."""
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["stages.1.patience=7", "speed.bf16=true"])
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load(dump_config(cfg))["stages"][1]["patience"] == 7


@pytest.mark.parametrize(
    "override, message",
    [
        ("colour=red", "unknown config key 'colour'"),
        ("data.paht=x.h5", "unknown config key 'data.paht'"),
        ("stages.0.learning_rate=1", "unknown config key 'stages.0.learning_rate'"),
        ("data.batch_size=abc", "'data.batch_size': expected int"),
        ("data.batch_size=true", "'data.batch_size': expected int"),
        ("model.channels=32", "'model.channels': expected a list"),
        ("stages.0.lr=-1e-3", "'stages.0.lr': must be positive"),
        ("stages.0.patience=0", "'stages.0.patience': must be at least 1"),
        ("data.batch_size=0", "'data.batch_size': must be positive"),
        ("augment.hflip=1.5", "'augment.hflip': a probability"),
        ("augment.rotate=270", "'augment.rotate': degrees in [0, 180]"),
        ("model.dropout=1", "'model.dropout'"),
        ("tracking.wandb=sometimes", "'tracking.wandb': 'sometimes' is not one of"),
        ("stages.5.lr=1", "'stages.5.lr': no such key '5'"),
        ("stages=[]", "'stages': at least one stage"),
        ("noequals", "expected key=value"),
        ("data.num_workers=-1", "'data.num_workers': must be >= 0"),
        ("speed.bf16=maybe", "'speed.bf16': expected bool or 'auto', got 'maybe'"),
        (
            "data.num_workers=many",
            "'data.num_workers': expected int or 'auto', got 'many'",
        ),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(UserError) as err:
        load_config(ROOT / "configs" / "demo.yaml", [override])
    assert message in str(err.value)


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  path: x.h5\n  shuffle: true\n")
    with pytest.raises(UserError, match=r"unknown config key 'data\.shuffle'"):
        load_config(path)


def test_defaults_match_the_packaged_baseline_recipe():
    """The dataclass defaults are the packaged configs/galaxy10.yaml, key for key: every key the
    file sets has the default's value, and loading it gives exactly Config()."""
    from galaxydist.config import default_config_path

    assert load_config(None).to_dict() == Config().to_dict()
    assert default_config_path().read_text() == (ROOT / "configs" / "galaxy10.yaml").read_text()
    written = yaml.safe_load(default_config_path().read_text())
    defaults = Config().to_dict()

    def check(value, default, key):
        if isinstance(value, dict):
            for k, v in value.items():
                check(v, default[k], f"{key}.{k}")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            assert len(value) == len(default), key
            for i, (v, d) in enumerate(zip(value, default, strict=True)):
                check(v, d, f"{key}.{i}")
        else:
            assert value == default, key

    check(written, defaults, "config")


def test_train_cli_bad_config_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    result = run_train(
        0, ["--config", str(ROOT / "configs" / "demo.yaml"), f"output_dir={out}", "data.batchsize=3"]
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: unknown config key 'data.batchsize'"]
    assert not out.exists()


def test_train_cli_missing_data_says_how_to_make_it(tmp_path):
    result = run_train(0, [f"data.path={tmp_path / 'none.h5'}", f"output_dir={tmp_path / 'run'}"])
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "prepared data not found" in line and "python -m galaxydist.prepare" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("impossible", "named"),
    [
        pytest.param([], "here: cpu", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU")),
        (["speed.compile=true"], "speed.compile=true"),
    ],
    ids=["cpu", "compiled"],
)
def test_train_cli_cuda_graphs_where_impossible_exits_2_and_writes_nothing(
    tmp_path, tiny_prepared, impossible, named
):
    out = tmp_path / "run"
    overrides = [f"data.path={tiny_prepared}", f"output_dir={out}", "speed.cuda_graphs=true", *impossible]
    result = run_train(0, overrides)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "speed.cuda_graphs=true needs one process on a CUDA device" in line and named in line
    assert not out.exists()
