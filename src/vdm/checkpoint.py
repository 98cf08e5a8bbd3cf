"""Model files: weights in safetensors with the config as JSON metadata. Never pickle.

A *model file* is one `.safetensors` file whose metadata holds {"format": "vdm-model", "version": "1",
"config": <VDMConfig as JSON>}. A *checkpoint* is a directory holding `ema.safetensors` and/or
`model.safetensors` (model files) plus training state. A *run* is a directory with `checkpoints/`.
`load_model` accepts any of the three.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file
from safetensors import safe_open

from vdm.files import atomic_write
from vdm.model import VDM, VDMConfig

FORMAT = "vdm-model"
VERSION = "1"


class CheckpointError(ValueError):
    """A model file or checkpoint that cannot be used; the message names the path and the problem."""


def save_model(model: VDM, path: str | os.PathLike, state_dict: dict | None = None, *,
               source: dict | None = None) -> None:
    """Write `model` (or the given `state_dict` with model's config, e.g. EMA weights) as one model file;
    `source` (JSON-serialisable) records where the weights came from, e.g. an official checkpoint."""
    sd = state_dict if state_dict is not None else model.state_dict()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    meta = {"format": FORMAT, "version": VERSION, "config": json.dumps(model.config.to_dict())}
    if source is not None:
        meta["source"] = json.dumps(source, sort_keys=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def save_pretrained(model: VDM, folder: str | os.PathLike) -> None:
    """`folder/model.safetensors` (a model file) and `folder/config.json` (its config, readable without torch)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder}: exists and is not a directory")
    save_model(model, folder / "model.safetensors")
    text = json.dumps(model.config.to_dict(), indent=2, sort_keys=True) + "\n"
    atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_source(path: str | os.PathLike) -> dict | None:
    """Where the weights of a model file came from (e.g. an official checkpoint), or None if not recorded."""
    meta = _metadata(Path(path))
    try:
        return json.loads(meta["source"]) if "source" in meta else None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: bad source record in metadata ({e})") from None


def _metadata(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def read_config(path: str | os.PathLike) -> VDMConfig:
    """The VDMConfig stored in a model file."""
    path = Path(path)
    meta = _metadata(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a vdm model file (metadata format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: model file version {meta.get('version')!r}, this vdm reads {VERSION!r}")
    try:
        return VDMConfig.from_dict(json.loads(meta["config"]))
    except (KeyError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad model config in metadata ({e})") from None


def load_model_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> VDM:
    """A VDM from one model file (config from its metadata, weights checked strictly), in eval mode."""
    config = read_config(path)
    model = VDM(config)
    try:
        sd = load_file(str(path), device=str(map_location))
        model.load_state_dict(sd, strict=True)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{path}: weights do not fit the stored config ({e})") from None
    return model.to(map_location).eval()


def resolve_model_path(path: str | os.PathLike, prefer_ema: bool = True) -> Path:
    """The model file meant by `path`: a model file, a checkpoint directory or a run directory.

    In a checkpoint directory, `ema.safetensors` is preferred (unless `prefer_ema` is False), then
    `model.safetensors`. In a run directory, the checkpoint named in `checkpoints/best` is used if present,
    otherwise the newest `checkpoints/step_*`.
    """
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    names = ["ema.safetensors", "model.safetensors"] if prefer_ema else ["model.safetensors", "ema.safetensors"]
    for name in names:
        if (p / name).is_file():
            return p / name
    ckdir = p / "checkpoints"
    if ckdir.is_dir():
        best = ckdir / "best"
        if best.is_file():
            target = ckdir / best.read_text().strip()
            if target.is_dir():
                return resolve_model_path(target, prefer_ema)
        steps = sorted(d for d in ckdir.glob("step_*") if d.is_dir())
        if steps:
            return resolve_model_path(steps[-1], prefer_ema)
    raise CheckpointError(f"{p}: holds no model file, checkpoint or run (looked for {', '.join(names)}, checkpoints/)")


def load_model(path: str | os.PathLike, *, prefer_ema: bool = True, map_location="cpu") -> VDM:
    """Load a VDM, in eval mode, from a model file, checkpoint directory or run directory (see
    `resolve_model_path`)."""
    return load_model_file(resolve_model_path(path, prefer_ema), map_location)


def model_fingerprint(model: VDM) -> bytes:
    """32-byte SHA-256 of the safetensors serialisation of `model.state_dict()` followed by its config JSON:
    the model's identity, equal for the same weights and config however the model was loaded (file,
    checkpoint or run directory)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    h = hashlib.sha256(save(tensors))
    h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode("utf-8"))
    return h.digest()
