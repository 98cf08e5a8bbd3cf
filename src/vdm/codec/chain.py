"""The scalar coefficients of the T-step latent chain z_0, z_{1/T}, …, z_1 that bits-back coding walks.

Everything here is a float64 number computed once from the model's schedule γ(t) (evaluated in the model's
float32 at t_i = i/T, then widened), so the encoder and the decoder derive identical values. Latent z_{t_i}
lives on its own grid of width δ_i = σ_{t_i}·2^(−k) (k = `grid_bits`): the grid follows the noise level, so
every Gaussian in the chain spans about 2^k bins per standard deviation whatever t is. The log δ terms cancel
because each latent is popped and pushed on the same grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


@dataclass(frozen=True)
class Chain:
    """Per-time coefficients, arrays indexed by i = 0..T (time t_i = i/T), all float64.

    gamma: γ(t_i); alpha, sigma: α_{t_i}, σ_{t_i}; delta: grid width δ_i of z_{t_i}.
    For step i = 1..T (s = t_{i−1} → t = t_i), index i of:
      q_scale, q_std: q(z_t | z_s) = N(q_scale·z_s, q_std²)   (α_{t|s}, σ_{t|s});
      p_zscale, p_escale, p_std: p(z_s | z_t) = N(p_zscale·z_t − p_escale·ε̂, p_std²)
        (α_s/α_t and α_s/α_t·σ_t·c with c = −expm1(γ_s − γ_t); p_std = σ_s·√c).
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
    """γ(i/T) for i = 0..T from the model's schedule (evaluated in its own dtype), widened to float64."""
    with torch.no_grad():
        return np.array([float(model.gamma(i / T)) for i in range(T + 1)], dtype=np.float64)


def make_chain(gamma: np.ndarray, grid_bits: int) -> Chain:
    """The chain's coefficients from γ(t_0..t_T) (float64, strictly increasing) and the grid resolution k."""
    gamma = np.asarray(gamma, dtype=np.float64)
    T = len(gamma) - 1
    if T < 1 or not np.all(np.isfinite(gamma)) or not np.all(np.diff(gamma) > 0):
        raise ValueError("γ(t) on the time grid must be finite and strictly increasing")
    alpha = np.sqrt(1.0 / (1.0 + np.exp(gamma)))  # α² = sigmoid(−γ)
    sigma = np.sqrt(1.0 / (1.0 + np.exp(-gamma)))  # σ² = sigmoid(γ)
    delta = sigma * 2.0 ** (-grid_bits)
    nan = np.full(T + 1, np.nan)
    q_scale, q_std, p_zscale, p_escale, p_std = (nan.copy() for _ in range(5))
    for i in range(1, T + 1):
        g_s, g_t = gamma[i - 1], gamma[i]
        q_scale[i] = alpha[i] / alpha[i - 1]
        q_std[i] = math.sqrt(-math.expm1(_softplus(g_s) - _softplus(g_t)))
        c = -math.expm1(g_s - g_t)
        p_zscale[i] = alpha[i - 1] / alpha[i]
        p_escale[i] = p_zscale[i] * sigma[i] * c
        p_std[i] = sigma[i - 1] * math.sqrt(c)
    return Chain(T, grid_bits, gamma, alpha, sigma, delta, q_scale, q_std, p_zscale, p_escale, p_std)
