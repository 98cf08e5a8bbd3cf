"""The `.vdmc` file format: header, ANS payload, checksum. `pack` writes one; `read_header` parses one and
rejects bad input with `CodecFormatError`.

Layout (integers are unsigned LEB128 varints unless a size is given; multi-byte fixed fields little-endian):

    magic        4 bytes  b"VDMC"
    version      1 byte   the format version: a key of `FORMATS`, whose entry says what differs between them
    fingerprint 16 bytes  first 16 bytes of the model's SHA-256 fingerprint (`checkpoint.model_fingerprint`)
    steps, grid_bits, tile, warmup, batch, threads, seed_words   7 varints (the coding parameters; seed_words:
                 the number of initial words of the ANS stack)
    conditioning 8 bytes  float64, the network's conditioning input (0 unless the model was trained with
                 augmentation conditioning and the images are coded as augmented ones)
    spacing      1 byte   how the chain's T steps are spaced: 0 uniform in t, 1 SNR-weighted (`chain.py`)
    spacing_a, spacing_b  2 × int16: the SNR-weighted density's slope a and centre b, in units of 1/256
                 (these three only where `FORMATS[version].spacing_fields`; else the chain is uniform in t)
    n_knots      1 byte, then n_knots bytes: the reverse steps' error knots (`CodingParams.error_knots`; only
                 where `FORMATS[version].fitted_variance`)
    n_splits     varint, then the warm-up split flags (`tiling.WarmupPlan`), 8 per byte, least significant first
    n_runs       varint, then per run of consecutive images with equal entries: count (varint), mode
                 (1 byte: 0 grey H×W, 1 grey H×W×1, 2 RGB H×W×3), height, width (varints),
                 name length (varint) + UTF-8 name (64 unnamed 32×32 tiles take 7 bytes)
    n_stages     varint, then per stage: units (varint), top-up words (varint) — the fresh pseudo-random words
                 pushed before the stage so that its pops never read past the bottom of the stack
    payload      the whole final ANS stack, uint32 words little-endian (the rest of the file)
    crc32        4 bytes  CRC-32 of every byte before it

Every bit of the file counts towards the reported rate.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

MAGIC = b"VDMC"


@dataclass(frozen=True)
class FormatRules:
    """What a format version fixes beyond the layout above: the one place where versions differ."""

    spacing_fields: bool  # the header carries the chain's spacing fields (without them: uniform in t)
    threads_in_key: bool  # the encoder's thread count is part of `coding_key` (so it changes the file)
    attention_grids: tuple[int, int]  # (s, v): attention's softmax weights round(2^s·e^−d) and values
    # |v| ≤ 2^v (per-unit power-of-two step); s + v ≤ 24: float32 sums over blocks of 2^(24 − s − v) keys,
    # otherwise float64 sums (`intnet.QuantAttnBlock`)
    fitted_variance: bool = False  # the header carries error knots; p(z_s | z_t) has the variance fitted to
    # the step (`chain.make_chain`) instead of the forward posterior's


FORMATS = {  # every version this vdm reads; the newest is the one it writes
    4: FormatRules(spacing_fields=False, threads_in_key=True, attention_grids=(15, 16)),
    5: FormatRules(spacing_fields=True, threads_in_key=True, attention_grids=(15, 16)),
    6: FormatRules(spacing_fields=True, threads_in_key=False, attention_grids=(7, 7)),
    7: FormatRules(spacing_fields=True, threads_in_key=False, attention_grids=(7, 7), fitted_variance=True),
}
VERSION = max(FORMATS)
FINGERPRINT_BYTES = 16
MODES = {0: (1, 2), 1: (1, 3), 2: (3, 3)}  # mode → (channels, array dimensions)
MAX_SIDE = 1 << 16  # largest height or width accepted from a file
MAX_PIXELS = 1 << 28  # largest total number of pixels accepted from a file
MAX_NAME = 4096
MAX_BATCH = 1024  # units per network call
MAX_THREADS = 256
MAX_KNOTS = 64
ERROR_KNOT_SCALE = 128  # an error knot's code q stands for the mean squared error q/128 per dimension (0 … 1.99)
SPACING_T, SPACING_SNR = 0, 1  # CodingParams.spacing: steps uniform in t, or SNR-weighted in γ
SPACINGS = {"auto": -1, "t": SPACING_T, "snr": SPACING_SNR}  # names of CodingParams.spacing (command line)
SNR_SPACING_MIN_STEPS = 50  # below, a few big steps even in t lose less than SNR-weighted ones (the packaged
# model up to T = 20 at least: bench/results/chain_spacing_*.txt)


class CodecFormatError(ValueError):
    """A compressed file that is not a valid `.vdmc` file (truncated, corrupted or of another format)."""


@dataclass(frozen=True)
class ImageInfo:
    """Shape and mode of one coded image, and its name (may be empty)."""

    mode: int
    height: int
    width: int
    name: str = ""

    @property
    def channels(self) -> int:
        return MODES[self.mode][0]


@dataclass(frozen=True)
class CodingParams:
    """The parameters of bits-back coding; stored in the file and needed unchanged to decode it."""

    steps: int = 200  # T, the number of discrete steps of the latent chain (rate vs speed: bench/compress.py)
    grid_bits: int = 2  # k: latent z_t is quantised to a grid of width σ_t·2^−k
    tile: int = 32  # tile side in pixels; 0 codes every image plane whole
    warmup: int = 8  # smallest side of the warm-up pieces (tiling.WarmupPlan); 0 for no warm-up
    batch: int = 32  # units per network call and per stage (the stage plan depends on it, so it is recorded)
    threads: int = 1  # torch CPU threads the encoder used (the decoder's default; any count gives the same bits)
    conditioning: float = 0.0  # the network's conditioning input (augmentation-conditioned models; 0 = none)
    spacing: int = -1  # the chain's steps: SPACING_T or SPACING_SNR (chain.snr_spaced_gammas);
    # −1 (default): 1 when steps ≥ SNR_SPACING_MIN_STEPS, else 0 (with a few big steps even ones lose less)
    spacing_a: int = 128  # its slope a = spacing_a/256 (0.5) …
    spacing_b: int = -1920  # … and centre b = spacing_b/256 (−7.5): fitted to a packaged model's e(γ)
    # (bench/chain_spacing.py; bench/results/chain_spacing_T200.txt)
    error_knots: tuple[int, ...] | None = None  # E(ε − ε̂)² per dimension at equally spaced γ from γ(0) to γ(1),
    # in 1/ERROR_KNOT_SCALE (codes 0..255), setting each reverse step's variance (`chain.knot_errors`); () for
    # the forward posterior's variance; None (default): the encoder measures them on the images it codes

    def __post_init__(self):
        if self.spacing == -1:
            object.__setattr__(self, "spacing", SPACING_SNR if self.steps >= SNR_SPACING_MIN_STEPS else SPACING_T)
        # bounds on what a file may ask of the decoder before anything is allocated
        for name, top in (("steps", 10_000), ("batch", MAX_BATCH), ("threads", MAX_THREADS)):
            if not 1 <= getattr(self, name) <= top:
                raise ValueError(f"{name} must lie in 1..{top}, got {getattr(self, name)}")
        if not 0 <= self.grid_bits <= 12:
            raise ValueError(f"grid_bits must lie in 0..12, got {self.grid_bits}")
        if self.tile < 0 or self.warmup < 0:
            raise ValueError("tile and warmup must be non-negative")
        if not -1e6 <= self.conditioning <= 1e6:  # also refuses NaN
            raise ValueError(f"conditioning must be a finite number, got {self.conditioning}")
        if self.spacing not in (SPACING_T, SPACING_SNR):
            raise ValueError(f"spacing must be 0 (uniform in t) or 1 (SNR-weighted), got {self.spacing}")
        if not (0 <= self.spacing_a < 2 ** 15 and -2 ** 15 <= self.spacing_b < 2 ** 15):
            raise ValueError(f"spacing_a must lie in 0..32767 and spacing_b in -32768..32767, got "
                             f"{self.spacing_a}, {self.spacing_b}")
        if self.error_knots is not None:
            knots = tuple(self.error_knots)
            if len(knots) > MAX_KNOTS or not all(isinstance(q, int) and 0 <= q <= 255 for q in knots):
                raise ValueError(f"error_knots must be at most {MAX_KNOTS} integers in 0..255, got {knots!r}")
            object.__setattr__(self, "error_knots", knots)

    @property
    def spacing_density(self) -> tuple[float, float]:
        """(a, b) of the SNR-weighted spacing density (`chain.snr_spaced_gammas`), from their 1/256 units."""
        return self.spacing_a / 256, self.spacing_b / 256


@dataclass
class Container:
    """The decoded contents of a `.vdmc` file."""

    fingerprint: bytes
    params: CodingParams
    seed_words: int
    images: list[ImageInfo]
    stages: list[int]
    payload: np.ndarray = field(repr=False)  # uint32 words
    topups: list[int] | None = None  # top-up words pushed before each stage (None: none)
    splits: list[bool] = field(default_factory=list)  # warm-up split flags (tiling.WarmupPlan)
    version: int = VERSION  # the file's format version (a key of FORMATS)

    def __post_init__(self):
        if self.topups is None:
            self.topups = [0] * len(self.stages)
        if len(self.topups) != len(self.stages):
            raise ValueError("one top-up count per stage")


def _varint(n: int) -> bytes:
    if n < 0:
        raise ValueError("varints are unsigned")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


class _Reader:
    def __init__(self, data: bytes, end: int):
        self.data, self.pos, self.end = data, 0, end

    def take(self, n: int) -> bytes:
        if self.pos + n > self.end:
            raise CodecFormatError("the file ends inside its header (truncated)")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def varint(self, limit: int = 1 << 40) -> int:
        n, shift = 0, 0
        while True:
            b = self.take(1)[0]
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
            if shift > 42:
                raise CodecFormatError("malformed header (overlong number)")
        if n > limit:
            raise CodecFormatError(f"malformed header (value {n} exceeds {limit})")
        return n


def pack(c: Container) -> bytes:
    """The bytes of a `.vdmc` file."""
    p = c.params
    if c.version != VERSION:
        raise ValueError(f"only format version {VERSION} is written")
    out = bytearray(MAGIC)
    out.append(VERSION)
    if len(c.fingerprint) != FINGERPRINT_BYTES:
        raise ValueError("fingerprint must be 16 bytes")
    out += c.fingerprint
    for v in (p.steps, p.grid_bits, p.tile, p.warmup, p.batch, p.threads, c.seed_words):
        out += _varint(v)
    out += struct.pack("<d", p.conditioning) + _spacing(p) + _knots(p)
    out += _varint(len(c.splits)) + np.packbits(np.asarray(c.splits, dtype=bool), bitorder="little").tobytes()
    out += _image_table(c.images)
    out += _varint(len(c.stages))
    for s, t in zip(c.stages, c.topups):
        out += _varint(s) + _varint(t)
    out += np.asarray(c.payload, dtype="<u4").tobytes()
    out += struct.pack("<I", zlib.crc32(bytes(out)))
    return bytes(out)


def _image_table(images: list[ImageInfo]) -> bytes:
    runs: list[list] = []
    for im in images:
        if runs and runs[-1][1] == im:
            runs[-1][0] += 1
        else:
            runs.append([1, im])
    out = bytearray(_varint(len(runs)))
    for count, im in runs:
        name = im.name.encode("utf-8")
        if len(name) > MAX_NAME:
            raise ValueError(f"image name longer than {MAX_NAME} bytes")
        out += _varint(count)
        out.append(im.mode)
        out += _varint(im.height) + _varint(im.width) + _varint(len(name)) + name
    return bytes(out)


def _spacing(p: CodingParams) -> bytes:
    return struct.pack("<Bhh", p.spacing, p.spacing_a, p.spacing_b)


def _knots(p: CodingParams) -> bytes:
    knots = p.error_knots or ()  # None (not measured) is written as none: the posterior variance
    return bytes([len(knots)]) + bytes(knots)


def coding_key(fingerprint: bytes, params: CodingParams, images: list[ImageInfo], version: int = VERSION) -> bytes:
    """SHA-256 of what the header says before coding starts: b"vdm-coding-key", the version byte, the 16-byte
    fingerprint, the coding-parameter varints but threads (with it where the format's `threads_in_key`), the
    float64 conditioning, the spacing fields and the error knots (where the format has them) and the image table, laid out as in the
    file. The masks and top-up words of the stream are derived from it, so a header altered after encoding (its
    checksum recomputed) no longer decodes: the stream fails its checks instead of yielding other pixels. The
    thread count is a performance setting: formats that leave it out never change a file with it."""
    p, rules = params, FORMATS[version]
    h = hashlib.sha256(b"vdm-coding-key" + bytes([version]) + bytes(fingerprint))
    for v in (p.steps, p.grid_bits, p.tile, p.warmup, p.batch) + ((p.threads,) if rules.threads_in_key else ()):
        h.update(_varint(v))
    h.update(struct.pack("<d", p.conditioning))
    if rules.spacing_fields:
        h.update(_spacing(p))
    if rules.fitted_variance:
        h.update(_knots(p))
    h.update(_image_table(images))
    return h.digest()


def read_header(data: bytes) -> Container:
    """Parse and check a `.vdmc` file without decoding it: its header, and its payload as words; raises
    `CodecFormatError` saying what is wrong."""
    if data[:4] != MAGIC[:len(data)] or not data:
        raise CodecFormatError("not a vdm compressed file (bad magic bytes)")
    if len(data) < 4 + 1 + FINGERPRINT_BYTES + 4:
        raise CodecFormatError(f"the file is truncated ({len(data)} bytes)")
    (crc,) = struct.unpack("<I", data[-4:])
    if zlib.crc32(data[:-4]) != crc:
        raise CodecFormatError("checksum mismatch: the file is truncated or corrupted")
    r = _Reader(data, len(data) - 4)
    r.take(4)
    version = r.take(1)[0]
    if version not in FORMATS:
        older = " (written by an older vdm: decode it with that version)" if version < VERSION else ""
        raise CodecFormatError(f"format version {version}; this vdm reads versions "
                               f"{', '.join(map(str, sorted(FORMATS)))}{older}")
    fingerprint = r.take(FINGERPRINT_BYTES)
    vals = [r.varint(1 << 20) for _ in range(7)]
    (conditioning,) = struct.unpack("<d", r.take(8))
    spacing = struct.unpack("<Bhh", r.take(5)) if FORMATS[version].spacing_fields else (SPACING_T, 0, 0)
    knots = tuple(r.take(r.take(1)[0])) if FORMATS[version].fitted_variance else ()
    try:
        params = CodingParams(*vals[:6], conditioning=conditioning, spacing=spacing[0], spacing_a=spacing[1],
                              spacing_b=spacing[2], error_knots=knots)
    except ValueError as e:
        raise CodecFormatError(f"bad coding parameters ({e})") from None
    n_splits = r.varint(MAX_PIXELS)
    splits = np.unpackbits(np.frombuffer(r.take((n_splits + 7) // 8), np.uint8), bitorder="little")[:n_splits]
    images, pixels = [], 0
    for _ in range(r.varint(1 << 20)):
        count = r.varint(MAX_PIXELS)
        if count < 1:
            raise CodecFormatError("malformed image table (empty run)")
        mode = r.take(1)[0]
        if mode not in MODES:
            raise CodecFormatError(f"unknown image mode {mode}")
        h, w = r.varint(MAX_SIDE), r.varint(MAX_SIDE)
        if h < 1 or w < 1:
            raise CodecFormatError("an image has zero size")
        pixels += count * h * w * MODES[mode][0]
        if pixels > MAX_PIXELS:
            raise CodecFormatError("the images are implausibly large")
        try:
            name = r.take(r.varint(MAX_NAME)).decode("utf-8")
        except UnicodeDecodeError:
            raise CodecFormatError("an image name is not UTF-8") from None
        images += [ImageInfo(mode, h, w, name)] * count
    stages, topups = [], []
    for _ in range(r.varint(MAX_PIXELS)):
        stages.append(r.varint(MAX_PIXELS))
        topups.append(r.varint(MAX_PIXELS))
    rest = r.end - r.pos
    if rest % 4 or rest == 0:
        raise CodecFormatError("the payload is not a whole number of 32-bit words")
    payload = np.frombuffer(data[r.pos:r.end], dtype="<u4").astype(np.uint32)
    if payload[-1] == 0:
        raise CodecFormatError("malformed payload (ends in a zero word)")
    if vals[6] + sum(topups) > len(payload):
        raise CodecFormatError("malformed header (more initial and top-up words than payload)")
    return Container(fingerprint, params, vals[6], images, stages, payload, topups, splits.astype(bool).tolist(),
                     version)
