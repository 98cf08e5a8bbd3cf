"""Stateless samplers for VDM and writers for the images they make.

Every sampler is a small function with one signature, `sampler(model, z_1, times, *, generator=None, ...)`,
that walks a decreasing time grid from `times[0]` (1) to `times[-1]` (0) and returns the latent z_0; the
decoder then gives the integer image (`decode`). No hidden state: a seeded generator (or one generator per
image) supplies all the noise.

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
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vdm import process
from vdm.files import atomic_write
from vdm.model import VDM
from vdm.choices import DEFAULT_GRID, DEFAULT_SAMPLER, DEFAULT_STEPS, GRIDS, SAMPLER_NAMES
from vdm.precision import autocast

Generator = torch.Generator | Sequence[torch.Generator] | None


# --- randomness -------------------------------------------------------------------------------------------
def seeded_generator(*keys: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded from the integers `keys` through numpy's SeedSequence (so (seed, i) and
    (seed, j) give unrelated streams)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


def image_generators(seed: int, indices: Sequence[int], device: str | torch.device = "cpu"
                     ) -> list[torch.Generator]:
    """One generator per image, seeded with (seed, index): image i's z_1 and sampling noise depend on nothing
    else (not on the batch size, the batch it falls in, or the sampler)."""
    return [seeded_generator(seed, i, device=device) for i in indices]


def randn(shape: Sequence[int], generator: Generator = None, *, dtype=None, device=None) -> Tensor:
    """Standard normal (n, ...) noise from one generator, or row k from `generator[k]` when given a list."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for {shape[0]} rows")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=dtype, device=device) for g in generator])


def prior_latent(model: VDM, n: int, *, image_size: int | tuple[int, int] | None = None,
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
def lambda_times(model: VDM, steps: int) -> list[float]:
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
def times_at_gammas(model: VDM, target: Tensor) -> list[float]:
    """The times t_i with γ(t_i) = target_i, for a decreasing `target` from γ(1) to γ(0): bisection on the
    strictly increasing γ (40 halvings, below float32 resolution); the ends are exactly 1 and 0."""
    target = target.to(dtype=model.dtype, device=model.device)
    lo, hi = torch.zeros_like(target), torch.ones_like(target)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        above = model.gamma(mid) > target
        hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
    return [1.0] + [float(t) for t in 0.5 * (lo + hi)[1:-1]] + [0.0]


def time_grid(model: VDM, steps: int, grid: str = "t") -> list[float]:
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


def _steps(model: VDM, z: Tensor, times: Sequence[float], progress: bool, desc: str = "sampling"):
    """(t, s, γ_t, γ_s) for consecutive times t > s of the grid, with a progress bar when asked."""
    kw = dict(dtype=z.dtype, device=z.device)
    pairs = list(zip(times, times[1:]))
    if progress:
        from tqdm.auto import tqdm
        pairs = tqdm(pairs, desc=desc, unit="step", leave=False)
    for t, s in pairs:
        yield t, s, model.gamma(torch.tensor(t, **kw)), model.gamma(torch.tensor(s, **kw))


# --- the samplers: (model, z_1, times, *, ...) → z_0 ----------------------------------------------------------
def ancestral(model: VDM, z_1: Tensor, times: Sequence[float], *, generator: Generator = None,
              progress: bool = False) -> Tensor:
    """Ancestral sampling: for consecutive t > s draw z_s ~ p(z_s | z_t) = q(z_s | z_t, x = x̂(z_t; t))
    (paper, section 3.2; `process.ancestral_step`, the official update). One network call a step."""
    z = z_1
    for _, _, gamma_t, gamma_s in _steps(model, z, _check_times(times), progress):
        noise = randn(z.shape, generator, dtype=z.dtype, device=z.device)
        z = process.ancestral_step(z, model.eps_hat(z, gamma_t), gamma_s, gamma_t, noise)
    return z


def ddim(model: VDM, z_1: Tensor, times: Sequence[float], *, eta: float = 0.0, generator: Generator = None,
         progress: bool = False) -> Tensor:
    """DDIM (Song, Meng & Ermon 2021) with stochasticity η ∈ [0, 1] (`process.ddim_step`). η = 0 is the
    first-order exponential integrator of the probability-flow ODE (DPM-Solver++(1)); one call a step."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    z = z_1
    for _, _, gamma_t, gamma_s in _steps(model, z, _check_times(times), progress):
        noise = randn(z.shape, generator, dtype=z.dtype, device=z.device) if eta > 0 else None
        z = process.ddim_step(z, model.eps_hat(z, gamma_t), gamma_s, gamma_t, eta, noise)
    return z


def _dpmpp_update(z_t: Tensor, x_hats: list[Tensor], lams: list[Tensor], gamma_t: Tensor, gamma_s: Tensor
                  ) -> Tensor:
    """One DPM-Solver++ multistep update t → s (Lu et al. 2022, "DPM-Solver++"), of order len(x_hats) ∈
    {1, 2, 3}: the data predictions `x_hats` (newest last) were made at the log-SNRs `lams` (λ_t last).

    Exactly, z_s = (σ_s/σ_t) z_t + σ_s ∫_{λ_t}^{λ_s} e^λ x̂(λ) dλ; with h = λ_s − λ_t and φ₁ = expm1(−h):
    - order 1 (DDIM): x̂ constant, z_s = (σ_s/σ_t) z_t − α_s·φ₁·x̂_t;
    - order 2, the paper's algorithm 2: x̂ replaced by D = (1 + 1/(2r))·x̂_t − 1/(2r)·x̂_{t−1}, r = h₀/h with
      h₀ = λ_t − λ_{t−1} — the linear extrapolation of the last two predictions to the midpoint λ_t + h/2;
    - order 3: x̂ replaced by its Taylor polynomial around λ_t, derivatives from divided differences, the
      integral exact: −α_s·φ₁·x̂ + α_s·h·φ₂·x̂' − α_s·h²·φ₃·x̂'' with φ₂ = φ₁/h + 1, φ₃ = φ₂/h − ½ (the
      third-order multistep of the DPM-Solver++ reference implementation).
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


def _dpmpp(model: VDM, z_1: Tensor, times: Sequence[float], order: int, progress: bool) -> Tensor:
    """DPM-Solver++ multistep of the given order; the first steps use the orders their history allows."""
    z, x_hats, lams = z_1, [], []
    for _, _, gamma_t, gamma_s in _steps(model, z, _check_times(times), progress):
        x_hats = (x_hats + [process.data_prediction(z, model.eps_hat(z, gamma_t), gamma_t)])[-order:]
        lams = (lams + [process.log_snr(gamma_t)])[-order:]
        z = _dpmpp_update(z, x_hats, lams, gamma_t, gamma_s)
    return z


def dpmpp_2m(model: VDM, z_1: Tensor, times: Sequence[float], *, generator: Generator = None,
             progress: bool = False) -> Tensor:
    """DPM-Solver++(2M): second-order multistep, data prediction (Lu et al. 2022); one call a step.
    Deterministic (`generator` is accepted for the common signature and unused)."""
    return _dpmpp(model, z_1, times, 2, progress)


def dpmpp_3m(model: VDM, z_1: Tensor, times: Sequence[float], *, generator: Generator = None,
             progress: bool = False) -> Tensor:
    """DPM-Solver++(3M): third-order multistep, data prediction; one call a step. Deterministic."""
    return _dpmpp(model, z_1, times, 3, progress)


def _gamma_ends(model: VDM, t_from: float, t_to: float, like: Tensor) -> Tensor:
    """[γ(t_from), γ(t_to)] as the integration interval of the probability flow in γ."""
    kw = dict(dtype=like.dtype, device=like.device)
    ends = [model.gamma(torch.tensor(t, **kw)) for t in (t_from, t_to)]
    return torch.stack(ends).detach()


def ode(model: VDM, z_1: Tensor, times: Sequence[float] = (1.0, 0.0), *, generator: Generator = None,
        progress: bool = False, rtol: float = 1e-5, atol: float = 1e-5, method: str = "dopri5") -> Tensor:
    """The probability-flow ODE from times[0] to times[-1], solved in γ (dz/dγ = ½σ(ε̂ − σz),
    `process.probability_flow`) by torchdiffeq's adaptive solver (dopri5 by default; one network call per
    function evaluation, their number set by rtol/atol). The error control is over the whole batch, so an
    image's z_0 changes with its batch mates by about the tolerance. Deterministic."""
    from torchdiffeq import odeint

    times = _check_times(times)
    bar = _call_bar(progress, "ODE")

    def f(gamma, z):
        bar.update(1)
        return process.probability_flow(z, model.eps_hat(z, gamma), gamma)

    try:
        return odeint(f, z_1, _gamma_ends(model, times[0], times[-1], z_1), rtol=rtol, atol=atol,
                      method=method)[-1]
    finally:
        bar.close()


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ancestral": ancestral, "ddim": ddim, "dpmpp-2m": dpmpp_2m, "dpmpp-3m": dpmpp_3m, "ode": ode}
assert tuple(SAMPLERS) == SAMPLER_NAMES


# --- log-likelihood through the probability flow ------------------------------------------------------------
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


def ode_log_likelihood(model: VDM, z_0: Tensor, *, probes: Tensor | None = None, rtol: float = 1e-5,
                       atol: float = 1e-5, progress: bool = False, method: str = "dopri5") -> tuple[Tensor, int]:
    """(log p_ODE(z_0) in nats per row (B,), function evaluations): the density of z_0 under the model's
    probability flow from the prior z_1 ~ N(0, I), by the instantaneous change of variables (Chen et al.
    2018; Song et al. 2021, eq. 39): log p_0(z_0) = log N(z_1; 0, I) + ∫ ∇·(dz/dγ) dγ from γ(0) to γ(1),
    integrating z and the divergence together. `probes` (K, B, ...) give Hutchinson estimates (unbiased for the
    log-density); None computes the exact trace. Each evaluation is one network call plus K (or D)
    vector-Jacobian products. Runs in eval mode without parameter gradients."""
    from torchdiffeq import odeint

    D = z_0[0].numel()
    bar, calls = _call_bar(progress, "ODE likelihood"), [0]

    def f(gamma, state):
        z, _ = state
        calls[0] += 1
        bar.update(1)
        eps_hat, div_eps = divergence(lambda y: model.eps_hat(y, gamma), z, probes)
        return process.probability_flow(z, eps_hat, gamma), process.probability_flow_divergence(div_eps, gamma, D)

    state = (z_0, torch.zeros(z_0.shape[0], dtype=z_0.dtype, device=z_0.device))
    with _eval_mode(model), torch.no_grad():
        ends = _gamma_ends(model, 0.0, 1.0, z_0)
        z_1, integral = (s[-1] for s in odeint(f, state, ends, rtol=rtol, atol=atol, method=method))
    bar.close()
    log_prior = -0.5 * (z_1.flatten(1).square().sum(1) + D * math.log(2 * math.pi))
    return log_prior + integral, calls[0]


# --- from latents to images ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _eval_mode(model: VDM) -> Iterator[None]:
    was_training, flags = model.training, [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def decode(model: VDM, z_0: Tensor) -> Tensor:
    """The decoder's most likely image argmax_x p(x | z_0), uint8 when V ≤ 256, shaped like `z_0`."""
    x = model.decode(z_0)
    return x.to(torch.uint8) if model.config.vocab_size <= 256 else x


@torch.no_grad()
def generate(model: VDM, z_1: Tensor, sampler: str, times: Sequence[float], *, generator: Generator = None,
             progress: bool = False, **options) -> Tensor:
    """Integer images from `z_1` with the named sampler of `SAMPLERS` on the grid `times` (ending at t = 0),
    then the decoder. Eval mode (no dropout); the model is left as it was. `options`: `eta` (ddim), `rtol`,
    `atol` (ode)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    if _check_times(times)[-1] != 0.0:
        raise ValueError(f"the last time must be 0 (the decoder reads z_0), got {times[-1]}")
    with _eval_mode(model):
        z = z_1.to(device=model.device, dtype=model.dtype)
        z_0 = SAMPLERS[sampler](model, z, times, generator=generator, progress=progress, **options)
        return decode(model, z_0)


def ancestral_sample(model: VDM, z_1: Tensor, steps: int, *, generator: Generator = None,
                     progress: bool = False) -> Tensor:
    """`steps` ancestral steps on the uniform grid 1, (T−1)/T, …, 0 from `z_1`; integer images (n, C, H, W)."""
    return generate(model, z_1, "ancestral", uniform_times(steps), generator=generator, progress=progress)


@contextlib.contextmanager
def count_network_calls(model: VDM) -> Iterator[list[int]]:
    """Within the block, [calls] counts the images passed through `model.eps_hat` (network calls × batch)."""
    counter, inner = [0], model.eps_hat

    def counted(z_t, *args, **kwargs):
        counter[0] += z_t.shape[0]
        return inner(z_t, *args, **kwargs)

    model.eps_hat = counted
    try:
        yield counter
    finally:
        del model.eps_hat


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _call_bar(enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(desc=desc, unit="call", leave=False)


# --- many images, in batches, resumable -----------------------------------------------------------------------


def sample_images(model: VDM, n: int, *, sampler: str = DEFAULT_SAMPLER, steps: int | None = None, seed: int = 0,
                  grid: str | None = None, batch: int = 64, start: int = 0,
                  image_size: int | tuple[int, int] | None = None, progress: bool = False,
                  precision: str = "fp32", conditioning: float = 0.0, **options) -> Tensor:
    """Images start … start + n − 1 of the seeded sequence: image i starts from z_1 drawn with the generator
    of (seed, i), which also draws its sampling noise, so an image depends on (seed, i, sampler settings) only,
    not on `batch` or on which other images are drawn (the ode sampler: up to its tolerance). uint8
    (n, C, H, W). `steps` and `grid` default to `DEFAULT_STEPS` / `DEFAULT_GRID` of the sampler. `precision`
    "bf16" runs the network under bfloat16 autocast; `conditioning` is the network's conditioning input (0 for
    un-augmented images of an augmentation-conditioned model, and for every other model)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    if n < 1 or batch < 1:
        raise ValueError(f"n and batch must be at least 1, got {n} and {batch}")
    steps = steps if steps is not None else DEFAULT_STEPS[sampler]
    times = [1.0, 0.0] if sampler == "ode" else time_grid(model, steps, grid or DEFAULT_GRID[sampler])
    out = []
    with conditioned(model, conditioning), autocast(precision, model.device):
        for b in range(start, start + n, batch):
            gens = image_generators(seed, range(b, min(b + batch, start + n)), model.device)
            z_1 = prior_latent(model, len(gens), image_size=image_size, generator=gens)
            out.append(generate(model, z_1, sampler, times, generator=gens, progress=progress, **options).cpu())
    return torch.cat(out)


@contextlib.contextmanager
def conditioned(model: VDM, conditioning: float) -> Iterator[VDM]:
    """Within the block, every `model.eps_hat` call that gives no conditioning uses `conditioning` (nothing
    changes for 0, the network's default)."""
    if conditioning == 0.0:
        yield model
        return
    inner = model.eps_hat

    def eps_hat(z_t, gamma_t, cond=None):
        if cond is None:
            cond = torch.full((z_t.shape[0],), float(conditioning), dtype=z_t.dtype, device=z_t.device)
        return inner(z_t, gamma_t, cond)

    model.eps_hat = eps_hat
    try:
        yield model
    finally:
        del model.eps_hat


def sample_to_files(model: VDM, out_png: str | os.PathLike, n: int, *, batch: int = 64, settings: dict,
                    nrow: int | None = None, grid_images: int = 256, progress: bool = True) -> np.ndarray:
    """Draw `n` images with `sample_images(**settings)` in batches, writing each finished batch atomically to
    the folder OUT.partial/ (beside OUT.png); a rerun with the same model and settings continues from the
    batches already there, and one with anything different is refused (`ResumeError`). At the end writes
    OUT.npz (`arr_0`: uint8 N×H×W×C, the layout FID tools read) and the PNG grid of the first `grid_images`
    images (when C is 1 or 3), removes the partial folder and returns the images (N, C, H, W)."""
    out_png = Path(out_png)
    parts = out_png.with_name(out_png.stem + ".partial")
    from vdm.codec.fingerprint import model_fingerprint

    record = {"model": model_fingerprint(model).hex(), "n": int(n), "batch": int(batch), **settings}
    done = _resume(parts, record)
    batches = list(range(0, n, batch))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, initial=min(done * batch, n), desc="images", unit="img")
    for k in range(done, len(batches)):
        b = batches[k]
        images = sample_images(model, min(batch, n - b), start=b, batch=batch, **settings).numpy()
        atomic_write(parts / f"batch_{k:06d}.npy", lambda tmp: _save_npy(tmp, images))
        if bar is not None:
            bar.update(len(images))
    if bar is not None:
        bar.close()
    images = np.concatenate([np.load(parts / f"batch_{k:06d}.npy", allow_pickle=False)
                             for k in range(len(batches))])
    save_npz(images, out_png.with_suffix(".npz"))
    if images.shape[1] in (1, 3):
        save_grid_png(images[:grid_images], out_png, nrow=nrow)
    shutil.rmtree(parts)
    return images


class ResumeError(ValueError):
    """A partial sampling folder made with other arguments than the ones given now."""


def _resume(parts: Path, record: dict) -> int:
    """The number of finished batches in `parts` (creating it with `record` when absent); refuses a folder
    whose record differs."""
    meta = parts / "settings.json"
    if not meta.exists():
        parts.mkdir(parents=True, exist_ok=True)
        atomic_write(meta, lambda tmp: Path(tmp).write_text(json.dumps(record, sort_keys=True)))
        return 0
    try:
        old = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ResumeError(f"{meta}: unreadable ({e}); delete {parts} to start again") from None
    if old != json.loads(json.dumps(record)):
        diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
        raise ResumeError(f"{parts} holds a run with other arguments ({', '.join(diff)} differ); rerun with the "
                          f"same ones to resume, or delete it to start again")
    done = 0
    while (parts / f"batch_{done:06d}.npy").exists():
        done += 1
    return done


def _save_npy(tmp: str, a: np.ndarray) -> None:
    with open(tmp, "wb") as fh:  # a file object: np.save would append ".npy" to a bare name
        np.save(fh, a, allow_pickle=False)


# --- writing images ---------------------------------------------------------------------------------------
def _as_uint8(images: np.ndarray | Tensor) -> np.ndarray:
    a = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if a.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {a.shape}")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.integer) or a.min(initial=0) < 0 or a.max(initial=0) > 255:
            raise ValueError(f"images must be integers in 0..255, got dtype {a.dtype}")
        a = a.astype(np.uint8)
    return a


def make_grid(images: np.ndarray | Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) uint8 images into one (rows·(H+p)+p, nrow·(W+p)+p, C) array, `nrow` images a row
    (default ⌈√N⌉), separated and framed by `padding` black pixels; rows = ⌈N/nrow⌉."""
    a = _as_uint8(images)
    n, c, h, w = a.shape
    if c not in (1, 3):
        raise ValueError(f"a PNG grid needs 1 or 3 channels, got {c}")
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / nrow))
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[y:y + h, x:x + w] = a[k].transpose(1, 2, 0)
    return grid


def save_grid_png(images: np.ndarray | Tensor, path: str | os.PathLike, nrow: int | None = None,
                  padding: int = 2) -> None:
    """Write the grid of `make_grid` as an 8-bit PNG (grey for C = 1, RGB for C = 3)."""
    from PIL import Image

    grid = make_grid(images, nrow, padding)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def save_npz(images: np.ndarray | Tensor, path: str | os.PathLike) -> None:
    """Write (N, C, H, W) images as a compressed .npz holding one uint8 N×H×W×C array under "arr_0" (the layout
    FID tools such as the guided-diffusion evaluator and torch-fidelity read)."""
    a = _as_uint8(images).transpose(0, 2, 3, 1)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a bare name
            np.savez_compressed(fh, arr_0=a)

    atomic_write(path, write)


def load_npz(path: str | os.PathLike) -> np.ndarray:
    """The images written by `save_npz` ("arr_0", N×H×W×C) as uint8 (N, C, H, W); never unpickles."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as d:
            a = d["arr_0"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not an image .npz with an 'arr_0' array ({e})") from None
    if a.dtype != np.uint8 or a.ndim != 4:
        raise ValueError(f"{path}: 'arr_0' must be uint8 (N, H, W, C), got {a.dtype} {a.shape}")
    return a.transpose(0, 3, 1, 2)
