"""The log-density of a latent z_0 under the model's probability-flow ODE (the continuous normalising flow
that shares the diffusion's marginals), by the instantaneous change of variables."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from vdm import process
from vdm.model import VDM
from vdm.progress import progress_bar
from vdm.samplers import eval_mode, gammas_at


def divergence(fn: Callable[[Tensor], Tensor], z: Tensor, probes: Tensor | None) -> tuple[Tensor, Tensor]:
    """(fn(z), ∇·fn(z)) per row of z (B, ...).

    `probes` None: the exact trace of the Jacobian from D vector-Jacobian products, batched (memory and time
    grow with D: small images only). Else the Skilling–Hutchinson estimate mean_k v_kᵀ(∂fn/∂z)v_k with
    `probes` (K, B, ...) of zero mean and unit covariance (unbiased)."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        out = fn(z)
        B, D = z.shape[0], z[0].numel()
        if probes is None:  # all D basis vectors at once, as a batch of vector-Jacobian products (vmap)
            basis = torch.eye(D, dtype=z.dtype, device=z.device)[:, None, :].expand(D, B, D)
            (g,) = torch.autograd.grad(out, z, basis.reshape(D, *out.shape), is_grads_batched=True)
            div = g.reshape(D, B, D).diagonal(dim1=0, dim2=2).sum(-1)
        else:
            div = torch.zeros(B, dtype=z.dtype, device=z.device)
            for k, v in enumerate(probes):
                (g,) = torch.autograd.grad(out, z, v, retain_graph=k + 1 < len(probes))
                div = div + (g * v).flatten(1).sum(1)
            div = div / len(probes)
    return out.detach(), div.detach()


def ode_log_likelihood(model: VDM, z_0: Tensor, *, conditioning: Tensor | None = None,
                       probes: Tensor | None = None, rtol: float = 1e-5, atol: float = 1e-5,
                       progress: bool = False, method: str = "dopri5") -> tuple[Tensor, int]:
    """(log p_ODE(z_0) in nats per row (B,), function evaluations): the density of z_0 under the model's
    probability flow from the prior z_1 ~ N(0, I), by the instantaneous change of variables (Chen et al.
    2018; Song et al. 2021, eq. 39): log p_0(z_0) = log N(z_1; 0, I) + ∫ ∇·(dz/dγ) dγ from γ(0) to γ(1),
    integrating z and the divergence together. `probes` (K, B, ...) give Hutchinson estimates (unbiased for the
    log-density); None computes the exact trace. Each evaluation is one network call (with `conditioning`
    (B,), None for the network's default) plus K (or D) vector-Jacobian products. Runs in eval mode without
    parameter gradients."""
    from torchdiffeq import odeint

    D = z_0[0].numel()
    bar, calls = progress_bar(progress, desc="ODE likelihood", unit="call", leave=False), [0]

    def f(gamma, state):
        z, _ = state
        calls[0] += 1
        bar.update(1)
        eps_hat, div_eps = divergence(lambda y: model.eps_hat(y, gamma, conditioning), z, probes)
        return process.probability_flow(z, eps_hat, gamma), process.probability_flow_divergence(div_eps, gamma, D)

    state = (z_0, torch.zeros(z_0.shape[0], dtype=z_0.dtype, device=z_0.device))
    try:
        with eval_mode(model), _no_parameter_gradients(model), torch.no_grad():
            ends = gammas_at(model, (0.0, 1.0), z_0).detach()
            z_1, integral = (s[-1] for s in odeint(f, state, ends, rtol=rtol, atol=atol, method=method))
    finally:
        bar.close()
    log_prior = -0.5 * (z_1.flatten(1).square().sum(1) + D * math.log(2 * math.pi))
    return log_prior + integral, calls[0]


@contextlib.contextmanager
def _no_parameter_gradients(model: VDM) -> Iterator[None]:
    """Within the block no parameter requires a gradient, so the divergence's backward passes reach z only."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
