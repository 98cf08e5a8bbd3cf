"""The scalar coefficients of the T-step latent chain z_0, z_{1/T}, …, z_1 that bits-back coding walks.

Everything here is a float64 number computed once from the model's schedule γ(t) at t_i = i/T, with the
deterministic arithmetic of `detmath` (the schedule's float32 parameters widened to float64), so encoder and
decoder derive identical values on any machine. Latent z_{t_i}
lives on its own grid of width δ_i = σ_{t_i}·2^(−k) (k = `grid_bits`): the grid follows the noise level, so
every Gaussian in the chain spans about 2^k bins per standard deviation whatever t is. The log δ terms cancel
because each latent is popped and pushed on the same grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vdm.codec import detmath


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


def _param(schedule, name: str) -> np.ndarray:
    return getattr(schedule, name).detach().to("cpu").double().numpy()


def gammas(model, T: int) -> np.ndarray:
    """γ(i/T) for i = 0..T (float64), computed with `detmath` from the schedule's parameters.

    fixed: γ_min + (γ_max − γ_min)·t; learned linear: b + |w|·t; monotone network:
    |w₁|·t + b₁ + fsum_j(|w₃ⱼ|·φ(|w₂ⱼ|·(2t − 1) + b₂ⱼ))/n with φ(h) = 2·(sigmoid(h) − ½).
    """
    from vdm.schedule import FixedLinearSchedule, LearnedLinearSchedule, MonotoneNetSchedule
    sched = model.gamma
    ts = [i / T for i in range(T + 1)]
    if isinstance(sched, FixedLinearSchedule):
        return np.array([sched.gamma_min + (sched.gamma_max - sched.gamma_min) * t for t in ts])
    if isinstance(sched, LearnedLinearSchedule):
        b, w = float(_param(sched, "b")[0]), abs(float(_param(sched, "w")[0]))
        return np.array([b + w * t for t in ts])
    if isinstance(sched, MonotoneNetSchedule):
        w1, b1 = abs(float(_param(sched, "l1_weight"))), float(_param(sched, "l1_bias"))
        w2, b2 = np.abs(_param(sched, "l2_weight")), _param(sched, "l2_bias")
        w3 = np.abs(_param(sched, "l3_weight"))
        out = []
        for t in ts:
            phi = np.multiply(np.subtract(detmath.sigmoid(np.add(np.multiply(w2, 2.0 * t - 1.0), b2)), 0.5), 2.0)
            out.append(w1 * t + b1 + math.fsum(np.multiply(w3, phi)) / sched.n_features)
        return np.array(out)
    raise TypeError(f"no deterministic evaluation for the schedule {type(sched).__name__}")


def make_chain(gamma: np.ndarray, grid_bits: int) -> Chain:
    """The chain's coefficients from γ(t_0..t_T) (float64, strictly increasing) and the grid resolution k."""
    gamma = np.asarray(gamma, dtype=np.float64)
    T = len(gamma) - 1
    if T < 1 or not np.all(np.isfinite(gamma)) or not np.all(np.diff(gamma) > 0):
        raise ValueError("γ(t) on the time grid must be finite and strictly increasing")
    alpha = np.sqrt(np.divide(1.0, np.add(1.0, detmath.exp(gamma))))  # α² = sigmoid(−γ)
    sigma = np.sqrt(np.divide(1.0, np.add(1.0, detmath.exp(np.negative(gamma)))))  # σ² = sigmoid(γ)
    delta = sigma * 2.0 ** (-grid_bits)
    nan = np.full(T + 1, np.nan)
    q_scale, q_std, p_zscale, p_escale, p_std = (nan.copy() for _ in range(5))
    for i in range(1, T + 1):
        g_s, g_t = gamma[i - 1], gamma[i]
        q_scale[i] = alpha[i] / alpha[i - 1]
        c = -float(detmath.expm1(g_s - g_t))
        q_std[i] = sigma[i] * math.sqrt(c)  # σ_{t|s}² = σ_t² − α_{t|s}²σ_s² = σ_t²·(1 − e^{γ_s − γ_t})
        p_zscale[i] = alpha[i - 1] / alpha[i]
        p_escale[i] = p_zscale[i] * sigma[i] * c
        p_std[i] = sigma[i - 1] * math.sqrt(c)
    return Chain(T, grid_bits, gamma, alpha, sigma, delta, q_scale, q_std, p_zscale, p_escale, p_std)
