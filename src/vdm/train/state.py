"""Training-state checkpoints: RUN_DIR/checkpoints/step_XXXXXXXX/ written atomically, pruned, the best named.

A checkpoint directory holds
  model.safetensors        the trained weights (a vdm model file, `vdm.checkpoint.save_model`)
  ema.safetensors          the EMA weights (a vdm model file; what `load_model` prefers)
  train_state.safetensors  AdamW moments and step counts ("optim.<i>.<name>"), RNG states as uint8 ("rng.*")
  state.json               step, counters, the optimiser's parameter groups and the resolved config
  config.json              the resolved TrainConfig alone
It is built under a hidden temporary name and renamed into place, so a run killed at any moment leaves only
complete checkpoints. RUN_DIR/checkpoints/best is a text file naming the checkpoint with the lowest test bpd.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vdm.checkpoint import CheckpointError, save_model
from vdm.files import atomic_write
from vdm.config import TrainConfig
from vdm.model import VDM
from vdm.train.ema import EMA

STATE_VERSION = 1
PREFIX = "step_"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


# --- tensors of the training state --------------------------------------------------------------------------
def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors "optim.<param index>.<name>", JSON part {"param_groups", "scalars"}) of the optimiser state."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for name, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = v.detach().to("cpu").contiguous()
            else:
                scalars[f"{idx}.{name}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_tensors() -> dict[str, torch.Tensor]:
    """The global torch RNG states (CPU and every CUDA device) as uint8 tensors."""
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    if "rng.cpu" in tensors:
        torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# --- writing ------------------------------------------------------------------------------------------------
def save_checkpoint(run_dir: str | os.PathLike, step: int, model: VDM, ema: EMA,
                    optimizer: torch.optim.Optimizer, counters: dict, config: TrainConfig) -> Path:
    """Write checkpoint `step` atomically (temporary directory, then rename); return its path."""
    ckdir = checkpoints_dir(run_dir)
    ckdir.mkdir(parents=True, exist_ok=True)
    final = ckdir / checkpoint_name(step)
    tmp = ckdir / f".tmp_{final.name}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, tmp / "model.safetensors")
    save_model(model, tmp / "ema.safetensors", state_dict=ema.state_dict())
    tensors, optim_meta = optimizer_tensors(optimizer)
    tensors.update(rng_tensors())
    meta = {"format": "vdm-train-state", "version": str(STATE_VERSION)}
    atomic_write(tmp / "train_state.safetensors", lambda path: save_file(tensors, path, metadata=meta))
    state = {"version": STATE_VERSION, "step": step, **counters, "optimizer": optim_meta,
             "config": config.to_dict()}
    (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8")
    (tmp / "config.json").write_text(config.to_json(), encoding="utf-8")
    _fsync_dir(tmp)
    if final.exists():  # the same step written again (e.g. after a resume): swap it out
        old = ckdir / f".old_{final.name}_{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(ckdir)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_best(run_dir: str | os.PathLike, name: str) -> None:
    """Point RUN_DIR/checkpoints/best at checkpoint `name` (atomically)."""
    path = checkpoints_dir(run_dir) / "best"
    atomic_write(path, lambda tmp: Path(tmp).write_text(name + "\n", encoding="utf-8"))


def read_best(run_dir: str | os.PathLike) -> str | None:
    path = checkpoints_dir(run_dir) / "best"
    try:
        name = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name or None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (directories step_* holding state.json), oldest first."""
    ckdir = checkpoints_dir(run_dir)
    if not ckdir.is_dir():
        return []
    return sorted(d for d in ckdir.iterdir()
                  if d.is_dir() and d.name.startswith(PREFIX) and (d / "state.json").is_file())


def prune(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (never the best one) and leftover temporaries."""
    ckdir = checkpoints_dir(run_dir)
    best = read_best(run_dir)
    ckpts = list_checkpoints(run_dir)
    for d in ckpts[:max(0, len(ckpts) - max(1, keep_last))]:
        if d.name != best:
            shutil.rmtree(d, ignore_errors=True)
    for d in ckdir.glob(".tmp_*"):
        if d.is_dir() and not d.name.endswith(f"_{os.getpid()}"):
            shutil.rmtree(d, ignore_errors=True)


# --- reading ------------------------------------------------------------------------------------------------
def read_state(ckpt: Path) -> dict:
    """state.json of a checkpoint, checked; errors name the file."""
    path = ckpt / "state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the training state ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "optimizer" not in state:
        raise CheckpointError(f"{path}: not a vdm training state (needs 'step' and 'optimizer')")
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: training-state version {state.get('version')!r}, this vdm reads "
                              f"{STATE_VERSION}")
    return state


def load_checkpoint(ckpt: Path, model: VDM, ema: EMA, optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights, EMA, optimiser and RNG states from checkpoint `ckpt`; return its state.json."""
    state = read_state(ckpt)
    device = next(model.parameters()).device
    try:
        model.load_state_dict(load_file(str(ckpt / "model.safetensors"), device=str(device)), strict=True)
        ema.load_state_dict(load_file(str(ckpt / "ema.safetensors"), device=str(device)))
        tensors = load_file(str(ckpt / "train_state.safetensors"))
        load_optimizer(optimizer, tensors, state["optimizer"])
    except (SafetensorError, OSError, RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: cannot restore the training state ({e})") from None
    restore_rng(tensors)
    return state
