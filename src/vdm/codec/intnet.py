"""The coding network: the model's ε̂ recomputed from integers, so it gives the same bits on every machine.

A float network's output depends on the order of its sums (threads, SIMD width, oneDNN kernels, the GPU), so a
file coded with it decodes only where the same order is used. `CodingNetwork` is a fixed, deterministic
function of the model's weights (nothing is calibrated on data, so the model's fingerprint identifies it) in
which every quantity that decides a coding distribution is an integer or a correctly rounded float64 operation:

- Every convolution or matrix product multiplies integer tensors whose every partial sum is an integer below
  2^24 (float32 products: `EXACT32`) or 2^53 (float64: `EXACT64`) in magnitude, so any summation order — any
  GEMM or direct convolution, any thread count, CPU or GPU — gives the exact result. This holds by
  construction: each input is clamped to ±A and each output channel's integer weights satisfy A·Σ|w| ≤ 2^24
  (resp. 2^53), their scale chosen per output channel from the L1 norm of the float weights. Per-input-channel
  activation steps are folded into the weights before they are quantised. (Winograd and FFT convolutions are
  not exact: they are switched off while coding; see `exact_arithmetic`.)
- The residual stream is fixed point, `RES_BITS` fractional bits, held as integers in float64 and clamped to
  ±`RES_MAX`, so that a GroupNorm's sums of squares over up to 2^17 values stay exact below 2^53.
- GroupNorm: the mean is the rounded integer mean, the variance an exact integer sum of squares; the
  normaliser 1/√(var + ε) a correctly rounded float64 expression; the normalised value is rounded to a grid of
  `NORM_STEP` within ±`NORM_RANGE`; the channel's affine map and the swish that follows are a lookup table
  (computed with `detmath`) from that grid straight to the next convolution's integer input.
- Attention: q·k on integers with per-unit power-of-two scales, softmax weights from a table of
  round(2^s·e^−d) on a grid of `SOFTMAX_STEP` (d = row maximum − score), values v on a per-unit power-of-two
  grid of |v| ≤ 2^v, their products summed exactly: format 6 (s, v) = (7, 7), float32 sums over blocks of
  2^(24 − s − v) = 1,024 keys, added in float64; formats 4 and 5 (15, 16), float64 sums (`container.FORMATS`).
- The time conditioning (sinusoidal embedding, the two dense layers, each block's projection) is computed once
  per chain step with `detmath` and correctly rounded dot products.

`docs/format.md` specifies the arithmetic in the same terms, for other implementations.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from vdm.codec import detmath, kernels
from vdm.codec.container import FORMATS, VERSION
from vdm.nets.unet import (GN_EPS, GN_GROUPS, TIME_SCALE, AttnBlock, ResnetBlock, fourier_frequencies,
                           timestep_log_step)

EXACT32 = 2 ** 24  # |partial sums| of float32 integer products stay within this: exact in any order
EXACT64 = 2 ** 53
RES_BITS = 10  # fractional bits of the residual stream
RES_MAX = 2 ** 17 - 1  # |residual| < 2^17·2^−RES_BITS = 128
MAX_GROUP = 2 ** 17  # values per GroupNorm group (2 channels × the largest unit, 2^16 pixels)
NORM_STEP_LOG2 = -7  # GroupNorm output grid 2^−7 …
NORM_RANGE = 64 * 128  # … within ±64 standard deviations
TYPICAL_RANGE = 5.0  # activation steps are set so that |normalised value| ≤ 5 maps into ±2^ACT_BITS …
ACT_BITS = 10  # … integers of the 3×3 convolutions' and dense layers' inputs; larger ones ("spikes", rare)
FOURIER_BITS = 11  # the first convolution's Fourier-feature inputs: integers |a| ≤ 2^11
Z_BITS = 26  # its z input: z on a grid of 2^−26 …
Z_RANGE = 16.0  # … clamped to ±16 (|a| ≤ 2^30, summed in float64)
QK_BITS_MAX = 9  # attention queries/keys: |q|, |k| ≤ 2^QK_BITS with C·2^(2·QK_BITS) ≤ 2^24
SOFTMAX_STEP_LOG2 = -8  # d = max − score on a grid of 2^−8 …
SOFTMAX_RANGE = 24 * 256  # … up to 24 (e^−24 ≈ 4e−11, treated as 24)
ATTN_SCORES = 1 << 18  # attention scores computed at a time (any number gives the same bits)
SPIKES_PER_CONV = 1000  # above one spike per this many inputs, a dense convolution takes the bulk of them …
FUSED_SPIKES_PER_CONV = 64  # … or per this many with the compiled kernels, whose scatter is faster
SWISH_MIN = -0.2784645427610738  # min over x of x·sigmoid(x)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").double().numpy()


@contextmanager
def exact_arithmetic(threads: int | None = None):
    """Within: no Winograd/FFT convolutions (NNPACK, cuDNN), IEEE float32 products (no TF32/bf16
    implicit down-conversion), and `threads` torch CPU threads if given. Restores everything after."""
    saved_threads = torch.get_num_threads()
    m, c = torch.backends.mkldnn, torch.backends.cuda.matmul
    saved = (m.conv.fp32_precision, m.matmul.fp32_precision, c.allow_tf32)
    try:
        if threads:
            torch.set_num_threads(threads)
        m.conv.fp32_precision = m.matmul.fp32_precision = "ieee"
        c.allow_tf32 = False
        with torch.backends.nnpack.flags(enabled=False), torch.backends.cudnn.flags(enabled=False):
            yield
    finally:
        torch.set_num_threads(saved_threads)
        m.conv.fp32_precision, m.matmul.fp32_precision = saved[0], saved[1]
        c.allow_tf32 = saved[2]


# --- quantised layers ----------------------------------------------------------------------------------------
class Split:
    """Integer activations (B, C, H, W) split at a layer's clamp ±a_max: `low` = clamp(a) (float32) and the flat
    positions `index` and excesses a − low (float64) of the `count` values beyond it (rare "spikes"). What the
    compiled GroupNorm lookup hands a 3×3 layer (`kernels.norm_lookup`), so the clamp costs no pass of its own."""

    def __init__(self, low: torch.Tensor, index: np.ndarray, excess: np.ndarray, count: int, a_max: int):
        self.low, self.index, self.excess, self.count, self.a_max = low, index, excess, count, a_max

    @classmethod
    def of(cls, a: torch.Tensor, a_max: int) -> Split:
        """`a` (float32, CPU) split with `kernels.split_at_clamp`."""
        flat = a.contiguous().view(-1).numpy()
        low = torch.empty(a.shape, dtype=a.dtype)  # torch's allocation: aligned as oneDNN prefers
        index, excess = np.empty(flat.size, np.int64), np.empty(flat.size, np.float64)
        count = kernels.split_at_clamp(flat, flat.dtype.type(a_max), low.view(-1).numpy(), index, excess)
        return cls(low, index, excess, count, a_max)

    def whole(self) -> torch.Tensor:
        """a itself: low + the excesses (exact: integers below 2^24)."""
        a = self.low.clone()
        a.view(-1).index_add_(0, torch.from_numpy(self.index[:self.count]),
                              torch.from_numpy(self.excess[:self.count]).to(a.dtype))
        return a


def _low(a: torch.Tensor | Split) -> torch.Tensor:
    """What a layer that clamps its inputs to ±a_max sees of `a` (a `Split`'s low part: already clamped)."""
    return a.low if isinstance(a, Split) else a


class QuantLinear:
    """y = W·a + b with integer a (|a| ≤ a_max, per-input-channel steps `in_steps`) and integer weights:
    W'[o, i] = W[o, i]·in_steps[i] quantised per output row to w_int = rint(W'/s_o) with
    s_o = Σ|W'[o]| / (bound/a_max − fan_in/2), so that a_max·Σ|w_int| ≤ bound. Output: (exact integer sum)·s_o
    + b, float64. `kernel` 3 is a 3×3 convolution with zero padding 1, 1 a 1×1 convolution / dense layer."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, in_steps: np.ndarray, a_max: int,
                 exact: int, device, in_range: bool = False, fused: bool = False):
        w = _np(weight)
        self.kernel = w.shape[2] if w.ndim == 4 else 1
        w = w.reshape(w.shape[0], w.shape[1], -1)
        w = np.multiply(w, np.asarray(in_steps, dtype=np.float64)[None, :, None])
        flat = w.reshape(w.shape[0], -1)
        fan_in = flat.shape[1]
        l1 = detmath.l1_norms(flat)
        limit = exact / a_max - fan_in / 2.0
        if limit < 1:
            raise ValueError(f"a layer with fan-in {fan_in} cannot be exact with inputs up to {a_max}")
        scale = np.where(l1 > 0, np.divide(l1, limit), 1.0)
        w_int = np.rint(np.divide(flat, scale[:, None]))
        if not np.all(np.sum(np.abs(w_int), axis=1) * a_max <= exact):
            raise AssertionError("quantised weights exceed the exactness bound")
        self.exact = exact
        dtype = torch.float32 if exact <= EXACT32 else torch.float64
        self.weight = torch.from_numpy(w_int.reshape(w.shape[0], w.shape[1], self.kernel, self.kernel)
                                       if self.kernel == 3 else w_int).to(device=device, dtype=dtype)
        if self.kernel == 3:  # row c·9 + tap: the weights from input channel c through tap (dy, dx), per output
            self.tap_rows = self.weight.to(torch.float64).permute(1, 2, 3, 0).reshape(-1, w.shape[0]).contiguous()
            self.weight64 = self.weight.to(torch.float64).numpy() if fused else None
        self.scale = torch.from_numpy(scale).to(device)
        self.bias = torch.from_numpy(_np(bias) if bias is not None else np.zeros(len(scale))).to(device)
        self.a_max = a_max
        self.in_range = in_range  # inputs never exceed ±a_max (the residual stream): no clamping pass
        self.fused = fused  # CPU, 3×3: the clamp, the scatter of spikes and `residual`'s rounding as `kernels`

    def acc(self, a: torch.Tensor | Split) -> torch.Tensor:
        """The exact integer sums (float64 tensor): a is (B, I, H, W) for kernels, (B, N, I) for dense; a
        `Split` (from a compiled GroupNorm lookup) for 3×3 kernels with the compiled kernels.

        A 3×3 kernel accepts inputs beyond ±a_max: the clamped part goes through the float32 convolution,
        the excess (rare spikes) is added in float64 by scattering its products (`_spikes`); when spikes are
        many, their clamped part goes through a second exact convolution first. Every path gives the exact
        integer sums, so which one runs does not change the result."""
        if self.kernel == 3 and self.fused:
            split = self._split(a)
            out = self._acc_fused(split)
            return out if out is not None else self._acc_plain(split.whole())
        return self._acc_plain((a.whole() if isinstance(a, Split) else a).to(self.weight.dtype))

    def _split(self, a: torch.Tensor | Split) -> Split:
        if isinstance(a, Split) and a.a_max == self.a_max:
            return a
        return Split.of((a.whole() if isinstance(a, Split) else a).to(self.weight.dtype), self.a_max)

    def _acc_plain(self, x: torch.Tensor) -> torch.Tensor:
        """`acc` with torch operations, for x already in the weights' dtype."""
        if self.kernel == 3:
            lo, hi = torch.aminmax(x)
            if -self.a_max <= float(lo) and float(hi) <= self.a_max:
                return F.conv2d(x, self.weight, padding=1).to(torch.float64)
            low = x.clamp(-self.a_max, self.a_max)
            out = F.conv2d(low, self.weight, padding=1).to(torch.float64)
            excess = low.neg_().add_(x)  # x − clamp(x), exact
            spikes = int(torch.count_nonzero(excess))
            if spikes * SPIKES_PER_CONV > excess.numel():
                # many spikes: their clamped part through a second exact convolution is cheaper than scattering
                part = excess.clamp(-self.a_max, self.a_max)
                out += F.conv2d(part, self.weight, padding=1).to(torch.float64)
                excess = torch.sub(excess, part)
            self._spikes(out, excess)
            return out
        if x.dim() == 4:
            if not self.in_range:
                x = x.clamp(-self.a_max, self.a_max)
            B, I, H, W = x.shape
            return torch.matmul(self.weight, x.reshape(B, I, H * W)).reshape(B, -1, H, W).to(torch.float64)
        return self.dense_sums(x).to(torch.float64)

    def dense_sums(self, a: torch.Tensor) -> torch.Tensor:
        """A dense layer's exact integer sums for a (B, N, I), in the weights' dtype (B, N, O)."""
        x = a.to(self.weight.dtype)
        if not self.in_range:
            x = x.clamp(-self.a_max, self.a_max)
        return torch.matmul(x, self.weight.t())

    def _acc_fused(self, split: Split, narrow: bool = False) -> torch.Tensor | None:
        """`acc` of a 3×3 kernel on split inputs, the spikes scattered by `kernels`; None when they are too many
        to scatter (the caller's dense path takes them). `narrow`: the convolution's own float32 sums where no
        input lies beyond the clamp (float64 otherwise)."""
        count = split.count
        if count > split.low.numel() // FUSED_SPIKES_PER_CONV:
            return None
        out = F.conv2d(split.low, self.weight, padding=1)
        if narrow and not count:
            return out
        out = out.to(torch.float64)
        if count:
            kernels.scatter_spikes(out.numpy(), split.index[:count], split.excess[:count], self.weight64)
        return out

    def _spikes(self, out: torch.Tensor, excess: torch.Tensor) -> None:
        """out += conv3×3(excess) for a sparse `excess`, in float64: every product and sum is an integer
        below 2^53, so the order of the scattered additions does not matter."""
        B, I, H, W = excess.shape
        flat = excess.reshape(-1)
        idx = flat.nonzero().squeeze(1)
        if not len(idx):
            return
        vals = flat.index_select(0, idx).to(torch.float64)
        x, y = idx % W, torch.div(idx, W, rounding_mode="floor") % H
        c, b = torch.div(idx, H * W, rounding_mode="floor") % I, torch.div(idx, I * H * W, rounding_mode="floor")
        taps = torch.arange(9, device=out.device)
        oy = y[:, None] - torch.div(taps, 3, rounding_mode="floor") + 1  # (K, 9): where input (y, x) lands
        ox = x[:, None] - taps % 3 + 1  # through tap (dy, dx) = divmod(tap, 3)
        k, tap = ((oy >= 0) & (oy < H) & (ox >= 0) & (ox < W)).nonzero(as_tuple=True)
        rows = self.tap_rows.index_select(0, c[k] * 9 + tap)  # (K', O): the weights of input channel c, tap
        O = out.shape[1]
        first = b[k] * (O * H * W) + oy[k, tap] * W + ox[k, tap]  # out's flat index at output channel 0
        where = first[:, None] + torch.arange(O, device=out.device) * (H * W)
        out.view(-1).index_add_(0, where.view(-1), torch.mul(rows, vals[k, None]).view(-1))

    def __call__(self, a: torch.Tensor | Split, extra_bias: torch.Tensor | None = None, res: bool = True
                 ) -> torch.Tensor:
        """Outputs, float64: acc·s_o + b (+ extra_bias, per output channel), times 2^RES_BITS if `res` (exact:
        the power of two is folded into s_o and b)."""
        y = self.acc(a)  # a new tensor: scaled in place (a product, then a sum: never fused)
        shape = (1, -1, 1, 1) if y.dim() == 4 else (1, 1, -1)
        bias = self.bias if extra_bias is None else torch.add(self.bias, extra_bias)
        k = float(2 ** RES_BITS) if res else 1.0
        return y.mul_(torch.mul(self.scale, k).view(shape)).add_(torch.mul(bias, k).view(shape))

    def residual(self, a: torch.Tensor | Split, extra_bias: torch.Tensor | None = None,
                 shortcut: torch.Tensor | None = None) -> torch.Tensor:
        """`to_residual` of the outputs, then + `shortcut` (clamped again) if given: the residual stream."""
        if not (self.fused and self.kernel == 3):
            y = to_residual(self(a, extra_bias))
            return y if shortcut is None else y.add_(shortcut).clamp_(-RES_MAX, RES_MAX)
        split = self._split(a)
        y = self._acc_fused(split, narrow=True)
        if y is None:  # too many spikes to scatter: the torch path's dense route
            y = self._acc_plain(split.whole())
        out = y if y.dtype == torch.float64 else torch.empty(y.shape, dtype=torch.float64)
        k = float(2 ** RES_BITS)
        bias = self.bias if extra_bias is None else torch.add(self.bias, extra_bias)
        B, O, H, W = y.shape
        flat = (B, O, H * W)
        kernels.scale_round(y.view(flat).numpy(), torch.mul(self.scale, k).numpy(), torch.mul(bias, k).numpy(),
                            float(RES_MAX), None if shortcut is None else shortcut.contiguous().view(flat).numpy(),
                            out.view(flat).numpy())
        return out


def to_residual(y: torch.Tensor) -> torch.Tensor:
    """Values already scaled by 2^RES_BITS (float64) → the residual stream: rounded, clamped (float64). In
    place: `y` must be a tensor no one else holds (every caller passes a layer's fresh output)."""
    return y.round_().clamp_(-RES_MAX, RES_MAX)


def act_range(gamma: np.ndarray, beta: np.ndarray, swish: bool) -> np.ndarray:
    """The largest |output| of (n·γ + β, then swish if `swish`) for |n| ≤ TYPICAL_RANGE, per channel."""
    k = TYPICAL_RANGE
    lo, hi = np.subtract(beta, np.multiply(np.abs(gamma), k)), np.add(beta, np.multiply(np.abs(gamma), k))
    if not swish:
        return np.maximum(np.abs(lo), np.abs(hi))
    top = np.maximum(np.abs(detmath.silu(lo)), np.abs(detmath.silu(hi)))
    return np.where((lo < -1.2784645) & (hi > -1.2784645), np.maximum(top, -SWISH_MIN), top)


class QuantNormAct:
    """GroupNorm (exact statistics) then the channel's affine map and swish (or nothing) as a lookup table
    whose entries are the next layer's integer inputs, |a| ≤ 2^a_bits, channel c in steps of `steps[c]`."""

    def __init__(self, norm: torch.nn.GroupNorm, swish: bool, a_bits: int, device, fused: bool = False):
        self.groups = norm.num_groups
        if norm.num_groups != min(GN_GROUPS, norm.num_channels) or norm.eps != GN_EPS:
            raise ValueError("the coding network supports GroupNorm(min(32, C), C, eps=1e-6) only")
        gamma, beta = _np(norm.weight), _np(norm.bias)
        a_max = self.a_max = 2 ** a_bits
        top = act_range(gamma, beta, swish)
        self.steps = np.where(top > 0, np.divide(top, a_max), 1.0)
        u = np.arange(-NORM_RANGE, NORM_RANGE + 1, dtype=np.float64) * 2.0 ** NORM_STEP_LOG2
        v = np.add(np.multiply(u[None, :], gamma[:, None]), beta[:, None])
        if swish:
            v = detmath.silu(v)
        table = np.rint(np.divide(v, self.steps[:, None]))  # beyond ±a_max: spikes (QuantLinear.acc)
        self.width = 2 * NORM_RANGE + 1
        self.table = torch.from_numpy(table.reshape(-1)).to(device=device, dtype=torch.float32)
        self.offsets = (torch.arange(len(gamma), device=device, dtype=torch.float64) * self.width + NORM_RANGE
                        ).view(1, -1, 1, 1)
        self.fused = fused  # CPU: statistics, rounding and lookup in one `kernels.norm_lookup` call

    def __call__(self, x: torch.Tensor) -> torch.Tensor | Split:
        """x: residual stream (B, C, H, W) → integer activations (float32 tensor holding integers; with the
        compiled kernels, split at ±2^a_bits as a `Split`)."""
        B, C, H, W = x.shape
        xs = x.view(B, self.groups, -1)
        n = xs.shape[2]
        if n > MAX_GROUP:
            raise ValueError(f"a GroupNorm group of {n} values exceeds {MAX_GROUP}: the sums would not be exact")
        if self.fused:
            out = torch.empty((B, C, H, W), dtype=torch.float32)
            index, excess = np.empty(out.numel(), np.int64), np.empty(out.numel(), np.float64)
            count = kernels.norm_lookup(x.contiguous().view(B, -1).numpy(), self.groups, H * W, self.table.numpy(),
                                        self.width, NORM_RANGE, 2.0 ** (-2 * RES_BITS), GN_EPS,
                                        2.0 ** (-RES_BITS - NORM_STEP_LOG2), float(self.a_max),
                                        out.view(B, -1).numpy(), index, excess)
            return Split(out, index, excess, count, self.a_max)
        s = _np(xs.sum(2))  # exact: integers, |partial sums| < 2^17·2^17
        m = np.floor(np.divide(np.add(np.multiply(s, 2.0), n), 2.0 * n))  # the mean, rounded (deterministically)
        d = torch.sub(xs, torch.from_numpy(m).to(x.device)[:, :, None])
        ss = _np(torch.matmul(d[:, :, None, :], d[:, :, :, None]))  # exact: |d| < 2^18, n ≤ 2^17: sums < 2^53
        var = np.multiply(np.divide(ss.reshape(B, -1), float(n)), 2.0 ** (-2 * RES_BITS))
        r = np.divide(1.0, np.sqrt(np.add(var, GN_EPS)))
        f = torch.from_numpy(np.multiply(r, 2.0 ** (-RES_BITS - NORM_STEP_LOG2))).to(x.device)
        u = d.mul_(f[:, :, None]).round_().clamp_(-NORM_RANGE, NORM_RANGE).view(B, C, H, W)
        index = u.add_(self.offsets).to(torch.int64)  # the table row of each value: exact integers
        return self.table.index_select(0, index.view(-1)).view(B, C, H, W)


def _pow2_quantise(y: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit (dim 0) power-of-two step 2^e with max|y| ≤ 2^bits·2^e: (integers as float64, steps (B,))."""
    top = _np(y.abs().flatten(1).amax(1))
    _, e = np.frexp(top)  # top = m·2^e, m in [½, 1): top/2^(e − bits) ≤ 2^bits
    step = np.ldexp(1.0, (e - bits).astype(np.int64))
    step_t = torch.from_numpy(step).to(y.device)
    shape = (-1,) + (1,) * (y.dim() - 1)
    return torch.round(torch.div(y, step_t.view(shape))), step_t


class QuantResBlock:
    """A `ResnetBlock` on the residual stream: norm1 → conv1 (+ the step's conditioning bias) → norm2 → conv2,
    plus the shortcut (a 1×1 layer with float64 sums when the width changes)."""

    def __init__(self, blk: ResnetBlock, device, fused: bool = False):
        self.norm1 = QuantNormAct(blk.norm1, True, ACT_BITS, device, fused)
        self.conv1 = QuantLinear(blk.conv1.weight, blk.conv1.bias, self.norm1.steps, 2 ** ACT_BITS, EXACT32, device,
                                 fused=fused)
        self.cond_proj = _np(blk.cond_proj.weight)
        self.norm2 = QuantNormAct(blk.norm2, True, ACT_BITS, device, fused)
        self.conv2 = QuantLinear(blk.conv2.weight, blk.conv2.bias, self.norm2.steps, 2 ** ACT_BITS, EXACT32, device,
                                 fused=fused)
        self.nin = None
        if blk.nin_shortcut is not None:
            steps = np.full(blk.nin_shortcut.weight.shape[1], 2.0 ** -RES_BITS)
            self.nin = QuantLinear(blk.nin_shortcut.weight, blk.nin_shortcut.bias, steps, RES_MAX, EXACT64, device,
                                   in_range=True)

    def __call__(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1.residual(self.norm1(x), cond)
        shortcut = to_residual(self.nin(x)) if self.nin is not None else x
        return self.conv2.residual(self.norm2(h), shortcut=shortcut)


def _chunks(B: int, N: int, most: int):
    """(b0, b1, lo, hi): units b0..b1 and query rows lo..hi with (b1 − b0)·(hi − lo)·N ≤ most (or one row)."""
    if N * N <= most:
        per = max(1, most // (N * N))
        for b0 in range(0, B, per):
            yield b0, min(B, b0 + per), 0, N
    else:
        rows = max(1, most // N)
        for b in range(B):
            for lo in range(0, N, rows):
                yield b, b + 1, lo, min(N, lo + rows)


class QuantAttnBlock:
    """Single-head self-attention over the unit's pixels, exact as described in the module docstring."""

    def __init__(self, blk: AttnBlock, device, fused: bool = False,
                 grids: tuple[int, int] = FORMATS[VERSION].attention_grids):
        """`grids`: (s, v), the file format's `attention_grids`."""
        C = blk.q.weight.shape[0]
        self.norm = QuantNormAct(blk.norm, False, ACT_BITS, device, fused)
        self.fused = fused  # CPU: quantisation, softmax weights and the residual add as `kernels`
        self.q, self.k, self.v = (QuantLinear(lin.weight, lin.bias, self.norm.steps, 2 ** ACT_BITS, EXACT32, device)
                                  for lin in (blk.q, blk.k, blk.v))
        self.proj = QuantLinear(blk.proj_out.weight, blk.proj_out.bias, np.ones(C), 2 ** ACT_BITS, EXACT32, device)
        self.qk_bits = min(QK_BITS_MAX, int(math.floor((24 - math.log2(C)) / 2)))
        self.inv_sqrt_c = 1.0 / math.sqrt(C)
        softmax_bits, self.v_bits = grids
        # weighted sums: float32 over blocks of `key_block` keys (every partial sum ≤ 2^24), or float64
        self.key_block = 2 ** (24 - softmax_bits - self.v_bits) if softmax_bits + self.v_bits <= 24 else None
        self.sum_dtype = torch.float32 if self.key_block else torch.float64
        d = np.arange(SOFTMAX_RANGE + 1, dtype=np.float64) * 2.0 ** SOFTMAX_STEP_LOG2
        self.exp_table = torch.from_numpy(np.rint(np.multiply(detmath.exp(np.negative(d)), 2.0 ** softmax_bits))
                                          ).to(device=device, dtype=self.sum_dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        N = H * W
        a = _low(self.norm(x)).flatten(2).transpose(1, 2)  # (B, N, C) integers (the dense layers clamp them)
        if self.fused:
            q32, qs = self._quantised(self.q, a, self.qk_bits, torch.float32)
            k32, ks = self._quantised(self.k, a, self.qk_bits, torch.float32)
            vt, vs = self._quantised(self.v, a, self.v_bits, self.sum_dtype, transposed=True)
        else:
            q, qs = _pow2_quantise(self.q(a, res=False), self.qk_bits)
            k, ks = _pow2_quantise(self.k(a, res=False), self.qk_bits)
            v, vs = _pow2_quantise(self.v(a, res=False), self.v_bits)
            q32, k32 = q.to(torch.float32), k.to(torch.float32)
            vt = v.transpose(1, 2).to(self.sum_dtype).contiguous()
        # u = round((max − score)·2^8) on the integer scores: |q·k| < 2^23, so max − q·k is exact in float32
        factor = torch.mul(torch.mul(torch.mul(qs, ks), self.inv_sqrt_c), 2.0 ** -SOFTMAX_STEP_LOG2)
        factor = factor.to(torch.float32)  # one correctly rounded conversion per unit
        out = torch.empty(B, N, C, dtype=torch.float64, device=x.device)
        for b0, b1, lo, hi in _chunks(B, N, ATTN_SCORES):
            s = torch.matmul(q32[b0:b1, lo:hi], k32[b0:b1].transpose(1, 2))  # exact integers
            e, den = self._weights(s, factor[b0:b1])
            num = self._weighted_sums(vt[b0:b1], e).transpose(1, 2)
            out[b0:b1, lo:hi] = num.div_(den).mul_(vs[b0:b1].view(-1, 1, 1))
        if self.fused:
            return self._output_fused(out, x)
        o, os_ = _pow2_quantise(out, ACT_BITS)
        y = self.proj.acc(o)  # (B, N, C) exact sums of the integer o
        scale = torch.mul(self.proj.scale, float(2 ** RES_BITS)).view(1, 1, -1)
        y = torch.add(torch.mul(torch.mul(y, scale), os_.view(-1, 1, 1)),
                      torch.mul(self.proj.bias, float(2 ** RES_BITS)).view(1, 1, -1))
        return torch.add(x, to_residual(y.transpose(1, 2).reshape(B, C, H, W))).clamp_(-RES_MAX, RES_MAX)

    @staticmethod
    def _quantised(layer: QuantLinear, a: torch.Tensor, bits: int, dtype: torch.dtype,
                   transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """`_pow2_quantise(layer(a, res=False), bits)` with `kernels.affine_pow2`: the integers in `dtype`,
        (B, N, O) or, `transposed`, (B, O, N); and the steps (B,)."""
        acc = layer.dense_sums(a)
        B, N, O = acc.shape
        out = torch.empty((B, O, N) if transposed else (B, N, O), dtype=dtype)
        steps = torch.empty(B, dtype=torch.float64)
        kernels.affine_pow2(acc.numpy(), layer.scale.numpy(), layer.bias.numpy(), bits,
                            (out.transpose(1, 2) if transposed else out).numpy(), steps.numpy())
        return out, steps

    def _output_fused(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The tail of `__call__` (quantised output, projection, residual add) with `kernels`."""
        B, C, H, W = x.shape
        o, os_ = torch.empty(out.shape, dtype=torch.float32), torch.empty(B, dtype=torch.float64)
        kernels.affine_pow2(out.numpy(), None, None, ACT_BITS, o.numpy(), os_.numpy())
        y = self.proj.dense_sums(o)  # (B, N, C) exact sums, float32
        res = torch.empty(B, C, H * W, dtype=torch.float64)
        k = float(2 ** RES_BITS)
        kernels.attention_residual(y.numpy(), torch.mul(self.proj.scale, k).numpy(), os_.numpy(),
                                   torch.mul(self.proj.bias, k).numpy(), float(RES_MAX),
                                   x.contiguous().view(B, C, H * W).numpy(), res.numpy())
        return res.view(B, C, H, W)

    def _weighted_sums(self, vt: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Σ_keys v·e, exact, float64 (U, C, R), of values vt (U, C, N) and weights e (U, R, N) on the grids:
        float32 sums over blocks of `key_block` keys added in float64, or one float64 sum."""
        N = e.shape[2]
        if self.key_block is None or N <= self.key_block:
            return torch.matmul(vt, e.transpose(1, 2)).to(torch.float64)
        out = None
        for k0 in range(0, N, self.key_block):
            k1 = min(N, k0 + self.key_block)
            part = torch.matmul(vt[:, :, k0:k1], e[:, :, k0:k1].transpose(1, 2)).to(torch.float64)
            out = part if out is None else out.add_(part)
        return out

    def _weights(self, s: torch.Tensor, factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax weights e = table[min(rint((max − s)·factor), range)] of integer scores s (U, R, N) float32
        (consumed), in the sums' dtype, and their row sums (U, R, 1), float64."""
        if self.fused:
            e = torch.empty(s.shape, dtype=self.sum_dtype)
            den = torch.empty(s.shape[:2] + (1,), dtype=torch.float64)
            kernels.softmax_weights(s.numpy(), factor.contiguous().numpy(), self.exp_table.numpy(),
                                    np.float32(SOFTMAX_RANGE), e.numpy(), den.numpy()[:, :, 0])
            return e, den
        d = s.sub_(s.amax(2, keepdim=True)).neg_()  # max − score, in place
        u = d.mul_(factor.view(-1, 1, 1)).round_().clamp_(max=SOFTMAX_RANGE)
        e = self.exp_table.index_select(0, u.to(torch.int64).view(-1)).view(u.shape)
        return e, e.sum(2, keepdim=True, dtype=torch.float64)


class CodingNetwork:
    """ε̂(z_t; γ_t) of `model` computed exactly (see the module docstring); built from the model's weights.

    The architecture is the float network's (`vdm.nets.unet.ScoreUNet`): the conditioning MLP
    (`cond_layers`), the input features, and the body as the ordered plan `layers`, each block or attention
    replaced by its quantised counterpart; nothing here restates the order of the layers."""

    def __init__(self, model, device: str | torch.device = "cpu", fused: bool | None = None, version: int = VERSION):
        """`fused`: the compiled CPU `kernels` for the elementwise passes (default: on the CPU, where numba is
        importable); the same bits as the torch operations, which run on other devices (and with `fused=False`).
        `version`: the file format whose arithmetic to follow (a key of `container.FORMATS`)."""
        if version not in FORMATS:
            raise ValueError(f"no coding network for format version {version}")
        net = model.score_model
        self.device = torch.device(device)
        fused = self.device.type == "cpu" and kernels.AVAILABLE if fused is None else fused
        if fused and (self.device.type != "cpu" or not kernels.AVAILABLE):
            raise ValueError("the fused kernels need numba and run on the CPU only")
        self.time_conditioning = model.time_conditioning
        self.n_embd = net.n_embd
        self.channels = model.config.channels
        self.exponents = tuple(net.fourier_exponents)
        self.dense = [(_np(layer.weight), _np(layer.bias)) for layer in net.cond_layers]
        C, w_in = self.channels, net.conv_in.weight
        self.conv_in_z = QuantLinear(w_in[:, :C], net.conv_in.bias, np.full(C, 2.0 ** -Z_BITS),
                                     int(Z_RANGE * 2 ** Z_BITS), EXACT64, self.device)
        self.conv_in_f = None
        if w_in.shape[1] > C:
            self.conv_in_f = QuantLinear(w_in[:, C:], None, np.full(w_in.shape[1] - C, 2.0 ** -FOURIER_BITS),
                                         2 ** FOURIER_BITS, EXACT32, self.device)
        grids = FORMATS[version].attention_grids
        quantised = {}  # id of a float module → its quantised counterpart
        for layer in net.layers:
            m = layer.module
            quantised[id(m)] = (QuantResBlock(m, self.device, fused) if isinstance(m, ResnetBlock)
                                else QuantAttnBlock(m, self.device, fused, grids))
        self.layers = [(quantised[id(layer.module)], layer) for layer in net.layers]
        self.norm_out = QuantNormAct(net.norm_out, True, ACT_BITS, self.device, fused)
        self.conv_out = QuantLinear(net.conv_out.weight, net.conv_out.bias, self.norm_out.steps, 2 ** ACT_BITS,
                                    EXACT32, self.device, fused=fused)
        self.blocks = [q for q, _ in self.layers if isinstance(q, QuantResBlock)]  # in conditioning order
        # handles on the quantised layers by the float network's names, None where its plan leaves one out
        # (tests, benchmarks)
        self.down, self.up, self.down_attn, self.up_attn = ([quantised.get(id(m)) for m in modules] for modules in
                                                            (net.down, net.up, net.down_attn, net.up_attn))
        self.mid1, self.mid_attn, self.mid2 = (quantised.get(id(m)) for m in
                                               (net.mid_block1, net.mid_attn, net.mid_block2))
        self._cond: dict[tuple[float, float], list[torch.Tensor]] = {}

    # --- the time conditioning, per chain step ---------------------------------------------------------------
    def block_biases(self, gamma: float, conditioning: float = 0.0) -> list[torch.Tensor]:
        """Each block's conditioning bias (float64, per channel) at log-SNR parameter γ (cached)."""
        key = (gamma, conditioning)
        if key not in self._cond:
            t_c = self.time_conditioning(gamma)
            freqs = detmath.exp(np.arange(self.n_embd // 2, dtype=np.float64) * timestep_log_step(self.n_embd))
            sin, cos = detmath.sin_cos(np.multiply(freqs, TIME_SCALE * t_c))
            emb = np.concatenate([sin, cos] + ([np.zeros(1)] if self.n_embd % 2 else []) + [np.array([conditioning])])
            for w, b in self.dense:
                emb = detmath.silu(np.add(detmath.dot(w, emb), b))
            self._cond[key] = [torch.from_numpy(detmath.dot(blk.cond_proj, emb)).to(self.device)
                               for blk in self.blocks]
        return self._cond[key]

    def first_layer(self, z: np.ndarray) -> torch.Tensor:
        """conv_in on [z, sin/cos(2ⁿ·2π·z)] (z float64 (B, C, H, W)): z as integers on a grid of 2^−Z_BITS
        (float64 sums), the Fourier features as integers of |a| ≤ 2^FOURIER_BITS (float32 sums); float64."""
        z = np.clip(np.asarray(z, dtype=np.float64), -Z_RANGE, Z_RANGE)
        y = self.conv_in_z(torch.from_numpy(np.rint(np.multiply(z, 2.0 ** Z_BITS))).to(self.device))
        if self.conv_in_f is None:
            return y
        feats = np.repeat(z, len(self.exponents), axis=1)
        mult = np.tile(np.array(fourier_frequencies(self.exponents)), z.shape[1])
        sin, cos = detmath.sin_cos(np.multiply(feats, mult[None, :, None, None]))
        a = np.rint(np.multiply(np.concatenate([sin, cos], axis=1), 2.0 ** FOURIER_BITS))
        return torch.add(y, self.conv_in_f(torch.from_numpy(a).to(self.device)))

    def eps(self, z: np.ndarray, gamma: float, conditioning: float = 0.0) -> np.ndarray:
        """ε̂ for latents z (float64 numpy, (B, C, H, W)) at γ: float64 numpy, the same bits on any machine."""
        biases = iter(self.block_biases(gamma, conditioning))
        h = to_residual(self.first_layer(z))
        skips = [h]
        for quant, layer in self.layers:
            if layer.pop_skip:
                h = torch.cat([h, skips.pop()], dim=1)
            h = quant(h, next(biases)) if isinstance(quant, QuantResBlock) else quant(h)
            if layer.push_skip:
                skips.append(h)
        out = self.conv_out(self.norm_out(h), res=False)
        zt = torch.from_numpy(np.asarray(z, dtype=np.float64)).to(self.device)
        return torch.add(out, zt).cpu().numpy()
