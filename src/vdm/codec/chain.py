"""The scalar coefficients of the T-step latent chain z_0, z_{1/T}, …, z_1 that bits-back coding walks.

Everything here is a float64 number computed once from the model's schedule: γ(t) at t_i = i/T, or T steps
between γ(0) and γ(1) spaced by the SNR-weighted density of `snr_spaced_gammas`, with the deterministic
arithmetic of `detmath` (γ from the schedule's own `exact_gamma`), so encoder and decoder derive identical
values on any machine. Latent z_{t_i}
lives on its own grid of width δ_i = σ_{t_i}·2^(−k) (k = `grid_bits`): the grid follows the noise level, so
every Gaussian in the chain spans about 2^k bins per standard deviation whatever t is. The log δ terms cancel
because each latent is popped and pushed on the same grid.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np

from vdm.codec import detmath
from vdm.codec.container import ERROR_KNOT_SCALE


@dataclass(frozen=True)
class Chain:
    """Per-step coefficients, arrays indexed by i = 0..T (i = 0 is z_0, i = T is z_1), all float64.

    gamma: γ(t_i); alpha, sigma: α_{t_i}, σ_{t_i}; delta: grid width δ_i of z_{t_i}.
    For step i = 1..T (s = t_{i−1} → t = t_i), index i of:
      q_scale, q_std: q(z_t | z_s) = N(q_scale·z_s, q_std²)   (α_{t|s}, σ_{t|s});
      p_zscale, p_escale, p_std: p(z_s | z_t) = N(p_zscale·z_t − p_escale·ε̂, p_std²)
        (α_s/α_t and α_s/α_t·σ_t·c with c = −expm1(γ_s − γ_t); p_std = σ_s·√(c·r), r = 1 without fitted
        variances, else `variance_ratio`).
    Index 0 of the step arrays is unused (NaN).
    """

    T: int
    grid_bits: int
    gamma: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    delta: np.ndarray
    q_scale: np.ndarray
    q_std: np.ndarray
    p_zscale: np.ndarray
    p_escale: np.ndarray
    p_std: np.ndarray


def gammas(model, T: int) -> np.ndarray:
    """γ(i/T) for i = 0..T (float64), the schedule's `exact_gamma` with `detmath`'s functions."""
    return np.asarray(model.gamma.exact_gamma([i / T for i in range(T + 1)], detmath), dtype=np.float64)


SPACING_INTERVALS = 4096  # the density of the SNR-weighted spacing is integrated on this many equal intervals


def snr_spaced_gammas(g0: float, g1: float, T: int, a: float, b: float) -> np.ndarray:
    """γ_0 = g0 < γ_1 < … < γ_T = g1 spaced with density ρ(γ) = (1 + e^{a·(γ − b)})^{−1/2} in γ: equal steps
    where the noise hides the data (γ ≪ b), steps growing as e^{a(γ − b)/2} above b, where ε̂ is nearly exact.

    The discrete chain's loss is ½·Σ_i expm1(γ_i − γ_{i−1})·e(γ_i) with e(γ) = E‖ε − ε̂‖², which falls with γ
    roughly as (1 + e^{a(γ − b)})^{−1}; a density ∝ e^{1/2} nearly minimises it (bench/chain_spacing.py). Deterministic:
    ρ on 4,096 equal intervals of [g0, g1] with `detmath.exp`, its trapezoid cumulative sum in order, then linear
    interpolation of the inverse at i/T of the total; Python float operations, each correctly rounded."""
    K = SPACING_INTERVALS
    g = [g0 + (g1 - g0) * (j / K) for j in range(K + 1)]
    rho = np.divide(1.0, np.sqrt(np.add(1.0, detmath.exp(np.multiply(a, np.subtract(np.array(g), b))))))
    rho = [float(r) for r in rho]
    cum = [0.0]
    for j in range(1, K + 1):
        cum.append(cum[-1] + (rho[j - 1] + rho[j]) * 0.5)
    out = [g0]
    for i in range(1, T):
        y = cum[K] * i / T
        j = min(max(bisect.bisect_right(cum, y) - 1, 0), K - 1)
        out.append(g[j] + (g[j + 1] - g[j]) * ((y - cum[j]) / (cum[j + 1] - cum[j])))
    out.append(g1)
    return np.array(out, dtype=np.float64)


def chain_gammas(model, T: int, snr_density: tuple[float, float] | None) -> np.ndarray:
    """γ_0..γ_T of the chain: γ(i/T) (uniform in t) if `snr_density` is None, else `snr_spaced_gammas`
    between γ(0) and γ(1) with the density's (a, b)."""
    if snr_density is None:
        return gammas(model, T)
    g0, g1 = (float(v) for v in gammas(model, 1))
    return snr_spaced_gammas(g0, g1, T, *snr_density)


MAX_VARIANCE_RATIO = 16.0  # r is capped here (a few very long steps would otherwise ask for huge windows)


def knot_errors(gamma: np.ndarray, codes: tuple[int, ...]) -> np.ndarray:
    """ē_i, i = 1..T (index 0 unused, NaN): the mean squared error E(ε − ε̂)² per dimension at γ_i, linear
    between the K error knots, knot k at γ_0 + (γ_T − γ_0)·k/(K − 1) holding codes[k]/ERROR_KNOT_SCALE (one knot:
    that value everywhere). Correctly rounded float64 operations only."""
    K, T = len(codes), len(gamma) - 1
    vals = [q / ERROR_KNOT_SCALE for q in codes]
    out = np.full(T + 1, np.nan)
    if K == 1:
        out[1:] = vals[0]
        return out
    for i in range(1, T + 1):
        u = (float(gamma[i]) - float(gamma[0])) / (float(gamma[T]) - float(gamma[0])) * (K - 1)
        j = min(max(int(math.floor(u)), 0), K - 2)
        w = min(max(u - j, 0.0), 1.0)
        out[i] = vals[j] * (1.0 - w) + vals[j + 1] * w
    return out


def variance_ratio(gamma: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """r_i = min(1 + x_i·ē_i, MAX_VARIANCE_RATIO), x_i = expm1(γ_i − γ_{i−1}): the reverse step's variance over the
    forward posterior's that minimises the expected KL to q(z_s | z_t, x) when E(ε − ε̂)² = ē_i per dimension
    (Analytic-DPM, Bao et al. 2022, in VDM's variables; the KL falls from ½·x·ē to ½·log(1 + x·ē) per
    dimension). Index 0 unused (NaN)."""
    r = np.full(len(gamma), np.nan)
    for i in range(1, len(gamma)):
        x = float(detmath.expm1(float(gamma[i]) - float(gamma[i - 1])))
        r[i] = min(1.0 + x * float(errors[i]), MAX_VARIANCE_RATIO)
    return r


def make_chain(gamma: np.ndarray, grid_bits: int, errors: np.ndarray | None = None) -> Chain:
    """The chain's coefficients from γ(t_0..t_T) (float64, strictly increasing), the grid resolution k and, for
    fitted reverse variances, the errors ē_i of `knot_errors` (None: the forward posterior's variance)."""
    gamma = np.asarray(gamma, dtype=np.float64)
    T = len(gamma) - 1
    if T < 1 or not np.all(np.isfinite(gamma)) or not np.all(np.diff(gamma) > 0):
        raise ValueError("γ(t) on the time grid must be finite and strictly increasing")
    alpha = np.sqrt(np.divide(1.0, np.add(1.0, detmath.exp(gamma))))  # α² = sigmoid(−γ)
    sigma = np.sqrt(np.divide(1.0, np.add(1.0, detmath.exp(np.negative(gamma)))))  # σ² = sigmoid(γ)
    delta = sigma * 2.0 ** (-grid_bits)
    ratio = variance_ratio(gamma, errors) if errors is not None else np.ones(T + 1)
    nan = np.full(T + 1, np.nan)
    q_scale, q_std, p_zscale, p_escale, p_std = (nan.copy() for _ in range(5))
    for i in range(1, T + 1):
        g_s, g_t = gamma[i - 1], gamma[i]
        q_scale[i] = alpha[i] / alpha[i - 1]
        c = -float(detmath.expm1(g_s - g_t))
        q_std[i] = sigma[i] * math.sqrt(c)  # σ_{t|s}² = σ_t² − α_{t|s}²σ_s² = σ_t²·(1 − e^{γ_s − γ_t})
        p_zscale[i] = alpha[i - 1] / alpha[i]
        p_escale[i] = p_zscale[i] * sigma[i] * c
        p_std[i] = sigma[i - 1] * math.sqrt(c * ratio[i])
    return Chain(T, grid_bits, gamma, alpha, sigma, delta, q_scale, q_std, p_zscale, p_escale, p_std)
