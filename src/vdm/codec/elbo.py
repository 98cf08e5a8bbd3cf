"""The negative discrete-time ELBO that bits-back coding achieves, per example, in bits.

−ELBO_T(x) = KL(q(z_1|x) ‖ N(0, I)) − E log p(x|z_0) + Σ_{i=1..T} E KL(q(z_{s_i}|z_{t_i}, x) ‖ p(z_{s_i}|z_{t_i}))
(paper, eq. 11–13). Every one of the T KL terms is estimated with its own draw z_{t_i} ~ q(z_{t_i}|x) rather
than one random step (the training loss's estimator), so the estimate has low variance.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vdm import losses, process


@torch.no_grad()
def negative_elbo_bits(model, x: Tensor, T: int, generator: torch.Generator | None = None) -> Tensor:
    """−ELBO_T(x) in bits per example, (B,), for integer images `x` (B, C, H, W) and T steps (computed in eval
    mode; the model is left in the mode it was in)."""
    was_training = model.training
    model.eval()
    try:
        return _negative_elbo_bits(model, x, T, generator)
    finally:
        model.train(was_training)


def _negative_elbo_bits(model, x: Tensor, T: int, generator: torch.Generator | None) -> Tensor:
    f = model.encode(x)
    g0, g1 = model.gamma.endpoints()
    eps_0 = torch.randn(f.shape, generator=generator, dtype=f.dtype, device=f.device)
    nats = losses.prior_kl(f, g1) + losses.reconstruction_loss(x, g0, eps_0, model.config.vocab_size)
    for i in range(1, T + 1):
        gamma_t = model.gamma(i / T).expand(x.shape[0])
        gamma_s = model.gamma((i - 1) / T)
        eps = torch.randn(f.shape, generator=generator, dtype=f.dtype, device=f.device)
        z_t = process.sample_z_t(f, gamma_t[:, None, None, None], eps)
        eps_hat = model.eps_hat(z_t, gamma_t)
        nats = nats + losses.diffusion_loss_discrete(gamma_s, gamma_t[0], T, eps, eps_hat) / T
    return nats / math.log(2.0)
