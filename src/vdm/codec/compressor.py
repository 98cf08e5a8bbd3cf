"""Compress and decompress lists of uint8 images with a VDM: `compress_images`, `decompress_images`.

Images are uint8 arrays shaped (H, W) or (H, W, 1) (grey) or (H, W, 3) (colour). The result of
`compress_images` is the complete `.vdmc` file (see `container.py`); its length in bits over the number of
sub-pixels is the rate, with the header and the initial bits of bits-back included.

Exactness. Decoding recomputes every distribution the encoder used, so both must run the network with
bit-identical results: the same model weights (checked by fingerprint), the same batch layout and CPU thread
count (both recorded in the file), float32 with deterministic algorithms, and the same hardware and software
(CPU model/instruction set, torch and numpy builds). A file made on one machine decodes on another only if
those give identical float results; GPU and CPU results differ, so a file made on a GPU decodes only on the
same kind of GPU.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import constriction
import numpy as np
import torch

from vdm.codec import bitsback, tiling
from vdm.codec.chain import Chain, gammas, make_chain
from vdm.codec.container import (FINGERPRINT_BYTES, MODES, CodecFormatError, CodingParams, Container,
                                 ImageInfo, pack, unpack)
from vdm.codec.fingerprint import model_fingerprint


class ModelMismatchError(ValueError):
    """The file was made with a different model than the one given for decoding."""


@dataclass
class DecodedImage:
    """One decompressed image: uint8 array in its original layout, and its stored name."""

    pixels: np.ndarray
    name: str


def image_mode(img: np.ndarray) -> int:
    """The container mode of an array: 0 grey (H, W), 1 grey (H, W, 1), 2 colour (H, W, 3)."""
    if img.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {img.dtype}")
    if img.ndim == 2:
        return 0
    if img.ndim == 3 and img.shape[2] in (1, 3):
        return 1 if img.shape[2] == 1 else 2
    raise ValueError(f"images must be (H, W), (H, W, 1) or (H, W, 3), got shape {img.shape}")


def _chw(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray((img[:, :, None] if img.ndim == 2 else img).transpose(2, 0, 1))


def seed_words(n: int) -> np.ndarray:
    """The fixed pseudo-random words the ANS stack starts with (the initial bits of bits-back), uint32 (n,)."""
    blocks = b"".join(hashlib.sha256(b"vdm-bits-back-seed" + i.to_bytes(4, "little")).digest()
                      for i in range((4 * n + 31) // 32))
    words = np.frombuffer(blocks[:4 * n], dtype="<u4").astype(np.uint32)
    if n:
        words[-1] |= np.uint32(1 << 31)  # an ANS stack never ends in a zero word
    return words


@contextmanager
def _deterministic(threads: int):
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


class _Network:
    """ε̂ for the units of one stage: units of equal shape in batches of at most `batch`, float32."""

    def __init__(self, model, chain: Chain, batch: int):
        self.model, self.chain, self.batch = model, chain, batch

    @torch.no_grad()
    def __call__(self, groups: list[np.ndarray], i: int) -> list[np.ndarray]:
        m = self.model
        gamma = torch.tensor(self.chain.gamma[i], dtype=torch.float32, device=m.device)
        out = []
        for z in groups:
            parts = []
            for j in range(0, len(z), self.batch):
                zt = torch.from_numpy(z[j:j + self.batch].astype(np.float32)).to(m.device)
                eps = m.eps_hat(zt.to(m.dtype), gamma.to(m.dtype).expand(zt.shape[0]))
                parts.append(eps.to(torch.float64).cpu().numpy())
            out.append(np.concatenate(parts))
        return out


def _stage_groups(units: Sequence[tiling.Unit]) -> list[list[int]]:
    return tiling.shape_groups(units)


def _chain(model, params: CodingParams) -> Chain:
    return make_chain(gammas(model, params.steps), params.grid_bits)


def compress_images(images: Sequence[np.ndarray], model, params: CodingParams = CodingParams(),
                    names: Sequence[str] | None = None, progress: bool = False) -> bytes:
    """The `.vdmc` file holding `images` coded with `model` (a VDM) and `params`."""
    if not len(images):
        raise ValueError("no images to compress")
    names = list(names) if names is not None else [""] * len(images)
    infos = [ImageInfo(image_mode(im), im.shape[0], im.shape[1], n) for im, n in zip(images, names)]
    C = model.config.channels
    chw = [_chw(im) for im in images]
    for im in chw:
        tiling.plane_channels(im.shape[0], C)  # raises for channel counts the model cannot code
    model.eval()
    chain = _chain(model, params)
    units = tiling.plan_units([im.shape for im in chw], C, params.tile, params.warmup)
    dims = [C * u.h * u.w for u in units]
    per_dim = bitsback.deficit_bits_per_dim(chain)
    n_seed = int(math.ceil(1.05 * per_dim * dims[0] / 32)) + 2
    coder = constriction.stream.stack.AnsCoder(seed_words(n_seed))
    net = _Network(model, chain, params.batch)
    stages, j = [], 0
    bar = _bar(len(units), "compressing", progress)
    with _deterministic(params.threads):
        while j < len(units):
            budget, k = coder.num_bits(), j + 1
            need = per_dim * dims[j]
            while k < len(units) and k - j < params.batch and need + per_dim * dims[k] <= budget:
                need += per_dim * dims[k]
                k += 1
            stage = units[j:k]
            groups = [np.stack([tiling.extract(chw, stage[g], C) for g in idx]) for idx in _stage_groups(stage)]
            bitsback.encode_stage(coder, chain, net, groups, model.config.vocab_size)
            stages.append(k - j)
            bar.update(k - j)
            j = k
    bar.close()
    fp = model_fingerprint(model)[:FINGERPRINT_BYTES]
    return pack(Container(fp, params, n_seed, infos, stages, coder.get_compressed()))


def read_header(data: bytes) -> Container:
    """Parse and check a `.vdmc` file without decoding it (raises `CodecFormatError`)."""
    return unpack(data)


def decompress_images(data: bytes, model, progress: bool = False) -> list[DecodedImage]:
    """The images stored in a `.vdmc` file, decoded with `model` (which must be the encoder's model).

    Raises `CodecFormatError` for a damaged or foreign file and `ModelMismatchError` for another model.
    """
    c = unpack(data)
    if model_fingerprint(model)[:FINGERPRINT_BYTES] != c.fingerprint:
        raise ModelMismatchError("the file was compressed with a different model (fingerprint "
                                 f"{c.fingerprint.hex()}, this model {model_fingerprint(model)[:16].hex()})")
    C = model.config.channels
    shapes = [(MODES[im.mode][0], im.height, im.width) for im in c.images]
    try:
        for s in shapes:
            tiling.plane_channels(s[0], C)
    except ValueError as e:
        raise ModelMismatchError(str(e)) from None
    params = c.params
    units = tiling.plan_units(shapes, C, params.tile, params.warmup)
    if sum(c.stages) != len(units) or min(c.stages, default=1) < 1:
        raise CodecFormatError("the stage table does not match the images")
    model.eval()
    chain = _chain(model, params)
    net = _Network(model, chain, params.batch)
    out = [np.zeros(s, dtype=np.uint8) for s in shapes]
    coder = constriction.stream.stack.AnsCoder(c.payload)
    ends = np.cumsum(c.stages)
    bar = _bar(len(units), "decompressing", progress)
    try:
        with _deterministic(params.threads):
            for end, size in zip(ends[::-1], c.stages[::-1]):
                stage = units[end - size:end]
                idxs = _stage_groups(stage)
                gshapes = [(len(idx), C, stage[idx[0]].h, stage[idx[0]].w) for idx in idxs]
                groups = bitsback.decode_stage(coder, chain, net, gshapes, model.config.vocab_size)
                for idx, g in zip(idxs, groups):
                    for unit_j, pixels in zip(idx, g):
                        tiling.place(out, stage[unit_j], pixels.astype(np.uint8), C)
                bar.update(size)
        rest = coder.get_compressed()
    except bitsback.CorruptStreamError as e:
        raise CodecFormatError(str(e)) from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # constriction rejects an impossible stream (pyo3 panics are BaseExceptions)
        raise CodecFormatError(f"the payload does not decode ({type(e).__name__}: {e})") from None
    finally:
        bar.close()
    if not np.array_equal(rest, seed_words(c.seed_words)):
        raise CodecFormatError("the payload did not decode back to its initial state: the file is corrupt")
    return [DecodedImage(_layout(im, info.mode), info.name) for im, info in zip(out, c.images)]


def _layout(chw: np.ndarray, mode: int) -> np.ndarray:
    hwc = chw.transpose(1, 2, 0)
    return np.ascontiguousarray(hwc[:, :, 0] if mode == 0 else hwc)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="tile", disable=not enabled)


def rate_bits_per_subpixel(data: bytes, images: Sequence[np.ndarray]) -> float:
    """File size in bits over the number of sub-pixels (H·W·C summed over images)."""
    return 8 * len(data) / sum(im.size for im in images)
