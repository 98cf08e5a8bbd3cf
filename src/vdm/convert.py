"""Load parameters of the official JAX/Flax implementation (google-research/vdm) into `vdm.VDM`.

`from_official(params, config)` takes the '/'-joined flax paths of an official checkpoint
(e.g. ``params/score_model/conv_in/kernel``) mapped to arrays, and the official `VDMConfig` fields.
Flax layouts: Dense kernels are (in, out); Conv kernels are (kh, kw, in, out).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from vdm.model import VDM, VDMConfig

GAMMA_TYPES = {"fixed": "fixed_linear", "learnable_scalar": "learned_linear", "learnable_nnet": "learned_nnet"}
OFFICIAL_FOURIER_EXPONENTS = (6, 7)  # Base2FourierFeatures(start=6, stop=8, step=1)


class ConversionError(ValueError):
    """The official parameters do not fit the official config (missing, unexpected or mis-shaped arrays)."""


def config_from_official(config: Mapping, channels: int, image_size: int | None = None) -> VDMConfig:
    """Our `VDMConfig` from the official `VDMConfig` field names."""
    try:
        gamma_type = GAMMA_TYPES[config["gamma_type"]]
    except KeyError:
        raise ConversionError(f"unknown official gamma_type {config.get('gamma_type')!r}; "
                              f"expected one of {', '.join(GAMMA_TYPES)}") from None
    fourier = config.get("with_fourier_features", True)
    return VDMConfig(
        image_size=int(image_size or config.get("image_size", 32)),
        channels=channels,
        vocab_size=int(config.get("vocab_size", 256)),
        gamma_type=gamma_type,
        gamma_min=float(config["gamma_min"]),
        gamma_max=float(config["gamma_max"]),
        timesteps=int(config.get("sm_n_timesteps", 0)),
        n_embd=int(config["sm_n_embd"]),
        n_layer=int(config["sm_n_layer"]),
        dropout=float(config.get("sm_pdrop", 0.0)),
        attention=bool(config.get("with_attention", False)),
        fourier_exponents=OFFICIAL_FOURIER_EXPONENTS if fourier else (),
        antithetic=bool(config.get("antithetic_time_sampling", True)),
    )


def _dense(kernel):  # flax (in, out) → torch Linear (out, in)
    return kernel.T


def _dense_as_conv1x1(kernel):  # flax Dense on channels (in, out) → torch Conv2d 1×1 (out, in, 1, 1)
    return kernel.T[:, :, None, None]


def _conv(kernel):  # flax (kh, kw, in, out) → torch (out, in, kh, kw)
    return kernel.transpose(3, 2, 0, 1)


def _same(a):
    return a


def _block_map(flax: str, ours: str, shortcut: bool) -> dict[str, tuple[str, callable]]:
    m = {
        f"{flax}/GroupNorm_0/scale": (f"{ours}.norm1.weight", _same),
        f"{flax}/GroupNorm_0/bias": (f"{ours}.norm1.bias", _same),
        f"{flax}/conv1/kernel": (f"{ours}.conv1.weight", _conv),
        f"{flax}/conv1/bias": (f"{ours}.conv1.bias", _same),
        f"{flax}/cond_proj/kernel": (f"{ours}.cond_proj.weight", _dense),
        f"{flax}/GroupNorm_1/scale": (f"{ours}.norm2.weight", _same),
        f"{flax}/GroupNorm_1/bias": (f"{ours}.norm2.bias", _same),
        f"{flax}/conv2/kernel": (f"{ours}.conv2.weight", _conv),
        f"{flax}/conv2/bias": (f"{ours}.conv2.bias", _same),
    }
    if shortcut:
        m[f"{flax}/nin_shortcut/kernel"] = (f"{ours}.nin_shortcut.weight", _dense_as_conv1x1)
        m[f"{flax}/nin_shortcut/bias"] = (f"{ours}.nin_shortcut.bias", _same)
    return m


def _attn_map(flax: str, ours: str) -> dict[str, tuple[str, callable]]:
    m = {f"{flax}/GroupNorm_0/scale": (f"{ours}.norm.weight", _same),
         f"{flax}/GroupNorm_0/bias": (f"{ours}.norm.bias", _same)}
    for lin in ("q", "k", "v", "proj_out"):
        m[f"{flax}/{lin}/kernel"] = (f"{ours}.{lin}.weight", _dense)
        m[f"{flax}/{lin}/bias"] = (f"{ours}.{lin}.bias", _same)
    return m


def parameter_map(config: VDMConfig) -> dict[str, tuple[str, callable]]:
    """Official flax path → (our state-dict name, array transform) for the score network of `config`."""
    sm, L = "params/score_model", config.n_layer
    m = {
        f"{sm}/dense0/kernel": ("score_model.dense0.weight", _dense),
        f"{sm}/dense0/bias": ("score_model.dense0.bias", _same),
        f"{sm}/dense1/kernel": ("score_model.dense1.weight", _dense),
        f"{sm}/dense1/bias": ("score_model.dense1.bias", _same),
        f"{sm}/conv_in/kernel": ("score_model.conv_in.weight", _conv),
        f"{sm}/conv_in/bias": ("score_model.conv_in.bias", _same),
        f"{sm}/GroupNorm_0/scale": ("score_model.norm_out.weight", _same),
        f"{sm}/GroupNorm_0/bias": ("score_model.norm_out.bias", _same),
        f"{sm}/conv_out/kernel": ("score_model.conv_out.weight", _conv),
        f"{sm}/conv_out/bias": ("score_model.conv_out.bias", _same),
    }
    for i in range(L):
        m |= _block_map(f"{sm}/down.block_{i}", f"score_model.down.{i}", shortcut=False)
        if config.attention:
            m |= _attn_map(f"{sm}/down.attn_{i}", f"score_model.down_attn.{i}")
    m |= _block_map(f"{sm}/mid.block_1", "score_model.mid_block1", shortcut=False)
    m |= _attn_map(f"{sm}/mid.attn_1", "score_model.mid_attn")
    m |= _block_map(f"{sm}/mid.block_2", "score_model.mid_block2", shortcut=False)
    for i in range(L + 1):
        m |= _block_map(f"{sm}/up.block_{i}", f"score_model.up.{i}", shortcut=True)
        if config.attention:
            m |= _attn_map(f"{sm}/up.attn_{i}", f"score_model.up_attn.{i}")
    if config.gamma_type == "learned_linear":
        m["params/gamma/w"] = ("gamma.w", _same)
        m["params/gamma/b"] = ("gamma.b", _same)
    elif config.gamma_type == "learned_nnet":
        m["params/gamma/l1/kernel"] = ("gamma.l1_weight", lambda a: a.reshape(()))
        m["params/gamma/l1/bias"] = ("gamma.l1_bias", lambda a: a.reshape(()))
        m["params/gamma/l2/kernel"] = ("gamma.l2_weight", lambda a: a.reshape(-1))
        m["params/gamma/l2/bias"] = ("gamma.l2_bias", _same)
        m["params/gamma/l3/kernel"] = ("gamma.l3_weight", lambda a: a.reshape(-1))
    return m


def from_official(params: Mapping[str, np.ndarray], config: Mapping, *, image_size: int | None = None,
                  dtype: torch.dtype = torch.float32) -> VDM:
    """A `VDM` holding the official parameters `params` ('/'-joined flax paths → arrays) for the official
    `config` (a mapping with the official `VDMConfig` field names). Every array must be used and every
    parameter of the model filled; anything else raises `ConversionError` naming the offending path.
    Each array is copied straight into the model, so conversion holds one copy of the weights beside `params`."""
    params = {k.removeprefix("param/"): v for k, v in params.items()}
    if "params/score_model/conv_out/kernel" not in params:
        raise ConversionError("params has no 'params/score_model/conv_out/kernel': not an official VDM checkpoint")
    channels = np.shape(params["params/score_model/conv_out/kernel"])[-1]
    cfg = config_from_official(config, channels, image_size)
    model = VDM(cfg)
    if cfg.gamma_type == "learned_nnet":
        n_features = np.shape(params.get("params/gamma/l2/kernel", np.zeros((1, 1024))))[-1]
        if n_features != model.gamma.n_features:
            from vdm.schedule import MonotoneNetSchedule
            model.gamma = MonotoneNetSchedule(cfg.gamma_min, cfg.gamma_max, n_features)
    model = model.to(dtype)

    mapping = parameter_map(cfg)
    unexpected = sorted(set(params) - set(mapping))
    missing = sorted(set(mapping) - set(params))
    if unexpected or missing:
        raise ConversionError(f"official parameters do not match the config ({_describe(cfg)}): "
                              f"missing {_few(missing)}, unexpected {_few(unexpected)}")
    state = model.state_dict()
    left = set(state) - _buffers(model) - {name for name, _ in mapping.values()}
    if left:
        raise ConversionError(f"no official parameter for {sorted(left)}")
    with torch.no_grad():
        for path, (name, transform) in mapping.items():
            value = np.asarray(transform(np.asarray(params[path])))
            if tuple(value.shape) != tuple(state[name].shape):
                raise ConversionError(f"{path}: shape {tuple(np.shape(params[path]))} does not fit {name} "
                                      f"{tuple(state[name].shape)} of the config ({_describe(cfg)})")
            state[name].copy_(torch.from_numpy(np.array(value, order="C")))
    return model


def _few(names: list[str]) -> str:
    return f"[{', '.join(names[:5])}{', …' if len(names) > 5 else ''}]" if names else "none"


def _describe(cfg: VDMConfig) -> str:
    return (f"{cfg.gamma_type}, n_embd {cfg.n_embd}, n_layer {cfg.n_layer}, "
            f"attention {'on' if cfg.attention else 'off'}, {cfg.channels} channels")


def _buffers(model: VDM) -> set[str]:
    return {name for name, _ in model.named_buffers()}


def convert_checkpoint(path, config: str | Mapping, *, tree: str = "ema_params", image_size: int | None = None,
                       dtype: torch.dtype = torch.float32) -> tuple[VDM, dict]:
    """(model, provenance) from an official checkpoint file (`<prefix>.flax`, the prefix itself, or a
    directory: see `vdm.flax_checkpoint.resolve_checkpoint_path`) and an official configuration (a name from
    `vdm.official_configs.OFFICIAL_CONFIGS`, a JSON file, or a mapping of official `config.model` fields).
    `tree` is "ema_params" (what the official evaluation uses) or "params". Only that tree is read."""
    from vdm.flax_checkpoint import read_parameters, resolve_checkpoint_path
    from vdm.official_configs import official_config

    if isinstance(config, str):
        fields, size = official_config(config)
        config_name = config if "/" not in config and not config.endswith(".json") else Path(config).name
    else:
        fields, size, config_name = dict(config), None, None
    file = resolve_checkpoint_path(path)
    step, params = read_parameters(file, tree)
    model = from_official(params, fields, image_size=image_size or size, dtype=dtype)
    source = {"from": "official google-research/vdm checkpoint", "file": file.name, "step": step,
              "params": tree, "config": config_name, "official_config": fields}
    return model, source
