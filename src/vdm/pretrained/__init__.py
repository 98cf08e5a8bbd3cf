"""The small pretrained VDM shipped inside the package (used by `vdm compress` when --model is not given)."""

from __future__ import annotations

from pathlib import Path

from vdm.checkpoint import CheckpointError, load_model

PRETRAINED_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = "compress.safetensors"


class PretrainedMissingError(CheckpointError):
    """The packaged model file is not there (e.g. a source checkout before the model was trained)."""


def default_model_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of a packaged model file; raises `PretrainedMissingError` with what to do if it is missing."""
    path = PRETRAINED_DIR / name
    if not path.is_file():
        raise PretrainedMissingError(
            f"the packaged model {path} is missing: train one with `vdm train --preset compress` and copy its "
            f"ema.safetensors there, or pass --model RUN_OR_CHECKPOINT")
    return path


def load_default_model(map_location="cpu"):
    """The packaged compression model as a `VDM` (on `map_location`)."""
    return load_model(default_model_path(), map_location=map_location)
