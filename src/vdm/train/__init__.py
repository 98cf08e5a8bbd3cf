"""Training: `train(config, out_dir, resume=False, max_steps=None, max_minutes=None)` (see `vdm.train.loop`).

The names below are imported on first use, so that the command line's help does not load torch."""

from __future__ import annotations

import importlib

_EXPORTS = ("train", "TrainingError", "NonFiniteLossError")
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module("vdm.train.loop"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vdm.train' has no attribute {name!r}")
