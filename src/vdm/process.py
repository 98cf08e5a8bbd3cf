"""The variance-preserving Gaussian diffusion, as pure tensor functions of γ (no modules, no state).

Conventions (VDM paper, section 2): σ_t² = sigmoid(γ_t), α_t² = sigmoid(−γ_t), SNR(t) = exp(−γ_t).
All functions broadcast: pass γ already shaped to broadcast against the data (e.g. (B, 1, 1, 1)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def encode(x: Tensor, vocab_size: int = 256) -> Tensor:
    """Integer data 0..V−1 → continuous f = 2·(x + ½)/V − 1 ∈ (−1, 1) (the official EncDec.encode)."""
    x = x if x.is_floating_point() else x.to(torch.get_default_dtype())
    return 2 * ((x + 0.5) / vocab_size) - 1


def alpha_sigma(gamma: Tensor) -> tuple[Tensor, Tensor]:
    """(α, σ) with α² = sigmoid(−γ), σ² = sigmoid(γ)."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


def sample_z_t(f: Tensor, gamma_t: Tensor, eps: Tensor) -> Tensor:
    """z_t = α_t f + σ_t ε (reparameterised draw from q(z_t | x))."""
    alpha_t, sigma_t = alpha_sigma(gamma_t)
    return alpha_t * f + sigma_t * eps


def sigma2_t_given_s(gamma_s: Tensor, gamma_t: Tensor) -> Tensor:
    """σ²_{t|s} = σ_t² − α²_{t|s} σ_s² = −expm1(softplus(γ_s) − softplus(γ_t)), stable for s < t."""
    return -torch.expm1(F.softplus(gamma_s) - F.softplus(gamma_t))


def q_t_given_s(z_s: Tensor, gamma_s: Tensor, gamma_t: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of q(z_t | z_s) = N(α_{t|s} z_s, σ²_{t|s} I), s < t."""
    alpha_ts = torch.exp(0.5 * (F.logsigmoid(-gamma_t) - F.logsigmoid(-gamma_s)))
    return alpha_ts * z_s, sigma2_t_given_s(gamma_s, gamma_t).sqrt()


def posterior(z_t: Tensor, f: Tensor, gamma_s: Tensor, gamma_t: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of q(z_s | z_t, x), s < t.

    μ = (α_{t|s} σ_s²/σ_t²)·z_t + (α_s σ²_{t|s}/σ_t²)·f,  σ² = σ²_{t|s} σ_s²/σ_t².
    With c = σ²_{t|s}/σ_t² = 1 − SNR(t)/SNR(s) = −expm1(γ_s − γ_t) these are
    μ = (α_s/α_t)(1 − c)·z_t + α_s c·f and σ² = c·σ_s² (stable for s close to t).
    """
    alpha_s, sigma_s = alpha_sigma(gamma_s)
    alpha_t, sigma_t = alpha_sigma(gamma_t)
    c = -torch.expm1(gamma_s - gamma_t)
    mean = (alpha_s / alpha_t) * (1 - c) * z_t + alpha_s * c * f
    std = (sigma_s.square() * c).sqrt()
    return mean, std


def model_mean(z_t: Tensor, eps_hat: Tensor, gamma_s: Tensor, gamma_t: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of p(z_s | z_t) = q(z_s | z_t, x = x̂), x̂ = (z_t − σ_t ε̂)/α_t, s < t.

    In the official form: c = −expm1(γ_s − γ_t), mean = (α_s/α_t)·(z_t − σ_t·c·ε̂), std = σ_s·√c.
    """
    alpha_s, sigma_s = alpha_sigma(gamma_s)
    alpha_t, sigma_t = alpha_sigma(gamma_t)
    c = -torch.expm1(gamma_s - gamma_t)
    return (alpha_s / alpha_t) * (z_t - sigma_t * c * eps_hat), sigma_s * c.sqrt()


def ancestral_step(z_t: Tensor, eps_hat: Tensor, gamma_s: Tensor, gamma_t: Tensor, noise: Tensor) -> Tensor:
    """One draw z_s ~ p(z_s | z_t) with standard normal `noise` (the official sampler's update)."""
    mean, std = model_mean(z_t, eps_hat, gamma_s, gamma_t)
    return mean + std * noise


# --- deterministic and η-samplers, the probability-flow ODE (in the log-SNR λ = −γ/2) ---------------------
def log_snr(gamma: Tensor) -> Tensor:
    """λ = log(α/σ) = −γ/2, the half log signal-to-noise ratio the DPM-Solver papers integrate in."""
    return -0.5 * gamma


def data_prediction(z_t: Tensor, eps_hat: Tensor, gamma_t: Tensor) -> Tensor:
    """x̂ = (z_t − σ_t ε̂)/α_t, the denoised data the noise prediction implies (in the encoded scale f)."""
    alpha_t, sigma_t = alpha_sigma(gamma_t)
    return (z_t - sigma_t * eps_hat) / alpha_t


def ddim_step(z_t: Tensor, eps_hat: Tensor, gamma_s: Tensor, gamma_t: Tensor, eta: float = 0.0,
              noise: Tensor | None = None) -> Tensor:
    """One DDIM step t → s < t (Song, Meng & Ermon 2021, eq. 12) in VDM's variables.

    z_s = α_s x̂ + σ_s·√(1 − η²c)·ε̂ + η σ_s √c · noise, with x̂ = (z_t − σ_t ε̂)/α_t and c = 1 − SNR(t)/SNR(s)
    = −expm1(γ_s − γ_t). η = 0 is deterministic (the first-order solver of the probability-flow ODE);
    η = 1 has the ancestral step's mean and variance, those of p(z_s | z_t) = q(z_s | z_t, x̂).
    """
    alpha_s, sigma_s = alpha_sigma(gamma_s)
    c = -torch.expm1(gamma_s - gamma_t)
    z_s = alpha_s * data_prediction(z_t, eps_hat, gamma_t) + sigma_s * (1 - eta ** 2 * c).sqrt() * eps_hat
    if eta == 0:
        return z_s
    if noise is None:
        raise ValueError("ddim_step with eta > 0 needs standard normal noise")
    return z_s + eta * sigma_s * c.sqrt() * noise


def probability_flow(z: Tensor, eps_hat: Tensor, gamma: Tensor) -> Tensor:
    """dz/dγ = ½·σ·(ε̂ − σ·z), the probability-flow ODE with γ itself as the time variable.

    The variance-preserving SDE has drift −½σ_t²γ'(t)·z and squared diffusion g² = σ_t²γ'(t); the ODE
    dz/dt = drift − ½g²·∇log p_t with the score ∇log p_t = −ε̂/σ_t (Song et al. 2021, eq. 13) shares the
    diffusion's marginals q(z_t), and is γ'(t) times this. In γ the ODE no longer depends on the schedule's
    shape, only on its ends γ(0), γ(1) (as the continuous-time VLB), so an adaptive solver never has to follow
    a steep stretch of a learned γ(t).
    """
    _, sigma = alpha_sigma(gamma)
    return 0.5 * sigma * (eps_hat - sigma * z)


def probability_flow_divergence(div_eps_hat: Tensor, gamma: Tensor, dims: int) -> Tensor:
    """∇_z·(dz/dγ) = ½·σ·(∇·ε̂ − σ·D) for the ODE of `probability_flow`, D = `dims`."""
    _, sigma = alpha_sigma(gamma)
    return 0.5 * sigma * (div_eps_hat - sigma * dims)
