"""Lossless compression with a VDM: bits-back ANS coding through the T-step latent chain (`constriction`).

`compress_images(images, model, params) -> bytes` and `decompress_images(data, model)`; the file format is in
`container.py` (and docs/format.md), the chain coder in `bitsback.py`, image files in `images.py`. The names
below are imported on first use, so that the command line's help does not load torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"DecodedImage": "compressor", "ModelMismatchError": "compressor", "compress_images": "compressor",
            "decompress_images": "compressor", "rate_bits_per_subpixel": "compressor", "read_header": "container",
            "CodecFormatError": "container", "CodingParams": "container"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"vdm.codec.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vdm.codec' has no attribute {name!r}")
