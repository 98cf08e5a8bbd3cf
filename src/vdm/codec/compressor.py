"""Compress and decompress lists of uint8 images with a VDM: `compress_images`, `decompress_images`.

Images are uint8 arrays shaped (H, W) or (H, W, 1) (grey) or (H, W, 3) (colour). The result of
`compress_images` is the complete `.vdmc` file (see `container.py`); its length in bits over the number of
sub-pixels is the rate, with the header and the initial bits of bits-back included.

Exactness. Decoding recomputes every distribution the encoder used, so both must compute them with
bit-identical results. They do on any machine: the network is the model's `intnet.CodingNetwork` (exact
integer sums, lookup tables and correctly rounded float64 operations), the chain and the coding distributions
use `detmath`, and the model is checked by fingerprint. Thread count, instruction set, oneDNN kernels, CPU or
CUDA and the torch version may all differ between encoder and decoder.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import constriction
import numpy as np
import torch

from vdm.checkpoint import model_fingerprint
from vdm.codec import bitsback, tiling
from vdm.codec.chain import Chain, chain_gammas, gammas, knot_errors, make_chain
from vdm.codec.container import (ERROR_KNOT_SCALE, FINGERPRINT_BYTES, MODES, SPACING_SNR, VERSION, CodecFormatError,
                                 CodingParams, Container, ImageInfo, coding_key, pack, read_header)
from vdm.codec.intnet import CodingNetwork, exact_arithmetic
from vdm.progress import progress_bar


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
    if img.ndim in (2, 3) and min(img.shape[:2]) < 1:
        raise ValueError(f"an image has zero size ({img.shape}); the file format cannot hold it")
    if img.ndim == 2:
        return 0
    if img.ndim == 3 and img.shape[2] in (1, 3):
        return 1 if img.shape[2] == 1 else 2
    raise ValueError(f"images must be (H, W), (H, W, 1) or (H, W, 3), got shape {img.shape}")


def _chw(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray((img[:, :, None] if img.ndim == 2 else img).transpose(2, 0, 1))


def _words(domain: bytes, n: int) -> np.ndarray:
    return np.frombuffer(bitsback.hash_bytes(domain, 4 * n), dtype="<u4").astype(np.uint32)


def seed_words(n: int) -> np.ndarray:
    """The fixed pseudo-random words the ANS stack starts with (the initial bits of bits-back), uint32 (n,)."""
    words = _words(b"vdm-bits-back-seed", n)
    if n:
        words[-1] |= np.uint32(1 << 31)  # an ANS stack never ends in a zero word
    return words


def topup_words(stage: int, n: int, key: bytes = b"") -> np.ndarray:
    """The pseudo-random words pushed before stage `stage` (fresh bits for its pops), uint32 (n,); `key` is the
    file's `container.coding_key`."""
    return _words(b"vdm-bits-back-top-up" + key + stage.to_bytes(4, "little"), n)


# A stage is planned to borrow at most HEADROOM·(estimated peak) + SLACK_BITS bits from the stack; if its pops
# still come within SAFE_BITS of the bottom, it is coded again with more top-up words.
HEADROOM = 1.05
SLACK_BITS = 128
SAFE_BITS = 64
# The score network's middle block attends over every pixel of a unit (cost quadratic in its pixels): units above
# this many pixels (whole planes with --tile 0) would take hours per step, so they are refused up front, by the
# encoder and by the decoder (a forged header must not make it hang).
MAX_UNIT_PIXELS = 256 * 256


def _check_unit_sizes(tiles: Sequence[tiling.Unit]) -> None:
    big = max(tiles, key=lambda u: u.h * u.w)
    if big.h * big.w > MAX_UNIT_PIXELS:
        raise ValueError(f"a {big.h}×{big.w} unit (image {big.image}) is too large to code whole: the network "
                         f"attends over all its pixels; use tiles (e.g. tile=32) or units of at most "
                         f"{MAX_UNIT_PIXELS} pixels")


def _headroom(bits: float) -> float:
    return HEADROOM * bits + SLACK_BITS


def mirror_extend(z: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """z (B, C, h, w) tiled with mirror images of itself until it is at least height × width; z stays at the
    top-left. A piece much smaller than the training images (a warm-up tile, an edge tile) is seen by the
    network inside a plausible picture rather than alone: GroupNorm statistics over an 8×8 piece are far from
    those of the 32×32 training crops, so a lone piece costs far more than inside the mosaic (measured in
    docs/compression.md, "How a file is coded")."""
    while z.shape[2] < height:
        z = torch.cat([z, z.flip(2)], dim=2)
    while z.shape[3] < width:
        z = torch.cat([z, z.flip(3)], dim=3)
    return z


EVAL_BATCH = 8  # units per coding-network evaluation: any number gives the same bits; 8 keeps the
# network's many elementwise passes in cache (measured faster than 32 on one thread)


class _Network:
    """ε̂ for the units of one stage with the model's exact coding network, EVAL_BATCH units at a time.

    Units smaller than the model's training size are evaluated inside their mirror mosaic (`mirror_extend`).
    With `threads` > 1 the evaluations of a stage run side by side on that many threads, each with one torch
    thread (the units are independent and every evaluation is exact, so the bits are the same).
    """

    def __init__(self, model, chain: Chain, conditioning: float = 0.0, threads: int = 1, version: int = VERSION):
        self.net = CodingNetwork(model, model.device, version=version)
        self.chain, self.conditioning = chain, conditioning
        self.context = int(model.config.image_size)
        self.threads = min(threads, os.cpu_count() or 1) if model.device.type == "cpu" else 1
        self.pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def __enter__(self) -> _Network:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    @torch.no_grad()
    def _eval(self, z: np.ndarray, gamma: float, single: bool = False) -> np.ndarray:
        if single:
            torch.set_num_threads(1)
        h, w = z.shape[2], z.shape[3]
        zt = mirror_extend(torch.from_numpy(z), self.context, self.context)
        return self.net.eps(zt.numpy(), gamma, self.conditioning)[:, :, :h, :w]

    def __call__(self, groups: list[np.ndarray], i: int) -> list[np.ndarray]:
        gamma = float(self.chain.gamma[i])
        n = sum(len(z) for z in groups)
        per = max(1, min(EVAL_BATCH, -(-n // self.threads)))  # enough evaluations to keep every thread busy
        jobs = [(g, j) for g, z in enumerate(groups) for j in range(0, len(z), per)]
        if self.pool is not None and len(jobs) > 1:
            saved = torch.get_num_threads()
            try:
                parts = list(self.pool.map(lambda job: self._eval(groups[job[0]][job[1]:job[1] + per], gamma, True),
                                           jobs))
            finally:
                torch.set_num_threads(saved)
        else:
            parts = [self._eval(groups[g][j:j + per], gamma) for g, j in jobs]
        out, k = [], 0
        for z in groups:
            m = -(-len(z) // per)
            out.append(np.concatenate(parts[k:k + m]))
            k += m
        return out


def coding_chain(model, params: CodingParams) -> Chain:
    """The latent chain a file with `params` walks: its T + 1 values of γ (`chain.chain_gammas`) and coefficients,
    with the reverse variances its error knots set."""
    if params.error_knots is None:
        raise ValueError("the error knots are not set (compress_images measures them)")
    density = params.spacing_density if params.spacing == SPACING_SNR else None
    gamma = chain_gammas(model, params.steps, density)
    errors = knot_errors(gamma, params.error_knots) if params.error_knots else None
    return make_chain(gamma, params.grid_bits, errors)


ERROR_KNOTS = 16  # knots of E(ε − ε̂)² the encoder measures, equally spaced in γ …
KNOT_TILES = 32  # … on at most this many of the images' tiles, spread over them …
KNOT_SEED = 0  # … with noise from this seed


@torch.no_grad()
def measure_error_knots(model, chw: Sequence[np.ndarray], tiles: Sequence[tiling.Unit]) -> tuple[int, ...]:
    """The error knots of `CodingParams.error_knots` for these images: at each of ERROR_KNOTS values of γ from
    γ(0) to γ(1), the mean over KNOT_TILES of the tiles (each inside its mirror mosaic, as the codec sees it)
    of (ε − ε̂(z))² per dimension, z = α·f + σ·ε, with the float network. Any estimate decodes (the codes are
    in the file); a closer one costs fewer bits."""
    C, vocab, side = model.config.channels, model.config.vocab_size, int(model.config.image_size)
    pick = [tiles[j] for j in np.linspace(0, len(tiles) - 1, min(KNOT_TILES, len(tiles))).round().astype(int)]
    g0, g1 = (float(v) for v in gammas(model, 1))  # the chain's ends, whatever its spacing
    rng = np.random.default_rng(KNOT_SEED)
    codes = []
    for k in range(ERROR_KNOTS):
        gamma = g0 + (g1 - g0) * k / (ERROR_KNOTS - 1)
        alpha, sigma = math.sqrt(1 / (1 + math.exp(gamma))), math.sqrt(1 / (1 + math.exp(-gamma)))
        total, count = 0.0, 0
        for idx in tiling.shape_groups(pick):
            x = np.stack([tiling.extract(chw, pick[j], C) for j in idx])
            f = (2 * x.astype(np.float64) + 1) / vocab - 1
            eps = rng.standard_normal(f.shape)
            z = torch.from_numpy(alpha * f + sigma * eps).to(model.dtype)
            h, w = z.shape[2], z.shape[3]
            zt = mirror_extend(z, side, side).to(model.device)
            eps_hat = model.eps_hat(zt, torch.full((len(zt),), gamma, dtype=model.dtype, device=model.device))
            err = eps - eps_hat[:, :, :h, :w].double().cpu().numpy()
            total, count = total + float(np.sum(err * err)), count + err.size
        codes.append(int(min(255, round(total / count * ERROR_KNOT_SCALE))))
    return tuple(codes)


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
    tiles = tiling.plan_units([im.shape for im in chw], C, params.tile)
    _check_unit_sizes(tiles)
    if params.error_knots is None:
        params = replace(params, error_knots=measure_error_knots(model, chw, tiles))
    chain = coding_chain(model, params)
    fp = model_fingerprint(model)[:FINGERPRINT_BYTES]
    key = coding_key(fp, params, infos)
    per_dim = bitsback.deficit_bits_per_dim(chain)
    coder = constriction.stream.stack.AnsCoder(seed_words(0))
    budget = 0  # bits on the stack when the current stage started; the split rule below reads it as it changes
    plan = tiling.WarmupPlan(tiles, params.warmup, lambda u: _headroom(per_dim * C * u.h * u.w) > budget)
    stages, topups, held = [], [], None
    bar = _bar(sum(u.h * u.w for u in tiles), "compressing", progress)
    with _Network(model, chain, params.conditioning, params.threads) as net, exact_arithmetic(params.threads):
        while True:
            budget, stage, need = coder.num_bits(), [], 0.0
            while True:
                u = held if held is not None else next(plan, None)
                held = None
                if u is None:
                    break
                more = per_dim * C * u.h * u.w
                if stage and (len(stage) >= params.batch or _headroom(need + more) > budget):
                    held = u  # for the next stage
                    break
                stage.append(u)
                need += more
            if not stage:
                break
            groups = [np.stack([tiling.extract(chw, stage[g], C) for g in idx]) for idx in tiling.shape_groups(stage)]
            extra = max(0, math.ceil((_headroom(need) - budget) / 32))
            while True:  # normally once; again with more fresh bits if the estimate fell short
                trial = coder.clone()
                bitsback.push_words(trial, topup_words(len(stages), extra, key))
                if bitsback.encode_stage(trial, chain, net, groups, model.config.vocab_size, key) >= SAFE_BITS:
                    break
                extra += max(8, math.ceil(0.25 * need / 32))
            coder = trial
            stages.append(len(stage))
            topups.append(extra)
            bar.update(sum(u.h * u.w for u in stage))
    bar.close()
    return pack(Container(fp, params, 0, infos, stages, coder.get_compressed(), topups, plan.flags))


def decompress_images(data: bytes, model, progress: bool = False, threads: int | None = None
                      ) -> list[DecodedImage]:
    """The images stored in a `.vdmc` file, decoded with `model` (which must be the encoder's model), with
    `threads` torch CPU threads (default: the number the encoder used; any number gives the same pixels).

    Raises `CodecFormatError` for a damaged or foreign file and `ModelMismatchError` for another model.
    """
    c = read_header(data)
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
    tiles = tiling.plan_units(shapes, C, params.tile)
    try:
        _check_unit_sizes(tiles)
    except ValueError as e:
        raise CodecFormatError(f"implausible header: {e}") from None
    try:
        units = tiling.replay_units(tiles, params.warmup, c.splits)
    except ValueError as e:
        raise CodecFormatError(f"the warm-up split flags do not match the images ({e})") from None
    if sum(c.stages) != len(units) or min(c.stages, default=1) < 1:
        raise CodecFormatError("the stage table does not match the images")
    model.eval()
    try:
        chain = coding_chain(model, params)
    except ValueError as e:  # e.g. forged spacing parameters that collapse the chain's steps
        raise CodecFormatError(f"bad coding parameters ({e})") from None
    key = coding_key(c.fingerprint, params, c.images, c.version)
    threads = threads or params.threads
    out = [np.zeros(s, dtype=np.uint8) for s in shapes]
    coder = constriction.stream.stack.AnsCoder(c.payload)
    ends = np.cumsum(c.stages)
    bar = _bar(sum(u.h * u.w for u in units), "decompressing", progress)
    try:
        with _Network(model, chain, params.conditioning, threads, c.version) as net, exact_arithmetic(threads):
            for si in range(len(c.stages) - 1, -1, -1):
                end, size = ends[si], c.stages[si]
                stage = units[end - size:end]
                idxs = tiling.shape_groups(stage)
                gshapes = [(len(idx), C, stage[idx[0]].h, stage[idx[0]].w) for idx in idxs]
                groups = bitsback.decode_stage(coder, chain, net, gshapes, model.config.vocab_size, key)
                for idx, g in zip(idxs, groups):
                    for unit_j, pixels in zip(idx, g):
                        tiling.place(out, stage[unit_j], pixels.astype(np.uint8), C)
                if not np.array_equal(bitsback.pop_words(coder, c.topups[si]), topup_words(si, c.topups[si], key)):
                    raise CodecFormatError("a stage's top-up words did not decode back: the file is corrupt")
                bar.update(sum(u.h * u.w for u in stage))
        rest = coder.get_compressed()
    except bitsback.CorruptStreamError as e:
        raise CodecFormatError(str(e)) from None
    except BaseException as e:
        if not _rejects_stream(e):
            raise  # out of memory, interrupted, a bug: not the file's fault, so not reported as corruption
        raise CodecFormatError(f"the payload does not decode ({type(e).__name__}: {e})") from None
    finally:
        bar.close()
    if not np.array_equal(rest, seed_words(c.seed_words)):
        raise CodecFormatError("the payload did not decode back to its initial state: the file is corrupt")
    return [DecodedImage(_layout(im, info.mode), info.name) for im, info in zip(out, c.images)]


def _rejects_stream(e: BaseException) -> bool:
    """Whether `e` is the entropy coder refusing an impossible stream: constriction raises ValueError or
    AssertionError, or a pyo3 PanicException (a BaseException) for a state no encoder could have made."""
    if isinstance(e, CodecFormatError | MemoryError):
        return False
    return isinstance(e, (ValueError, AssertionError, IndexError, OverflowError)) or \
        type(e).__name__ == "PanicException"


def _layout(chw: np.ndarray, mode: int) -> np.ndarray:
    hwc = chw.transpose(1, 2, 0)
    return np.ascontiguousarray(hwc[:, :, 0] if mode == 0 else hwc)


def _bar(total: int, desc: str, enabled: bool):
    return progress_bar(enabled, desc=desc, unit="px", total=total, unit_scale=True)


def rate_bits_per_subpixel(data: bytes, images: Sequence[np.ndarray]) -> float:
    """File size in bits over the number of sub-pixels (H·W·C summed over images)."""
    return 8 * len(data) / sum(im.size for im in images)
