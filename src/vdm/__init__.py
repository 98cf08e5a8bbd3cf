"""Variational Diffusion Models (Kingma, Salimans, Poole & Ho, 2021) in PyTorch.

The names below are imported on first use, so `import vdm` (and the `vdm` command's --help) stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "VDM": "vdm.model",  # the model: schedule + score network, loss, sampler
    "VDMConfig": "vdm.model",
    "load_model": "vdm.checkpoint",  # a model file, checkpoint or run directory → VDM (eval mode)
    "save_model": "vdm.checkpoint",
    "save_pretrained": "vdm.checkpoint",  # a folder of config.json + model.safetensors (a model repository's layout)
    "convert_checkpoint": "vdm.convert",  # an official checkpoint file → VDM
    "compress_images": "vdm.codec",  # lossless bits-back compression
    "decompress_images": "vdm.codec",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vdm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
