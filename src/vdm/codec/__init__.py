"""Lossless compression with a VDM: bits-back ANS coding through the T-step latent chain (`constriction`).

`compress_images(images, model, params) -> bytes` and `decompress_images(data, model)`; the file format is in
`container.py`, the chain coder in `bitsback.py`, image files in `images.py`.
"""

from vdm.codec.compressor import (DecodedImage, ModelMismatchError, compress_images, decompress_images,
                                  rate_bits_per_subpixel, read_header)
from vdm.codec.container import CodecFormatError, CodingParams

__all__ = ["CodecFormatError", "CodingParams", "DecodedImage", "ModelMismatchError", "compress_images",
           "decompress_images", "rate_bits_per_subpixel", "read_header"]
