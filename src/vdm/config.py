"""Training configuration: typed dataclasses, TOML presets and files, `key.sub=value` overrides.

A `TrainConfig` nests the model (`VDMConfig`), the optimiser, the data and the run settings. It is built from
the defaults, then a named preset (`src/vdm/presets/NAME.toml`), then optional TOML files, then command-line
overrides such as `optim.lr=1e-3` or `model.gamma_type=learned_nnet`; every key and every value is checked
against the dataclass fields and their types. The resolved config is saved as JSON beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from vdm.model import VDMConfig
from vdm.presets import preset_names
from vdm.precision import CONV_ALGORITHMS, PRECISIONS


class ConfigError(ValueError):
    """A config file, preset or override that cannot be used; the message names the source and the key."""


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then a constant learning rate (the official VDM optimiser), or a cosine decay to
    zero at `decay_steps` (an annealed end of a fine-tuning run)."""

    lr: float = 2e-4  # peak learning rate
    beta1: float = 0.9  # Adam β₁
    beta2: float = 0.99  # Adam β₂
    eps: float = 1e-8  # Adam ε
    weight_decay: float = 0.01  # decoupled weight decay, on weight matrices/kernels only (not biases, norms, γ)
    warmup_steps: int = 100  # lr rises linearly from lr/warmup_steps to lr over these steps
    decay_steps: int = 0  # 0 = constant lr after warm-up; else lr follows a half cosine from lr at warmup_steps to
    # 0 at step decay_steps (and stays 0 after it: set run.max_steps to decay_steps)
    grad_clip: float = 0.0  # clip the score network's gradient norm (not the schedule's) to this; 0 = no clipping

    def __post_init__(self):
        if self.decay_steps and self.decay_steps <= self.warmup_steps:
            raise ValueError(f"decay_steps ({self.decay_steps}) must exceed warmup_steps ({self.warmup_steps}), "
                             f"or be 0 for a constant learning rate")


@dataclass
class DataConfig:
    """Which images to train on (see `vdm.data.load_dataset`)."""

    name: str = "photos"  # dataset name: photos, wallpapers, photos+wallpapers, fashion_mnist, mnist, cifar10,
    # imagenet32, imagenet64, folder
    root: str | None = None  # dataset files (None: the dataset's default; photos are embedded)
    test_split: str = "test"  # split used for the periodic test bpd
    test_images: int = 256  # size of the fixed test subset evaluated with the EMA weights (0 = no test)
    augment: str = "none"  # none, flip_rot90 or flip_rot90_channels: augmentation with conditioning (official
    # cifar10_aug pipelines; the network is told which images were augmented, see vdm.train.augment)
    crop_sizes: list[int] = field(default_factory=list)  # train on random crops of these sizes (with left-right
    # flips) from the whole photographs of photos / wallpapers / photos+wallpapers instead of fixed tiles
    # (vdm.train.crops); [] = the dataset's tiles of model.image_size

    def __post_init__(self):
        from vdm.data import PHOTO_DATASETS
        from vdm.train.augment import check_augmentation
        check_augmentation(self.augment)
        if self.crop_sizes and self.name not in PHOTO_DATASETS:
            raise ValueError(f"crop_sizes needs a dataset of whole photographs ({', '.join(PHOTO_DATASETS)}), "
                             f"not {self.name!r}")
        bad = [s for s in self.crop_sizes if not 8 <= s <= 256]
        if bad:
            raise ValueError(f"crop sizes must lie in [8, 256], got {bad}")


@dataclass
class RunConfig:
    """How long, how often, on what: the loop's settings."""

    seed: int = 0  # seeds the data order, the noise streams and the initial weights
    batch_size: int = 128  # global batch (split evenly across processes)
    max_steps: int = 10_000_000  # stop after this many optimiser steps (counting skipped ones)
    ema_decay: float = 0.9999  # EMA of the weights; 0 keeps the EMA equal to the weights
    ema_warmup: bool = False  # use min(ema_decay, (1+step)/(10+step)) early on (short runs)
    log_every: int = 50  # steps between metrics.jsonl lines (train means over the window)
    eval_every: int = 1000  # steps between test-bpd evaluations (0 = never, except at the end)
    eval_batch_size: int = 128  # images per forward pass in the evaluation
    checkpoint_every: int = 1000  # steps between checkpoints (one is always written at the end)
    keep_last: int = 3  # checkpoints kept (plus the best by test bpd)
    max_nonfinite: int = 20  # stop after this many consecutive non-finite losses
    device: str = "auto"  # "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", ...
    precision: str = "auto"  # "auto" (bf16 autocast where the hardware has native bf16, else fp32), "bf16", "fp32"
    conv_algorithm: str = "auto"  # 3×3 convs in training: auto (Winograd on one thread of an AVX2 CPU w/o AVX-512), winograd, direct
    compile: bool = False  # torch.compile the score network
    split: int = 1  # CPU: run each step's batch as this many parts side by side, one torch thread each (bench/README.md)
    init_from: str | None = None  # start from this model file's weights (same architecture) instead of random ones
    progress: bool = True  # tqdm progress bar
    tensorboard: bool = True  # also write TensorBoard logs when torch.utils.tensorboard imports

    def __post_init__(self):
        for name in ("batch_size", "log_every", "eval_batch_size", "checkpoint_every", "keep_last",
                     "max_nonfinite", "split"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.batch_size % self.split:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by split {self.split}")


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as JSON beside every checkpoint."""

    model: VDMConfig = field(default_factory=VDMConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "optim": dataclasses.asdict(self.optim),
                "data": dataclasses.asdict(self.data), "run": dataclasses.asdict(self.run)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        """A config from a nested dict (missing keys keep their defaults; unknown keys are errors)."""
        return merge(cls(), d, source)


SECTIONS = {"model": VDMConfig, "optim": OptimConfig, "data": DataConfig, "run": RunConfig}


LEGACY_TEST_HOOKS = ("inject_nonfinite", "throttle_s")  # run.* keys of older configs that set no training value


def upgrade_legacy(d: dict) -> dict:
    """`d` in the current keys, so that the config.json of a run made by an older vdm still loads and resumes:
    run.bf16 = true/false is run.precision = "bf16"/"fp32" with run.conv_algorithm = "direct" (the
    convolutions such runs computed with); the test-only keys `LEGACY_TEST_HOOKS` are dropped."""
    run = d.get("run") if isinstance(d, dict) else None
    if not isinstance(run, dict) or not ({"bf16", *LEGACY_TEST_HOOKS} & set(run)):
        return d
    run = {k: v for k, v in run.items() if k not in LEGACY_TEST_HOOKS}
    if "bf16" not in run:
        return {**d, "run": run}
    bf16 = run.pop("bf16")
    if "precision" not in run and isinstance(bf16, bool):
        run["precision"] = "bf16" if bf16 else "fp32"
        run.setdefault("conv_algorithm", "direct")
    elif not isinstance(bf16, bool):
        run["bf16"] = bf16  # left for merge to refuse with its usual message
    return {**d, "run": run}


# --- values and types ---------------------------------------------------------------------------------------
def _field_types(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _is_optional(tp) -> tuple[bool, object]:
    """(True, inner type) for `X | None`, else (False, tp)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def coerce(value, tp, where: str):
    """`value` checked against the annotation `tp` (int, float, bool, str, X | None, list/tuple of ints)."""
    optional, tp = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: None is not allowed")
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = typing.get_args(tp)[0]
        items = [coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {tp}")


def merge(config: TrainConfig, d: dict, source: str) -> TrainConfig:
    """A new config: `config` with the nested dict `d` ({section: {key: value}}) applied, types checked."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a table of sections, got {type(d).__name__}")
    d = upgrade_legacy(d)
    sections = {}
    for name, cls in SECTIONS.items():
        current = getattr(config, name)
        values = d.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{name}] must be a table, got {values!r}")
        types_ = _field_types(cls)
        unknown = sorted(set(values) - set(types_))
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                              f"known: {', '.join(sorted(types_))}")
        changes = {k: coerce(v, types_[k], f"{source}: {name}.{k}") for k, v in values.items()}
        for key, allowed in (("precision", PRECISIONS), ("conv_algorithm", CONV_ALGORITHMS)):
            if name == "run" and changes.get(key, allowed[0]) not in allowed:
                raise ConfigError(f"{source}: run.{key} must be one of {', '.join(allowed)}, got {changes[key]!r}")
        try:
            sections[name] = dataclasses.replace(current, **changes)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: [{name}] {e}") from None
    unknown = sorted(set(d) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    return TrainConfig(**sections)


# --- sources ------------------------------------------------------------------------------------------------
def read_toml(path: str | Path) -> dict:
    """A TOML file as a dict; unreadable or malformed files raise ConfigError naming the file."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def load_preset(name: str) -> TrainConfig:
    """The named preset applied to the defaults."""
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    with resources.as_file(resources.files("vdm") / "presets" / f"{name}.toml") as path:
        return merge(TrainConfig(), read_toml(path), f"preset {name!r}")


def parse_override(text: str) -> tuple[str, str, object]:
    """`section.key=value` → (section, key, value). The value is read as a TOML value (numbers, true/false,
    [lists], "strings"); anything that is not valid TOML is taken as a bare string; `none`/`null` give None."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = (s.strip() for s in text.split("=", 1))
    if key.count(".") != 1:
        raise ConfigError(f"override {text!r}: the key must be section.name, e.g. optim.lr")
    section, name = key.split(".")
    if raw.lower() in ("none", "null"):
        return section, name, None
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, name, value


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """`config` with every `section.key=value` override applied in order (types checked)."""
    for text in overrides:
        section, name, value = parse_override(text)
        config = merge(config, {section: {name: value}}, f"override {text!r}")
    return config


def build_config(preset: str | None = None, files: list[str] | None = None,
                 overrides: list[str] | None = None) -> TrainConfig:
    """Defaults ← preset ← TOML files (in order) ← overrides."""
    config = load_preset(preset) if preset else TrainConfig()
    for path in files or []:
        config = merge(config, read_toml(path), str(path))
    return apply_overrides(config, overrides or [])


def load_json_config(path: str | Path) -> TrainConfig:
    """A resolved config saved by a run (config.json or a checkpoint's state.json "config")."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if isinstance(d, dict) and "config" in d and "step" in d:
        d = d["config"]
    return merge(TrainConfig(), d, str(path))
