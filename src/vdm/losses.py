"""The negative variational lower bound of VDM, term by term, per example, in nats.

L(x) = L_prior + L_recon + L_diff (paper, eq. 11); bits per dimension is computed in `bits_per_dim` only.
Shapes: data tensors are (B, C, H, W); per-example results are (B,).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vdm.process import encode


def _sum_per_example(v: Tensor) -> Tensor:
    return v.flatten(1).sum(1)


def prior_kl(f: Tensor, gamma_1: Tensor) -> Tensor:
    """KL(q(z_1|x) ‖ N(0, I)) = ½ Σ (α_1² f² + σ_1² − log σ_1² − 1), per example (nats)."""
    alpha2, sigma2 = torch.sigmoid(-gamma_1), torch.sigmoid(gamma_1)
    log_sigma2 = F.logsigmoid(gamma_1)
    return 0.5 * _sum_per_example(alpha2 * f.square() + sigma2 - log_sigma2 - 1)


def decoder_logits(z0_rescaled: Tensor, gamma_0: Tensor, vocab_size: int = 256) -> Tensor:
    """Unnormalised log p(x_i = k | z_0) = −½((z_0/α_0 − f_k)·exp(−γ_0/2))², shape (..., V).

    The discretised decoder, factorised over dimensions (paper, appendix; official EncDec.decode).
    """
    f_k = encode(torch.arange(vocab_size, device=z0_rescaled.device), vocab_size).to(z0_rescaled.dtype)
    inv_std = torch.exp(-0.5 * gamma_0)
    return -0.5 * ((z0_rescaled.unsqueeze(-1) - f_k) * inv_std).square()


def decoder_log_probs(z0_rescaled: Tensor, gamma_0: Tensor, vocab_size: int = 256) -> Tensor:
    """log p(x_i = k | z_0) for every value k, shape (..., V); sums to one over the last axis."""
    return torch.log_softmax(decoder_logits(z0_rescaled, gamma_0, vocab_size), dim=-1)


def reconstruction_loss(x: Tensor, gamma_0: Tensor, eps_0: Tensor, vocab_size: int = 256) -> Tensor:
    """−log p(x | z_0) with z_0/α_0 = f + exp(γ_0/2)·ε_0, per example (nats); `x` integer (B, C, H, W).

    The decoder's logit of value k is −½((z_0/α_0 − f_k)/σ)², σ = exp(γ_0/2). With z_0/α_0 = f_x + σ·ε_0,
    f_x − f_k = j·δ·σ for j = x − k, δ = 2/(V·σ), the log-ratio of value k to value x is
    d_j = −j·δ·(ε_0 + j·δ/2), and −log p(x | z_0) = log(1 + Σ_{j≠0} exp(d_j)), computed with log1p. This never
    forms z_0/α_0 (in float32 the sum f_x + σ·ε_0 loses ~1e-4 of ε_0 when σ ≈ 1e-3) nor subtracts two
    nearly equal log-probabilities, so it keeps full relative precision when p(x | z_0) is close to one.

    The normaliser is summed over the values within (max|ε_0| + 10) decoder standard deviations of x (all V
    values when that window is wider): every value left out has a logit at least 50 below the logit of x, so
    the result equals the full sum over V values to a relative 1e-20, at a fraction of the cost. The window is
    used on the CPU in eager mode only; on other devices and under torch.compile the sum is over all V values.
    """
    std = torch.exp(0.5 * gamma_0.to(eps_0.dtype))
    if eps_0.device.type != "cpu" or torch.compiler.is_compiling():
        half = vocab_size  # all V values: reading the window's width would synchronise with the device or
        # break the compiled graph (on a GPU the full sum is cheap; compiled code fuses it)
    else:
        reach = (eps_0.abs().max() + 10) * std * (vocab_size / 2)  # in units of the value grid
        half = int(torch.ceil(reach.detach()).item()) + 1  # a CPU tensor: no device synchronisation
    x = x.long().unsqueeze(-1)
    if 2 * half + 1 >= vocab_size:
        k = torch.arange(vocab_size, device=x.device)
        invalid = None
    else:
        k = x + torch.arange(-half, half + 1, device=x.device)  # (..., 2·half + 1)
        invalid = (k < 0) | (k >= vocab_size)
    delta = (2.0 / vocab_size) / std  # f_{k+1} − f_k in units of σ
    j = (x - k).to(eps_0.dtype)
    d = -j * delta * (eps_0.unsqueeze(-1) + 0.5 * j * delta)
    d = d.masked_fill(j == 0 if invalid is None else invalid | (j == 0), float("-inf"))
    m = d.amax(-1).clamp_min(0)  # log(1 + Σ e^d) = m + log1p(e^-m − 1 + Σ e^(d − m)), exact in form for m = 0
    nll = m + torch.log1p(torch.expm1(-m) + torch.exp(d - m.unsqueeze(-1)).sum(-1))
    return _sum_per_example(nll)


def diffusion_loss_continuous(dgamma_t: Tensor, eps: Tensor, eps_hat: Tensor) -> Tensor:
    """½·γ'(t)·‖ε − ε̂(z_t; t)‖², per example (nats): the T → ∞ diffusion loss (paper, eq. 17)."""
    return 0.5 * dgamma_t * _sum_per_example((eps - eps_hat).square())


def diffusion_loss_discrete(gamma_s: Tensor, gamma_t: Tensor, T: int, eps: Tensor, eps_hat: Tensor) -> Tensor:
    """½·T·expm1(γ_t − γ_s)·‖ε − ε̂(z_t; t)‖², per example (nats), s = t − 1/T (paper, eq. 13).

    A one-sample estimate of the sum of the T KL terms Σ_i KL(q(z_s|z_t,x) ‖ p(z_s|z_t)).
    """
    return 0.5 * T * torch.expm1(gamma_t - gamma_s) * _sum_per_example((eps - eps_hat).square())


def discretise_time(t: Tensor, T: int) -> Tensor:
    """Round t ∈ [0, 1) up to the grid {1/T, …, 1}: ceil(t·T)/T, with t = 0 mapped to 1/T."""
    return torch.ceil(t * T).clamp_min(1) / T


def antithetic_times(batch: int, *, generator: torch.Generator | None = None, device=None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """Low-discrepancy times t_j = (u + j/B) mod 1, u ~ U(0, 1): one per stratum [j/B, (j+1)/B) shifted."""
    u = torch.rand((), generator=generator, device=device, dtype=dtype)
    return torch.remainder(u + torch.arange(batch, device=device, dtype=dtype) / batch, 1.0)


def bits_per_dim(nats: Tensor, num_dims: int) -> Tensor:
    """Nats per example → bits per dimension: L/(D·ln 2)."""
    return nats / (num_dims * math.log(2.0))
