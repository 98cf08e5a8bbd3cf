"""Bits-back ANS coding of integer images through the T-step VDM latent chain, in the Bit-Swap order.

Encoding one *stage* (a batch of image pieces that walk the chain together), on the ANS stack `coder`:

    pop z_0 ~ q(z_0|x);  push x ~ p(x|z_0);
    for i = 1..T:  pop z_{t_i} ~ q(z_{t_i}|z_{s_i});  push z_{s_i} ~ p(z_{s_i}|z_{t_i});
    push z_1 ~ N(0, I).

Every pop of latents is preceded by `mask_stack` (see there), which makes the bits it reads independent of the
data at no cost in bits.

Decoding runs the same steps backwards with push and pop swapped. Each latent z_{t_i} is an integer index on
its grid δ_i (see `chain.py`); each Gaussian is coded as a categorical over a bounded window of ±⌈8·std⌉ bins
around the rounded mean, its probabilities the bins' masses from a table over the mean's offset (`_Gaussians`). Values a model puts outside its window (possible only for
p, never for q, whose draws come from the window) are escaped: the window's edge symbol, then the excess as
two 16-bit uniform symbols. The decoder p(x|z_0) is the categorical of `losses.decoder_logits`, restricted to
the values that q(z_0|x) can reach (the rest carries < 1e-14 of its mass).

The expected net code length of a stage is its negative ELBO with quantised latents, in bits.
The encoder and the decoder must compute bit-identical distributions: they share every formula here
(`_q_*`, `_p_*` helpers), ε̂ comes from the exact coding network (`intnet.py`), and every transcendental
function is `detmath`'s, so the distributions are the same on any machine.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import constriction
import numpy as np

from vdm.codec import detmath
from vdm.codec.chain import Chain

SUPPORT_STDS = 8.0  # half-width of every Gaussian window, in standard deviations
ESCAPE_BITS = 16  # the excess of an escaped value is sent as two uniform symbols of this many bits

_model = constriction.stream.model
_CATEGORICAL = _model.Categorical(perfect=False)
EpsFn = Callable[[list[np.ndarray], int], list[np.ndarray]]


class CorruptStreamError(ValueError):
    """The ANS payload does not decode to a valid chain (a value outside its model's support)."""


class _Gaussians:
    """Discretised Gaussians over the window [−R, R] of a rounded mean, one table per (std, R).

    Row j of the table is the distribution of N(o, std²) binned to the integers, for the mean offset
    o = j/OFFSETS − ½ (j = 0..OFFSETS): each bin's mass ∫_{k−½}^{k+½} exp(−(x − o)²/(2·std²)) dx by
    4-point Gauss–Legendre quadrature with `detmath.exp`, so every machine builds the same table
    (`constriction`'s own Gaussian calls the platform's libm, whose last bits vary between machines).
    """

    def __init__(self):
        self._cache: dict[tuple[float, int], np.ndarray] = {}

    def __call__(self, std_bins: float, R: int) -> np.ndarray:
        key = (std_bins, R)
        if key not in self._cache:
            offsets = np.arange(OFFSETS + 1, dtype=np.float64) / OFFSETS - 0.5
            k = np.arange(-R, R + 1, dtype=np.float64)
            mass = np.zeros((OFFSETS + 1, 2 * R + 1))
            scale = -0.5 / (std_bins * std_bins)
            for node, weight in GAUSS_LEGENDRE:
                d = np.subtract(np.add(k[None, :], 0.5 * node), offsets[:, None])
                mass = np.add(mass, np.multiply(weight, detmath.exp(np.multiply(np.multiply(d, d), scale))))
            self._cache[key] = mass
        return self._cache[key]


# Gauss–Legendre nodes on [−1, 1] and weights (4 points), for the bins' masses
GAUSS_LEGENDRE = ((-0.8611363115940526, 0.3478548451374538), (-0.3399810435848563, 0.6521451548625461),
                  (0.3399810435848563, 0.6521451548625461), (0.8611363115940526, 0.3478548451374538))
OFFSETS = 256  # a mean's offset from its rounded value is rounded to 1/OFFSETS of a bin


def _window(std_bins: float) -> int:
    return max(2, int(math.ceil(SUPPORT_STDS * std_bins)))


def _split_mean(mean_bins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(integer centre, table row j of the offset j/OFFSETS − ½) of means given in bins."""
    if not np.all(np.abs(mean_bins) < 2.0 ** 52):
        raise CorruptStreamError("a model mean is not finite: the stream is corrupt")
    center = np.rint(mean_bins)
    row = np.rint(np.multiply(np.subtract(mean_bins, center), OFFSETS)) + OFFSETS // 2
    return center.astype(np.int64), row.astype(np.int64)


def push_words(coder, words: np.ndarray) -> None:
    """Push uint32 `words` as pairs of uniform 16-bit symbols (exactly 32 bits each; `pop_words` inverts)."""
    w = np.asarray(words, dtype=np.int64)
    halves = np.stack([w & (2 ** ESCAPE_BITS - 1), w >> ESCAPE_BITS], axis=1).ravel().astype(np.int32)
    coder.encode_reverse(halves, _model.Uniform(2 ** ESCAPE_BITS))


def pop_words(coder, n: int) -> np.ndarray:
    """Pop `n` uint32 words pushed by `push_words`."""
    if n == 0:
        return np.zeros(0, dtype=np.uint32)
    halves = coder.decode(_model.Uniform(2 ** ESCAPE_BITS), 2 * n).astype(np.int64)
    return (halves[0::2] | (halves[1::2] << ESCAPE_BITS)).astype(np.uint32)


def push_gaussian(coder, models: _Gaussians, idx: np.ndarray, mean_bins: np.ndarray, std_bins: float,
                  escape: bool) -> None:
    """Push integer grid indices `idx` under N(mean_bins, std_bins²) quantised to unit bins.

    With `escape`, values beyond the window are allowed (edge symbol + excess); without, they are an error.
    """
    R = _window(std_bins)
    center, row = _split_mean(mean_bins)
    sym = idx - center
    outside = np.abs(sym) >= R if escape else np.abs(sym) > R
    if outside.any():
        if not escape:
            raise CorruptStreamError("a latent lies outside the support of q: the stream is corrupt")
        excess = np.abs(sym[outside]) - R
        if excess.max() >= 2 ** (2 * ESCAPE_BITS):
            raise ValueError("a latent lies absurdly far from its model's mean; cannot code it")
        push_words(coder, excess)
        sym = np.clip(sym, -R, R)
    coder.encode_reverse((sym + R).astype(np.int32), _CATEGORICAL, models(std_bins, R)[row])


def pop_gaussian(coder, models: _Gaussians, mean_bins: np.ndarray, std_bins: float, escape: bool) -> np.ndarray:
    """Pop integer grid indices drawn from N(mean_bins, std_bins²) quantised to unit bins (inverse of push)."""
    R = _window(std_bins)
    center, row = _split_mean(mean_bins)
    sym = coder.decode(_CATEGORICAL, models(std_bins, R)[row]).astype(np.int64) - R
    if escape:
        edge = np.abs(sym) == R
        if edge.any():
            excess = pop_words(coder, int(edge.sum())).astype(np.int64)
            sym[edge] = np.sign(sym[edge]) * (R + excess)
    return center + sym


# --- the distributions, shared by encoder and decoder ------------------------------------------------------
def _q0_mean(chain: Chain, f: np.ndarray) -> tuple[np.ndarray, float]:
    """q(z_0|x) = N(α_0 f, σ_0²) in bins of δ_0: (mean, std)."""
    return chain.alpha[0] * f / chain.delta[0], chain.sigma[0] / chain.delta[0]


def _q_step(chain: Chain, i: int, zs_idx: np.ndarray) -> tuple[np.ndarray, float]:
    """q(z_{t_i}|z_{s_i}) in bins of δ_i: (mean, std)."""
    zs = zs_idx * chain.delta[i - 1]
    return chain.q_scale[i] * zs / chain.delta[i], chain.q_std[i] / chain.delta[i]


def _p_step(chain: Chain, i: int, zt_idx: np.ndarray, eps: np.ndarray) -> tuple[np.ndarray, float]:
    """p(z_{s_i}|z_{t_i}) in bins of δ_{i−1}: (mean, std), with ε̂ the network's prediction (float64)."""
    zt = zt_idx * chain.delta[i]
    mean = chain.p_zscale[i] * zt - chain.p_escale[i] * eps
    return mean / chain.delta[i - 1], chain.p_std[i] / chain.delta[i - 1]


def _prior(chain: Chain, n: int) -> tuple[np.ndarray, float]:
    """N(0, 1) for z_1 in bins of δ_T."""
    return np.zeros(n), 1.0 / chain.delta[chain.T]


def _decoder_window(chain: Chain, z0_idx: np.ndarray, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """p(x|z_0) restricted to the values q(z_0|x) can reach: (first value lo (n,), probabilities (n, W)).

    log p(x = k | z_0) ∝ −½((z_0/α_0 − f_k)·exp(−γ_0/2))², f_k = 2(k + ½)/V − 1 (losses.decoder_logits).
    """
    g0 = chain.gamma[0]
    u = z0_idx * chain.delta[0] / chain.alpha[0]  # z_0/α_0, in f units
    sd_k = float(detmath.exp(0.5 * g0)) * vocab / 2  # std of p(x|z_0) in pixel values
    half = int(math.ceil(SUPPORT_STDS * (sd_k + chain.delta[0] / chain.alpha[0] * vocab / 2))) + 2
    W = min(vocab, 2 * half + 1)
    center = np.rint((u + 1) * vocab / 2 - 0.5).astype(np.int64)
    lo = np.clip(center - half, 0, vocab - W)
    k = lo[:, None] + np.arange(W)[None, :]
    f_k = 2 * (k + 0.5) / vocab - 1
    d = np.multiply(np.subtract(u[:, None], f_k), float(detmath.exp(-0.5 * g0)))
    logits = np.multiply(np.multiply(d, d), -0.5)
    if not np.all(np.isfinite(logits)):
        raise CorruptStreamError("the decoder's probabilities are not finite: the stream is corrupt")
    probs = detmath.exp(np.subtract(logits, logits.max(axis=1, keepdims=True)))
    return lo, probs


def _push_x(coder, chain: Chain, x: np.ndarray, z0_idx: np.ndarray, vocab: int) -> None:
    lo, probs = _decoder_window(chain, z0_idx, vocab)
    sym = x - lo
    if (sym < 0).any() or (sym >= probs.shape[1]).any():
        raise AssertionError("a pixel lies outside the decoder window (cannot happen for z_0 drawn from q)")
    coder.encode_reverse(sym.astype(np.int32), _CATEGORICAL, probs)


def _pop_x(coder, chain: Chain, z0_idx: np.ndarray, vocab: int) -> np.ndarray:
    lo, probs = _decoder_window(chain, z0_idx, vocab)
    return lo + coder.decode(_CATEGORICAL, probs).astype(np.int64)


# --- stages ------------------------------------------------------------------------------------------------
def _flatten(groups: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([g.reshape(-1) for g in groups]).astype(np.int64)


def _unflatten(flat: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    out, pos = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(flat[pos:pos + n].reshape(shape))
        pos += n
    return out


def _eps(eps_fn: EpsFn, chain: Chain, i: int, zt_idx: np.ndarray, shapes) -> np.ndarray:
    zt = zt_idx * chain.delta[i]
    return _flatten_f(eps_fn(_unflatten(zt, shapes), i))


def _flatten_f(groups: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([g.reshape(-1) for g in groups]).astype(np.float64)


# --- masking the bits a pop reads ----------------------------------------------------------------------------
# Latents are popped from bits that were just pushed under p. Those bits are not uniform when p ≠ q: a pushed
# symbol sits at its position in p's CDF, whose spread carries the model's error, so a latent popped from them is
# drawn from a wider law than q and the file grows. Before popping n latents, the encoder pops the region of the
# stack those pops will read as 16-bit uniform words and pushes them back XOR a fixed pseudo-random mask: a
# bijection that costs exactly 0 bits and makes the bits the pops read independent of the data, so the latents
# are drawn from q whatever the stack holds. The decoder applies the same XOR after pushing the latents back.
# The region is sized from the pops' expected cost (+10 %), so masking reads no deeper than the pops themselves.
# (What masking is worth: docs/compression.md, "How a file is coded".)
MASK_BITS = 16
SQRT_2_PI_E = 4.1327313541224930  # √(2πe)
MASK_MARGIN = 1.1


def pop_bits(std_bins: float) -> float:
    """≈ bits one pop of a Gaussian latent of std `std_bins` bins takes from the stack: log2(√(2πe)·std)."""
    return float(detmath.log2(SQRT_2_PI_E * std_bins))


def mask_words(n: int, std_bins: float) -> int:
    """How many MASK_BITS-bit words cover the stack region read by popping n latents of std `std_bins` bins."""
    bits = max(0.0, pop_bits(std_bins))
    return int(math.ceil((MASK_MARGIN * bits * n + 24) / MASK_BITS))


def hash_bytes(domain: bytes, n: int) -> bytes:
    """n pseudo-random bytes: SHA-256 in counter mode, the digests of domain ‖ uint32 LE counter (0, 1, …)
    concatenated. The same on every machine and with every library version."""
    return b"".join(hashlib.sha256(domain + i.to_bytes(4, "little")).digest() for i in range((n + 31) // 32))[:n]


def mask_values(key: bytes, step: int, k: int) -> np.ndarray:
    """The k MASK_BITS-bit mask words of chain step `step`: little-endian uint16 from
    hash_bytes(b"vdm-mask" ‖ key ‖ uint32 LE step ‖ uint32 LE k, 2k)."""
    domain = b"vdm-mask" + key + step.to_bytes(4, "little") + k.to_bytes(4, "little")
    return np.frombuffer(hash_bytes(domain, 2 * k), dtype="<u2").astype(np.int64)


def mask_stack(coder, step: int, k: int, key: bytes = b"") -> None:
    """XOR the top k MASK_BITS-bit words of the stack with the mask of `step` (its own inverse; 0 bits)."""
    uniform = _model.Uniform(1 << MASK_BITS)
    words = coder.decode(uniform, k).astype(np.int64)
    coder.encode_reverse((words ^ mask_values(key, step, k)).astype(np.int32), uniform)


def encode_stage(coder, chain: Chain, eps_fn: EpsFn, groups: Sequence[np.ndarray], vocab: int = 256,
                 key: bytes = b"") -> int:
    """Push the integer images `groups` (each (n, C, h, w)) onto `coder` by bits-back through the chain.

    `eps_fn(z_groups, i)` returns ε̂(z_{t_i}; γ(t_i)) for latents shaped like `groups` (float64 arrays).
    Returns the smallest size of the stack (bits) after any pop: if it reaches 0 the pops read past the bottom
    of the stack (zeros, not random bits), which stays decodable but draws latents far from q and costs rate.
    `key` (the file's `container.coding_key`) selects the masks; the decoder must use the same.
    """
    models = _Gaussians()
    shapes = [g.shape for g in groups]
    x = _flatten(groups)
    f = 2 * (x + 0.5) / vocab - 1
    mean, std = _q0_mean(chain, f)
    mask_stack(coder, 0, mask_words(len(x), std), key)
    z = pop_gaussian(coder, models, mean, std, escape=False)
    low = coder.num_bits()
    _push_x(coder, chain, x, z, vocab)
    for i in range(1, chain.T + 1):
        mean, std = _q_step(chain, i, z)
        mask_stack(coder, i, mask_words(len(z), std), key)
        zt = pop_gaussian(coder, models, mean, std, escape=False)
        low = min(low, coder.num_bits())
        mean, std = _p_step(chain, i, zt, _eps(eps_fn, chain, i, zt, shapes))
        push_gaussian(coder, models, z, mean, std, escape=True)
        z = zt
    mean, std = _prior(chain, len(z))
    push_gaussian(coder, models, z, mean, std, escape=True)
    return low


def decode_stage(coder, chain: Chain, eps_fn: EpsFn, shapes: Sequence[tuple[int, ...]],
                 vocab: int = 256, key: bytes = b"") -> list[np.ndarray]:
    """Inverse of `encode_stage`: pop images of the given shapes (int64 arrays) off `coder`."""
    models = _Gaussians()
    n = sum(math.prod(s) for s in shapes)
    mean, std = _prior(chain, n)
    z = pop_gaussian(coder, models, mean, std, escape=True)
    for i in range(chain.T, 0, -1):
        mean, std = _p_step(chain, i, z, _eps(eps_fn, chain, i, z, shapes))
        zs = pop_gaussian(coder, models, mean, std, escape=True)
        mean, std = _q_step(chain, i, zs)
        push_gaussian(coder, models, z, mean, std, escape=False)
        mask_stack(coder, i, mask_words(len(z), std), key)
        z = zs
    x = _pop_x(coder, chain, z, vocab)
    if (x < 0).any() or (x >= vocab).any():
        raise CorruptStreamError("decoded pixel values out of range: the stream is corrupt")
    f = 2 * (x + 0.5) / vocab - 1
    mean, std = _q0_mean(chain, f)
    push_gaussian(coder, models, z, mean, std, escape=False)
    mask_stack(coder, 0, mask_words(len(z), std), key)
    return _unflatten(x, shapes)


def deficit_bits_per_dim(chain: Chain) -> float:
    """Estimated peak number of bits a stage borrows from the stack per dimension: two latent pops in flight,
    each ≈ log2(√(2πe)·std/δ) bits (used to size stages and their top-ups; not needed for correctness)."""
    ratios = [chain.sigma[0] / chain.delta[0]] + [chain.q_std[i] / chain.delta[i] for i in range(1, chain.T + 1)]
    h = [pop_bits(r) for r in ratios]
    return max(h[i] + h[i + 1] for i in range(len(h) - 1))
