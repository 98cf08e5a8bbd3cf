"""Stateless samplers for VDM: from the prior latent z_1 to the latent z_0, then the decoder's image.

Every sampler is a small function with one signature,
`sampler(model, z_1, times, *, conditioning=None, generator=None, progress=False, ...)`, that walks a
decreasing time grid from `times[0]` (1) to `times[-1]` (0) and returns the latent z_0; the decoder then gives
the integer image (`decode`). No hidden state: a seeded generator (or one generator per image) supplies all the
noise, and `conditioning` (B,) goes to every network call `model.eps_hat(z, γ, conditioning)` (None: the
network's default, 0).

| name | network calls | what it is |
|---|---|---|
| `ancestral` | K | draws z_s ~ p(z_s | z_t) = q(z_s | z_t, x̂) (the paper's sampler, section 3.2) |
| `ddim` | K | DDIM with η (Song, Meng & Ermon 2021); η = 0 is deterministic, η = 1 has ancestral moments |
| `dpmpp_2m`, `dpmpp_3m` | K | DPM-Solver++(2M)/(3M): multistep data-prediction solvers of the probability-flow ODE in λ |
|  |  | (Lu et al. 2022), orders 2 and 3 |
| `ode` | adaptive | the probability-flow ODE solved by `torchdiffeq` (dopri5, rtol/atol); only the grid's ends matter |

In VDM's variables the log-SNR is λ = −γ/2 (`process.log_snr`). Time grids: `uniform_times` (uniform in t)
and `lambda_times` (uniform in λ, found by bisection on the monotone γ, so for every schedule).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from vdm import process
from vdm.choices import GRIDS, SAMPLER_NAMES
from vdm.progress import progress_bar



class DiffusionModel(Protocol):
    """What the samplers use of a model (`vdm.model.VDM` is one; this module does not import it, since the
    model's own `sample` method calls these functions)."""

    config: Any  # channels, image_size, vocab_size
    gamma: Callable[[Tensor], Tensor]  # the schedule γ(t)
    training: bool

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def eps_hat(self, z_t: Tensor, gamma_t: Tensor, conditioning: Tensor | None = None) -> Tensor: ...

    def decode(self, z_0: Tensor) -> Tensor: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...


Generator = torch.Generator | Sequence[torch.Generator] | None


# --- randomness -------------------------------------------------------------------------------------------
def randn(shape: Sequence[int], generator: Generator = None, *, dtype=None, device=None) -> Tensor:
    """Standard normal (n, ...) noise from one generator, or row k from `generator[k]` when given a list."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for {shape[0]} rows")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=dtype, device=device) for g in generator])


def prior_latent(model: DiffusionModel, n: int, *, image_size: int | tuple[int, int] | None = None,
                 generator: Generator = None) -> Tensor:
    """z_1 ~ N(0, I) of shape (n, C, H, W) in the model's dtype and device (H = W = config.image_size)."""
    size = image_size or model.config.image_size
    h, w = (size, size) if isinstance(size, int) else size
    return randn((n, model.config.channels, h, w), generator, device=model.device, dtype=model.dtype)


# --- time grids -------------------------------------------------------------------------------------------
def uniform_times(steps: int) -> list[float]:
    """The grid t_i = (T − i)/T, i = 0..T, from 1 down to 0 (the times `VDM.sample` uses)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return [(steps - i) / steps for i in range(steps + 1)]


@torch.no_grad()
def lambda_times(model: DiffusionModel, steps: int) -> list[float]:
    """Times 1 = t_0 > … > t_K = 0 with λ(t_i) = −γ(t_i)/2 uniform between λ(1) and λ(0).

    γ is strictly increasing for every schedule, so t(λ) is found by bisection (`times_at_gammas`); the ends
    are exactly 1 and 0.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    kw = dict(dtype=model.dtype, device=model.device)
    g0, g1 = model.gamma(torch.tensor(0.0, **kw)), model.gamma(torch.tensor(1.0, **kw))
    times = times_at_gammas(model, g1 + (g0 - g1) * torch.arange(steps + 1, **kw) / steps)
    if any(s >= t for t, s in zip(times, times[1:])):
        raise ValueError(f"{steps} steps are too many to space evenly in λ for this schedule")
    return times


@torch.no_grad()
def times_at_gammas(model: DiffusionModel, target: Tensor) -> list[float]:
    """The times t_i with γ(t_i) = target_i, for a decreasing `target` from γ(1) to γ(0): bisection on the
    strictly increasing γ (40 halvings, below float32 resolution); the ends are exactly 1 and 0."""
    target = target.to(dtype=model.dtype, device=model.device)
    lo, hi = torch.zeros_like(target), torch.ones_like(target)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        above = model.gamma(mid) > target
        hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
    return [1.0] + [float(t) for t in 0.5 * (lo + hi)[1:-1]] + [0.0]


def time_grid(model: DiffusionModel, steps: int, grid: str = "t") -> list[float]:
    """`steps` + 1 times from 1 to 0, uniform in t (`grid` = "t") or in λ ("lambda")."""
    if grid == "t":
        return uniform_times(steps)
    if grid == "lambda":
        return lambda_times(model, steps)
    raise ValueError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}")


def _check_times(times: Sequence[float]) -> list[float]:
    times = [float(t) for t in times]
    if len(times) < 2 or any(s >= t for t, s in zip(times, times[1:])):
        raise ValueError("times must be strictly decreasing with at least two entries")
    return times


def gammas_at(model: DiffusionModel, times: Sequence[float], like: Tensor) -> Tensor:
    """γ at each of `times` (len(times),), in `like`'s dtype and device (γ evaluated one time at a time, as
    `VDM.sample_step` does, so the samplers and the model's own step agree bit for bit)."""
    return torch.stack([model.gamma(torch.tensor(t, dtype=like.dtype, device=like.device)) for t in times])


def _steps(model: DiffusionModel, z: Tensor, times: Sequence[float], progress: bool) -> Iterator[tuple[Tensor, Tensor]]:
    """(γ_t, γ_s) for consecutive times t > s of the grid (checked), with a progress bar when asked."""
    gammas = gammas_at(model, _check_times(times), z)
    bar = progress_bar(progress, desc="sampling", unit="step", total=len(gammas) - 1, leave=False)
    try:
        for gamma_t, gamma_s in zip(gammas, gammas[1:]):
            yield gamma_t, gamma_s
            bar.update(1)
    finally:
        bar.close()


# --- the samplers: (model, z_1, times, *, conditioning, generator, progress, ...) → z_0 -----------------------
def ancestral(model: DiffusionModel, z_1: Tensor, times: Sequence[float], *, conditioning: Tensor | None = None,
              generator: Generator = None, progress: bool = False) -> Tensor:
    """Ancestral sampling: for consecutive t > s draw z_s ~ p(z_s | z_t) = q(z_s | z_t, x = x̂(z_t; t))
    (paper, section 3.2; `process.ancestral_step`, the official update). One network call a step."""
    z = z_1
    for gamma_t, gamma_s in _steps(model, z, times, progress):
        noise = randn(z.shape, generator, dtype=z.dtype, device=z.device)
        z = process.ancestral_step(z, model.eps_hat(z, gamma_t, conditioning), gamma_s, gamma_t, noise)
    return z


def ddim(model: DiffusionModel, z_1: Tensor, times: Sequence[float], *, conditioning: Tensor | None = None,
         generator: Generator = None, progress: bool = False, eta: float = 0.0) -> Tensor:
    """DDIM (Song, Meng & Ermon 2021) with stochasticity η ∈ [0, 1] (`process.ddim_step`). η = 0 is the
    first-order exponential integrator of the probability-flow ODE (DPM-Solver++(1)); one call a step."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    z = z_1
    for gamma_t, gamma_s in _steps(model, z, times, progress):
        noise = randn(z.shape, generator, dtype=z.dtype, device=z.device) if eta > 0 else None
        z = process.ddim_step(z, model.eps_hat(z, gamma_t, conditioning), gamma_s, gamma_t, eta, noise)
    return z


def dpmpp_update(z_t: Tensor, x_hats: list[Tensor], lams: list[Tensor], gamma_t: Tensor, gamma_s: Tensor
                 ) -> Tensor:
    """One DPM-Solver++ multistep update t → s (Lu et al. 2022, "DPM-Solver++"), of order len(x_hats) ∈
    {1, 2, 3}: the data predictions `x_hats` (newest last) made at the log-SNRs `lams` (λ_t last).

    Exactly, z_s = (σ_s/σ_t) z_t + σ_s ∫_{λ_t}^{λ_s} e^λ x̂(λ) dλ; with h = λ_s − λ_t and φ₁ = expm1(−h):
    - order 1 (DDIM): x̂ constant, z_s = (σ_s/σ_t) z_t − α_s·φ₁·x̂_t;
    - order 2, the paper's algorithm 2: x̂ replaced by D = (1 + 1/(2r))·x̂_t − 1/(2r)·x̂_{t−1}, r = h₀/h with
      h₀ = λ_t − λ_{t−1} — the linear extrapolation of the last two predictions to the midpoint λ_t + h/2;
    - order 3: x̂ replaced by its second-order Taylor polynomial around λ_t, x̂' and x̂'' from the divided
      differences of the last three predictions, and the integral taken exactly:
      −α_s·φ₁·x̂ + α_s·h·φ₂·x̂' − α_s·h²·φ₃·x̂'' with φ₂ = φ₁/h + 1, φ₃ = φ₂/h − ½. The update is exact when
      x̂ is quadratic in λ, so its local error is O(h⁴).

    How order 3 differs from the common implementations: the third-order multistep of the DPM-Solver reference
    code, diffusers' `DPMSolverMultistepScheduler` (solver_order=3) and k-diffusion's `sample_dpmpp_3m_sde`
    (η = 0) has the same x̂ and x̂' terms but weights the second divided difference D₂ = h²·x̂''/2 by φ₃,
    i.e. takes half of the x̂'' term above. On a quadratic x̂ theirs is off by α_s·φ₃·h²·x̂''/2 ≈
    −α_s·h³·x̂''/12: a local error of O(h³) where this update's is O(h⁴)
    (tests/test_samplers.py checks both).
    """
    alpha_s, sigma_s = process.alpha_sigma(gamma_s)
    _, sigma_t = process.alpha_sigma(gamma_t)
    h = process.log_snr(gamma_s) - lams[-1]
    phi_1 = torch.expm1(-h)
    h_0 = lams[-1] - lams[-2] if len(x_hats) > 1 else None
    if len(x_hats) == 2:
        d = x_hats[-1] + (0.5 * h / h_0) * (x_hats[-1] - x_hats[-2])  # 1/(2r) = h/(2h₀)
        return (sigma_s / sigma_t) * z_t - alpha_s * phi_1 * d
    z_s = (sigma_s / sigma_t) * z_t - alpha_s * phi_1 * x_hats[-1]
    if len(x_hats) == 1:
        return z_s
    phi_2 = phi_1 / h + 1
    phi_3 = phi_2 / h - 0.5
    h_1 = lams[-2] - lams[-3]
    d1_0 = (x_hats[-1] - x_hats[-2]) / h_0  # x̂' at the midpoint of [λ_{t−1}, λ_t]
    d1_1 = (x_hats[-2] - x_hats[-3]) / h_1
    d2 = (d1_0 - d1_1) / (0.5 * (h_0 + h_1))  # x̂''
    d1 = d1_0 + 0.5 * h_0 * d2  # x̂' at λ_t
    return z_s + alpha_s * h * phi_2 * d1 - alpha_s * h ** 2 * phi_3 * d2


def _dpmpp(model: DiffusionModel, z_1: Tensor, times: Sequence[float], order: int, conditioning: Tensor | None,
           progress: bool) -> Tensor:
    """DPM-Solver++ multistep of the given order; the first steps use the orders their history allows."""
    z, x_hats, lams = z_1, [], []
    for gamma_t, gamma_s in _steps(model, z, times, progress):
        eps_hat = model.eps_hat(z, gamma_t, conditioning)
        x_hats = (x_hats + [process.data_prediction(z, eps_hat, gamma_t)])[-order:]
        lams = (lams + [process.log_snr(gamma_t)])[-order:]
        z = dpmpp_update(z, x_hats, lams, gamma_t, gamma_s)
    return z


def dpmpp_2m(model: DiffusionModel, z_1: Tensor, times: Sequence[float], *, conditioning: Tensor | None = None,
             generator: Generator = None, progress: bool = False) -> Tensor:
    """DPM-Solver++(2M): second-order multistep, data prediction (Lu et al. 2022); one call a step.
    Deterministic (`generator` is accepted for the common signature and unused)."""
    return _dpmpp(model, z_1, times, 2, conditioning, progress)


def dpmpp_3m(model: DiffusionModel, z_1: Tensor, times: Sequence[float], *, conditioning: Tensor | None = None,
             generator: Generator = None, progress: bool = False) -> Tensor:
    """DPM-Solver++(3M): third-order multistep, data prediction; one call a step. Deterministic. Its x̂''
    term is the exact one, twice that of diffusers and k-diffusion (see `dpmpp_update`)."""
    return _dpmpp(model, z_1, times, 3, conditioning, progress)


def ode(model: DiffusionModel, z_1: Tensor, times: Sequence[float] = (1.0, 0.0), *, conditioning: Tensor | None = None,
        generator: Generator = None, progress: bool = False, rtol: float = 1e-5, atol: float = 1e-5,
        method: str = "dopri5") -> Tensor:
    """The probability-flow ODE from times[0] to times[-1], solved in γ (dz/dγ = ½σ(ε̂ − σz),
    `process.probability_flow`) by torchdiffeq's adaptive solver (dopri5 by default; one network call per
    function evaluation, their number set by rtol/atol). The error control is over the whole batch, so an
    image's z_0 changes with its batch mates by about the tolerance. Deterministic."""
    from torchdiffeq import odeint

    times = _check_times(times)
    ends = gammas_at(model, (times[0], times[-1]), z_1).detach()
    bar = progress_bar(progress, desc="ODE", unit="call", leave=False)

    def f(gamma, z):
        bar.update(1)
        return process.probability_flow(z, model.eps_hat(z, gamma, conditioning), gamma)

    try:
        return odeint(f, z_1, ends, rtol=rtol, atol=atol, method=method)[-1]
    finally:
        bar.close()


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ancestral": ancestral, "ddim": ddim, "dpmpp-2m": dpmpp_2m, "dpmpp-3m": dpmpp_3m, "ode": ode}
assert tuple(SAMPLERS) == SAMPLER_NAMES


# --- from latents to images ---------------------------------------------------------------------------------
@contextlib.contextmanager
def eval_mode(model: DiffusionModel) -> Iterator[DiffusionModel]:
    """Within the block: `model` in eval mode (no dropout), restored after. A model already in eval mode is not
    touched, so threads may sample it at once."""
    if not model.training:
        yield model
        return
    model.eval()
    try:
        yield model
    finally:
        model.train()


def decode(model: DiffusionModel, z_0: Tensor) -> Tensor:
    """The decoder's most likely image argmax_x p(x | z_0), uint8 when V ≤ 256, shaped like `z_0`."""
    x = model.decode(z_0)
    return x.to(torch.uint8) if model.config.vocab_size <= 256 else x


@torch.no_grad()
def generate(model: DiffusionModel, z_1: Tensor, sampler: str, times: Sequence[float], *, conditioning: Tensor | None = None,
             generator: Generator = None, progress: bool = False, **options) -> Tensor:
    """Integer images from `z_1` with the named sampler of `SAMPLERS` on the grid `times` (ending at t = 0),
    then the decoder. Eval mode (no dropout); the model is left as it was. `conditioning` (B,): the network's
    conditioning input (None: its default, 0). `options`: `eta` (ddim), `rtol`, `atol` (ode)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    if _check_times(times)[-1] != 0.0:
        raise ValueError(f"the last time must be 0 (the decoder reads z_0), got {times[-1]}")
    with eval_mode(model):
        z = z_1.to(device=model.device, dtype=model.dtype)
        if conditioning is not None:
            conditioning = conditioning.to(device=model.device, dtype=model.dtype)
        z_0 = SAMPLERS[sampler](model, z, times, conditioning=conditioning, generator=generator,
                                progress=progress, **options)
        return decode(model, z_0)


def ancestral_sample(model: DiffusionModel, z_1: Tensor, steps: int, *, conditioning: Tensor | None = None,
                     generator: Generator = None, progress: bool = False) -> Tensor:
    """`steps` ancestral steps on the uniform grid 1, (T−1)/T, …, 0 from `z_1`; integer images (n, C, H, W)."""
    return generate(model, z_1, "ancestral", uniform_times(steps), conditioning=conditioning,
                    generator=generator, progress=progress)
