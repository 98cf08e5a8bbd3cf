"""The small pretrained VDMs shipped inside the package.

`vdm compress` uses the newest (`DEFAULT_MODEL`) when --model is not given; `vdm decompress` finds, among all
packaged models, the one whose fingerprint the file records, so files made with an earlier packaged model keep
decoding after a newer one becomes the default. `SAMPLING_MODEL` is a model of the same size trained for
sampling (no Fourier features, so its probability flow is smooth enough for few-step solvers); it is not a
compression model and `vdm decompress` never looks at it.
"""

from __future__ import annotations

from pathlib import Path

from vdm.checkpoint import CheckpointError, load_model, model_fingerprint

PRETRAINED_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = "compress.safetensors"
SAMPLING_MODEL = "sample.safetensors"


class PretrainedMissingError(CheckpointError):
    """The packaged model file is not there (e.g. a source checkout before the model was trained), or no
    packaged model has the fingerprint a file asks for."""


def default_model_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of a packaged model file; raises `PretrainedMissingError` with what to do if it is missing."""
    path = PRETRAINED_DIR / name
    if not path.is_file():
        raise PretrainedMissingError(
            f"the packaged model {path} is missing: train one as docs/pretrained/README.md says and copy its "
            f"ema.safetensors there, or name another model (a model file, checkpoint or run folder)")
    return path


def load_default_model(map_location="cpu"):
    """The packaged compression model as a `VDM` (on `map_location`)."""
    return load_model(default_model_path(), map_location=map_location)


def packaged_models() -> list[Path]:
    """Every packaged compression model file (`compress*.safetensors`), the default first."""
    files = sorted(PRETRAINED_DIR.glob("compress*.safetensors"))
    return sorted(files, key=lambda p: p.name != DEFAULT_MODEL)


def load_packaged_model(fingerprint: bytes, map_location="cpu"):
    """The packaged model whose fingerprint starts with `fingerprint` (a file's record of its model);
    `PretrainedMissingError` naming the fingerprint when none has it."""
    for path in packaged_models():
        model = load_model(path, map_location=map_location)
        if model_fingerprint(model).startswith(bytes(fingerprint)):
            return model
    raise PretrainedMissingError(
        f"the file was made with a model (fingerprint {bytes(fingerprint).hex()}) that is not packaged with this "
        f"version of vdm ({len(packaged_models())} packaged); pass the encoder's model with --model")
