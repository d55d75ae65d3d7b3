"""The run configuration: typed dataclasses, loaded from YAML, with dotted command-line overrides.

Unknown keys, wrong types and impossible values are errors that name the key, before any work.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import UserError


@dataclass
class DataConfig:
    path: str = "data/galaxy10_128.h5"
    batch_size: int = 64  # global: split evenly over the ranks
    # auto: 2 loader processes where they overlap reading with GPU work (CUDA, data not resident
    # on the device); 0 on the CPU, where the memmap loader outpaces training many times over and
    # workers would only take cores from the ranks.
    num_workers: int | Literal["auto"] = "auto"
    eval_batch_size: int = 256  # global, for validation and test
    # Node-local copies of the prepared file: none | auto (on SLURM: $SLURM_TMPDIR, else $TMPDIR,
    # else stage_dir, else /tmp) | a folder. The first rank of each node copies and checks it.
    stage: str = "none"
    stage_dir: str | None = None


@dataclass
class ModelConfig:
    name: Literal["cnn", "timm", "e2cnn"] = "cnn"  # the family (galaxydist.models.FAMILIES)
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # cnn, e2cnn (fields)
    dropout: float = 0.4
    pool: list[bool] | None = None  # cnn: which blocks halve the image (null: every block)
    arch: str = "resnet18"  # timm: the architecture
    group: str = "C8"  # e2cnn: C<N> (rotations) or D<N> (rotations and mirrors)
    # A local .pt/.pth/.safetensors file or galaxydist checkpoint, or timm:<tag> from timm's hub.
    pretrained: str | None = None


@dataclass
class AugmentConfig:
    hflip: float = 0.5  # probability
    vflip: float = 0.5
    rotate: float = 180.0  # degrees: uniform in [-rotate, rotate]
    # Class-index pairs that trade places under a mirror (GZ1: [[1, 2]], clockwise ↔ anticlockwise
    # spirals): a mirrored training image takes the swapped label; TTA swaps mirrored views back.
    mirror_swap: list[list[int]] = field(default_factory=list)


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw"] = "adam"
    weight_decay: float = 0.0  # never on BatchNorm parameters and biases


@dataclass
class LossConfig:
    label_smoothing: float = 0.0
    # Class weights are the prepared file's inverse frequencies raised to this power: 1 balances
    # the classes fully, 0 leaves them unweighted, 0.5 (square root) trades between the two.
    class_weight_power: float = 1.0
    # Logit adjustment (Menon et al. 2021, arXiv:2007.07314): the training loss sees the logits plus
    # this × log(training class frequency), so the trained logits lean to the rare classes by as much
    # at prediction. 0: off; 1: aims at balanced accuracy. Evaluation losses use the plain logits.
    logit_adjustment: float = 0.0


@dataclass
class EmaConfig:
    decay: float | None = (
        None  # exponential moving average of the weights (and BatchNorm statistics); null: off
    )


@dataclass
class StageConfig:
    name: str = "train"
    lr: float = 1e-3
    max_epochs: int = 50
    patience: int = 5
    train: str = "all"  # which parameters train: all | head | last:K (the last K blocks and the head)
    lr_decay: float = 1.0  # layer-wise: each layer below the head trains at lr_decay × the one above
    # The learning rate over the stage's optimiser steps: a linear warm-up, then constant, a cosine
    # to zero at max_epochs, or × step_gamma every step_epochs epochs.
    schedule: Literal["constant", "cosine", "step"] = "constant"
    warmup_steps: int = 0
    step_epochs: int = 10
    step_gamma: float = 0.1


@dataclass
class TrackingConfig:
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "galaxydist"
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class DistributedConfig:
    timeout_s: float = 600.0  # a collective waiting longer than this fails instead of hanging
    # CPU only. One process normally uses the fused nn.BatchNorm2d. True gives it the ranks' own
    # GlobalBatchNorm2d arithmetic, so one process and N CPU ranks agree to float rounding (the
    # fused kernel sums naively, and Adam turns that into visible differences); slower (BENCHMARKS.md).
    exact_batchnorm: bool = False


@dataclass
class SpeedConfig:
    """Fast-path switches; `auto` means on for CUDA, off on CPU."""

    bf16: bool | Literal["auto"] = "auto"
    channels_last: bool = True  # faster than NCHW on the CPU too (oneDNN; BENCHMARKS.md)
    compile: bool = False
    resident: bool | Literal["auto"] = "auto"  # the splits on the device (auto: CUDA, if they fit)
    # The training step replayed as one CUDA graph (auto: one CUDA process, compile off, resident splits).
    cuda_graphs: bool | Literal["auto"] = "auto"


@dataclass
class Config:
    seed: int = 0
    output_dir: str = "runs/galaxy10"
    # What early stopping and best.pt follow on the validation split; balanced_accuracy (mean
    # per-class recall) suits very imbalanced sets, where plain accuracy swings with the big class.
    select_on: Literal["accuracy", "balanced_accuracy"] = "accuracy"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    stages: list[StageConfig] = field(
        default_factory=lambda: [StageConfig("train", 1e-3, 50, 5), StageConfig("finetune", 5e-4, 50, 5)]
    )
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the type hint `hint`, building nested dataclasses; errors name `key`."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise UserError(f"config key {key!r}: expected a mapping, got {value!r}")
        return _build(hint, value, key)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        choices = [o for o in options if o is not type(None)]
        for option in choices:
            try:
                return _convert(value, option, key)
            except UserError:
                pass
        raise UserError(f"config key {key!r}: expected {' or '.join(map(_describe, choices))}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(hint):
            choices = " | ".join(map(str, typing.get_args(hint)))
            raise UserError(f"config key {key!r}: {value!r} is not one of {choices}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"config key {key!r}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_convert(v, item, f"{key}.{i}") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads `5e-4` (no dot) as a string; it is plainly a number here.
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise UserError(f"config key {key!r}: expected {hint.__name__}, got {value!r}")
    return value


def _describe(hint: Any) -> str:
    """A type hint as a config error names it: int, 'auto'."""
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(choice) for choice in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    unknown = set(data) - set(hints)
    if unknown:
        name = f"{prefix}.{sorted(unknown)[0]}" if prefix else sorted(unknown)[0]
        raise UserError(f"unknown config key {name!r}")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _check(cfg: Config) -> None:
    """Values that are well typed but impossible."""
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "data.eval_batch_size": cfg.data.eval_batch_size,
        "distributed.timeout_s": cfg.distributed.timeout_s,
    }
    for i, stage in enumerate(cfg.stages):
        positive |= {f"stages.{i}.lr": stage.lr, f"stages.{i}.max_epochs": stage.max_epochs}
        if stage.patience < 1:
            raise UserError(f"config key 'stages.{i}.patience': must be at least 1, got {stage.patience}")
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"config key {key!r}: must be positive, got {value}")
    if cfg.data.num_workers != "auto" and cfg.data.num_workers < 0:
        raise UserError(f"config key 'data.num_workers': must be >= 0, got {cfg.data.num_workers}")
    if not cfg.stages:
        raise UserError("config key 'stages': at least one stage is needed")
    if not cfg.model.channels or min(cfg.model.channels) < 1:
        raise UserError(f"config key 'model.channels': must be positive sizes, got {cfg.model.channels}")
    for key in ("hflip", "vflip"):
        if not 0.0 <= getattr(cfg.augment, key) <= 1.0:
            raise UserError(
                f"config key 'augment.{key}': a probability in [0, 1], got {getattr(cfg.augment, key)}"
            )
    for i, stage in enumerate(cfg.stages):
        if not (stage.train in ("all", "head") or re.fullmatch(r"last:[1-9]\d*", stage.train)):
            raise UserError(f"config key 'stages.{i}.train': {stage.train!r} is not all | head | last:K")
        if not 0.0 < stage.lr_decay <= 1.0:
            raise UserError(f"config key 'stages.{i}.lr_decay': must be in (0, 1], got {stage.lr_decay}")
        if stage.warmup_steps < 0 or stage.step_epochs < 1 or not 0.0 < stage.step_gamma <= 1.0:
            raise UserError(
                f"config key 'stages.{i}': warmup_steps >= 0, step_epochs >= 1 and step_gamma in (0, 1], "
                f"got {stage.warmup_steps}, {stage.step_epochs}, {stage.step_gamma}"
            )
    if cfg.optim.weight_decay < 0:
        raise UserError(f"config key 'optim.weight_decay': must be >= 0, got {cfg.optim.weight_decay}")
    if not 0.0 <= cfg.loss.label_smoothing < 1.0:
        raise UserError(
            f"config key 'loss.label_smoothing': must be in [0, 1), got {cfg.loss.label_smoothing}"
        )
    if not 0.0 <= cfg.loss.class_weight_power <= 1.0:
        raise UserError(
            f"config key 'loss.class_weight_power': must be in [0, 1], got {cfg.loss.class_weight_power}"
        )
    if cfg.loss.logit_adjustment < 0:
        raise UserError(f"config key 'loss.logit_adjustment': must be >= 0, got {cfg.loss.logit_adjustment}")
    if cfg.ema.decay is not None and not 0.0 < cfg.ema.decay < 1.0:
        raise UserError(f"config key 'ema.decay': must be in (0, 1) or null, got {cfg.ema.decay}")
    seen: set[int] = set()
    for i, pair in enumerate(cfg.augment.mirror_swap):
        if len(pair) != 2 or pair[0] == pair[1] or min(pair) < 0 or seen & set(pair):
            raise UserError(
                f"config key 'augment.mirror_swap.{i}': {pair} must pair two different classes, each class once"
            )
        seen |= set(pair)
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise UserError(f"config key 'model.dropout': must be in [0, 1), got {cfg.model.dropout}")
    if not 0.0 <= cfg.augment.rotate <= 180.0:
        raise UserError(f"config key 'augment.rotate': degrees in [0, 180], got {cfg.augment.rotate}")


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `stages.0.lr` style keys inside nested dicts and lists."""
    *parents, last = dotted.split(".")
    node: Any = data
    for part in parents:
        try:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        except (IndexError, ValueError):
            raise UserError(f"config override {dotted!r}: no such key {part!r}") from None
    if isinstance(node, list):
        try:
            node[int(last)] = value
        except (IndexError, ValueError):
            raise UserError(f"config override {dotted!r}: no such index {last!r}") from None
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise UserError(f"config override {dotted!r}: {'.'.join(parents)!r} is not a section")


def default_config_path() -> Path:
    """The baseline recipe, shipped inside the package so it works outside a checkout."""
    return Path(str(resources.files("galaxydist") / "configs" / "galaxy10.yaml"))


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """YAML (safe_load) + `key=value` overrides, checked into a Config."""
    path = Path(path) if path is not None else default_config_path()
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise UserError(f"{path}: cannot read config ({err.strerror})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise UserError(f"{path}: not valid YAML ({where}{getattr(err, 'problem', None) or err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a mapping of keys")
    data = _with_defaults(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"config override {item!r}: expected key=value")
        _set_dotted(data, key, yaml.safe_load(raw))
    cfg = _build(Config, data)
    _check(cfg)
    return cfg


def _with_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """Start from the defaults so that an override may name a key the YAML leaves out."""
    base = Config().to_dict()
    for key, value in data.items():
        if key in base and isinstance(base[key], dict) and isinstance(value, dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def model_config(saved: dict[str, Any], key: str = "model") -> ModelConfig:
    """A checkpoint's saved `model` section as a ModelConfig (keys added since then take their defaults)."""
    return _build(ModelConfig, saved, key)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
