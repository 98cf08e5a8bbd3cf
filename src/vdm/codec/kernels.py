"""Compiled CPU kernels of the coding network: its elementwise passes fused, with the same bits as its torch ops.

`intnet` computes GroupNorm + lookup, the split of a convolution's inputs at its clamp, the scatter of the
inputs beyond it, the rounding to the residual stream, and the attention block's quantisation, softmax weights
and residual add with torch operations on any device; on the CPU these kernels (numba, compiled on first use
and cached) do the same in one pass over the data instead of five to ten.
They perform the same IEEE-754 operations in the same order on each element — integer sums, which are exact in
any order, and correctly rounded products, quotients, square roots and roundings to an integer, none of them
fused (numba does not contract a·b + c into an FMA unless told to) — so they give exactly the torch path's
results; `tests/test_portable.py` checks that they do. Where numba cannot be imported (a Python or NumPy it does
not support yet), `AVAILABLE` is False and the coding network runs its torch operations on the CPU too: slower,
the same bits.
"""

from __future__ import annotations

import math

import numpy as np

try:
    import numba
    AVAILABLE = True
except ImportError:  # numba's own message names what it lacks; the torch path stands in
    numba = None
    AVAILABLE = False


def _jit(fn):
    """Compiled without the GIL (the codec evaluates units side by side on threads), cached on disk where numba
    finds a writable place for it, compiled in each process otherwise."""
    if numba is None:
        return fn
    try:
        return numba.njit(nogil=True, cache=True)(fn)
    except RuntimeError:  # "cannot cache function …: no locator available": no writable cache directory
        return numba.njit(nogil=True)(fn)


@_jit
def _moments(x, lo, hi):
    """(Σx, Σx²) over lo ≤ i < hi, each as four partial sums: exact for integers with |x| < 2^17 and at most
    2^17 terms (Σx² < 2^51)."""
    s0 = s1 = s2 = s3 = 0.0
    q0 = q1 = q2 = q3 = 0.0
    i = lo
    while i + 4 <= hi:
        a, b, c, d = x[i], x[i + 1], x[i + 2], x[i + 3]
        s0 += a
        s1 += b
        s2 += c
        s3 += d
        q0 += a * a
        q1 += b * b
        q2 += c * c
        q3 += d * d
        i += 4
    while i < hi:
        s0 += x[i]
        q0 += x[i] * x[i]
        i += 1
    return (s0 + s1) + (s2 + s3), (q0 + q1) + (q2 + q3)


@_jit
def _row_max(x):
    """max(x) of a non-empty row without NaNs, as four partial maxima (a loop the compiler vectorises; the
    maximum is the same in any order)."""
    n = len(x)
    m0 = m1 = m2 = m3 = x[0]
    i = 0
    while i + 4 <= n:
        m0 = max(m0, x[i])
        m1 = max(m1, x[i + 1])
        m2 = max(m2, x[i + 2])
        m3 = max(m3, x[i + 3])
        i += 4
    while i < n:
        m0 = max(m0, x[i])
        i += 1
    return max(max(m0, m1), max(m2, m3))


@_jit
def norm_lookup(x, groups, hw, table, width, norm_range, var_scale, eps, out_scale, a_max, out, spike_index,
                spike_excess):
    """GroupNorm of the residual stream `x` (B, C·HW) float64 (integers) with exact statistics, each value
    rounded to the normalised grid and replaced by its channel's table entry a (float32), split at the clamp:
    `out` (B, C·HW) float32 = clamp(a, ±a_max); the flat index and excess a − clamp(a) of each value beyond it go to
    `spike_index`, `spike_excess` (room for every value). Returns how many lie beyond it.

    Per group of n = C·HW/groups values: s = Σx (exact), m = ⌊(2s + n)/(2n)⌋, ss = Σ(x − m)² (exact: here
    as Σx² − 2m·s + n·m², every term and partial result an integer below 2^53 for |x| < 2^17, n ≤ 2^17),
    f = 1/√(ss/n·var_scale + eps)·out_scale, u = clamp(rint((x − m)·f), ±norm_range),
    a = table[c·width + u + norm_range]: `intnet.QuantNormAct`'s operations, then `split_at_clamp`'s."""
    B, total = x.shape
    n = total // groups
    per = n // hw  # channels per group
    index = np.empty(hw, dtype=np.uint32)
    lo, hi = np.float64(-norm_range), np.float64(norm_range)
    top, bottom = np.float32(a_max), np.float32(-a_max)  # `out` and `table` are float32
    count = 0
    for b in range(B):
        row, dest = x[b], out[b]
        for g in range(groups):
            base = g * n
            s, q = _moments(row, base, base + n)
            m = np.floor((s * 2.0 + n) / (2.0 * n))
            ss = (q - 2.0 * (m * s)) + n * (m * m)
            f = (1.0 / math.sqrt((ss / n) * var_scale + eps)) * out_scale
            for c in range(g * per, (g + 1) * per):
                src = row[c * hw:(c + 1) * hw]
                for i in range(hw):  # the table row of each value (a loop the compiler vectorises) …
                    index[i] = np.uint32(min(max(np.rint((src[i] - m) * f), lo), hi) + hi)
                entries, values = table[c * width:(c + 1) * width], dest[c * hw:(c + 1) * hw]
                beyond = 0
                for i in range(hw):  # … then the lookups, clamped …
                    v = entries[index[i]]
                    low = min(max(v, bottom), top)
                    values[i] = low
                    beyond += v != low
                if beyond:  # … and (rarely) the values beyond the clamp
                    for i in range(hw):
                        v = entries[index[i]]
                        if v != values[i]:
                            spike_index[count] = b * total + c * hw + i
                            spike_excess[count] = v - values[i]  # in the activations' precision, as the torch path
                            count += 1
    return count


@_jit
def split_at_clamp(a, a_max, low, index, excess):
    """low = clamp(a, ±a_max) (a, low flat); the flat index and excess a − low of each value beyond the clamp
    go to `index` and `excess` while they have room. Returns how many values lie beyond it (may exceed the
    room: then the caller takes its dense path)."""
    room = len(index)
    count = 0
    for i in range(len(a)):
        v = a[i]
        if v > a_max:
            low[i] = a_max
        elif v < -a_max:
            low[i] = -a_max
        else:
            low[i] = v
            continue
        if count < room:
            index[count] = i
            excess[count] = v - low[i]  # in a's precision, as the torch path computes it
        count += 1
    return count


@_jit
def scatter_spikes(out, index, excess, weight):
    """out += conv3×3(spikes), zero padding 1, in float64: the spikes are values `excess` at flat positions
    `index` of a (B, I, H, W) input; `weight` (O, I, 3, 3) float64 integers, `out` (B, O, H, W). Every product
    and sum is an integer below 2^53, so the order of the additions does not matter."""
    B, O, H, W = out.shape
    I = weight.shape[1]
    for k in range(len(index)):
        p = index[k]
        x = p % W
        y = (p // W) % H
        c = (p // (H * W)) % I
        b = p // (I * H * W)
        v = excess[k]
        for o in range(O):  # each output plane's 3×3 neighbourhood in turn: 3 cache lines, not 9·O
            plane, taps = out[b, o], weight[o, c]
            for ty in range(3):
                oy = y - ty + 1
                if 0 <= oy < H:
                    for tx in range(3):
                        ox = x - tx + 1
                        if 0 <= ox < W:
                            plane[oy, ox] += taps[ty, tx] * v


@_jit
def softmax_weights(s, factor, table, limit, e, den):
    """Attention weights from integer scores `s` (U, R, N) float32: per row, d = max − s (exact),
    u = min(rint(d·factor[unit]), limit) in float32, e = table[u] ((U, R, N), the table's float type);
    den = Σ e per row (exact integers). `intnet.QuantAttnBlock`'s operations."""
    U, R, N = s.shape
    index = np.empty(N, dtype=np.int32)
    for b in range(U):
        f = factor[b]
        for r in range(R):
            scores = s[b, r]
            m = _row_max(scores)
            for j in range(N):  # table rows (a loop the compiler vectorises) …
                index[j] = np.int32(min(np.rint((m - scores[j]) * f), limit))
            weights = e[b, r]
            a0 = a1 = a2 = a3 = 0.0  # … then the lookups and their sum (exact: integers below 2^53)
            j = 0
            while j + 4 <= N:
                w0, w1, w2, w3 = table[index[j]], table[index[j + 1]], table[index[j + 2]], table[index[j + 3]]
                weights[j], weights[j + 1], weights[j + 2], weights[j + 3] = w0, w1, w2, w3
                a0 += w0
                a1 += w1
                a2 += w2
                a3 += w3
                j += 4
            while j < N:
                weights[j] = table[index[j]]
                a0 += weights[j]
                j += 1
            den[b, r] = (a0 + a1) + (a2 + a3)


@_jit
def scale_round(acc, scale, bias, res_max, shortcut, out):
    """acc (B, O, HW) exact sums (float32 or float64) → the residual stream `out` (B, O, HW) float64 (may be
    acc itself): clamp(rint(acc·scale[o] + bias[o]), ±res_max), then, given a `shortcut` (B, O, HW),
    clamp(that + shortcut, ±res_max): `intnet.QuantLinear.residual`'s operations (a product, then a sum: two
    roundings)."""
    B, O, HW = acc.shape
    lo, hi = np.float64(-res_max), np.float64(res_max)
    for b in range(B):
        for o in range(O):
            sk, bk = scale[o], bias[o]
            values, dest = acc[b, o], out[b, o]
            for i in range(HW):
                dest[i] = min(max(np.rint(values[i] * sk + bk), lo), hi)
            if shortcut is not None:
                add = shortcut[b, o]
                for i in range(HW):
                    dest[i] = min(max(dest[i] + add[i], lo), hi)


@_jit
def affine_pow2(acc, scale, bias, bits, out, steps):
    """Per unit b of acc (B, N, O): y = acc·scale[o] + bias[o] (float64, a product then a sum; y = acc when
    `scale` is None), a power-of-two step 2^e with max|y| ≤ 2^bits·2^e (frexp of the maximum), `out` =
    rint(y/step) and `steps[b]` = step: `intnet._pow2_quantise` of a layer's outputs."""
    B, N, O = acc.shape
    for b in range(B):
        top = 0.0
        for n in range(N):
            for o in range(O):
                y = np.float64(acc[b, n, o]) if scale is None else acc[b, n, o] * scale[o] + bias[o]
                top = max(top, abs(y))
        step = math.ldexp(1.0, math.frexp(top)[1] - bits)
        steps[b] = step
        for n in range(N):
            for o in range(O):
                y = np.float64(acc[b, n, o]) if scale is None else acc[b, n, o] * scale[o] + bias[o]
                out[b, n, o] = np.rint(y / step)


@_jit
def attention_residual(acc, scale, steps, bias, res_max, x, out):
    """out (B, C, N) = clamp(x + clamp(rint((acc·scale[c])·steps[b] + bias[c]), ±res_max), ±res_max) for the
    projection's exact sums acc (B, N, C) and the residual stream x (B, C, N): the end of
    `intnet.QuantAttnBlock`."""
    B, N, C = acc.shape
    lo, hi = np.float64(-res_max), np.float64(res_max)
    for b in range(B):
        step = steps[b]
        for c in range(C):
            sc, bc = scale[c], bias[c]
            for n in range(N):
                v = min(max(np.rint((acc[b, n, c] * sc) * step + bc), lo), hi)
                out[b, c, n] = min(max(x[b, c, n] + v, lo), hi)
