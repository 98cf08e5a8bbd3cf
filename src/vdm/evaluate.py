"""Test-set likelihood: the negative VLB of a trained VDM in bits per dimension, with its standard error.

For every image the loss is averaged over K (time, noise) draws; the reported bits per dimension is the mean
of these per-image estimates and its standard error is taken over images (the spread between images plus the
Monte-Carlo noise left after K draws). The noise of image i depends only on (seed, i), so the result does not
depend on the batch size or on which other images are evaluated with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from vdm import losses, process
from vdm.likelihood import ode_log_likelihood
from vdm.losses import bits_per_dim
from vdm.model import VDM
from vdm.precision import autocast
from vdm.progress import progress_bar
from vdm.seeding import seeded_generator

COMPONENTS = ("prior", "recon", "diff")


def image_noise(seed: int, index: int, shape: tuple[int, ...], time_samples: int
                ) -> tuple[Tensor, Tensor, Tensor]:
    """The draws used for image `index`: times t (K,), ε (K, *shape) and ε₀ (K, *shape), float32 on the CPU.

    A generator seeded from (seed, index) gives u ~ U(0, 1), then ε₀ and ε; the K times are stratified,
    t_k = (u + k/K) mod 1 (each one uniform on [0, 1), together covering [0, 1) evenly).
    """
    g = seeded_generator(seed, index)
    t = losses.antithetic_times(time_samples, generator=g)
    eps_0 = torch.randn((time_samples, *shape), generator=g)
    eps = torch.randn((time_samples, *shape), generator=g)
    return t, eps, eps_0


@contextlib.contextmanager
def evaluation_mode(model: VDM, steps: int) -> Iterator[VDM]:
    """Within the block: `model` in eval mode (no dropout) with `config.timesteps = steps`; restored after."""
    config, was_training = model.config, model.training
    model.config = dataclasses.replace(config, timesteps=int(steps))
    model.eval()
    try:
        yield model
    finally:
        model.config = config
        model.train(was_training)


@torch.no_grad()
def image_losses(model: VDM, data: np.ndarray | Tensor, *, steps: int = 0, time_samples: int = 1,
                 batch_size: int = 64, seed: int = 0, progress: bool = True, precision: str = "fp32",
                 conditioning: float = 0.0, gammas: Sequence[float] | None = None) -> np.ndarray:
    """Per-image loss terms in bits per dimension, each the mean over `time_samples` draws: (N, 3) float64.

    Columns are prior, reconstruction and diffusion (`COMPONENTS`); their row sum is the image's negative VLB
    in bits per dimension. `steps` = 0 uses the continuous-time diffusion loss, `steps` = T > 0 the T-step
    discrete-time loss; with `time_samples` = `steps` = T the stratified times fall once in each step of the
    grid, so every one of the T KL terms is evaluated: the T-step negative ELBO that bits-back coding achieves.
    The noise of image i depends only on (seed, i), so repeated calls see the same draws (the test bpd of
    training uses that). `data` holds integer images (N, C, H, W). `batch_size` counts network evaluations
    (image × draw) per forward pass. `precision` "fp32" or "bf16" (autocast; see `vdm.precision`).
    `conditioning` is the network's conditioning input (0: un-augmented images of an augmentation-conditioned
    model, and every other model). `gammas` (T + 1 increasing log-SNR parameters from γ(0) to γ(1), e.g. a codec
    chain's `vdm.codec.chain.chain_gammas`) measures the T-step chain with those γ instead of the model's own
    loss (`chain_loss`; `steps` is then ignored): with `time_samples` = T, the negative ELBO that bits-back
    coding along that chain achieves.
    """
    if steps < 0 or time_samples < 1 or batch_size < 1:
        raise ValueError("steps must be ≥ 0, time_samples and batch_size ≥ 1")
    data = torch.as_tensor(np.asarray(data)) if not isinstance(data, Tensor) else data
    if data.dim() != 4:
        raise ValueError(f"data must be (N, C, H, W) integer images, got shape {tuple(data.shape)}")
    N, K = data.shape[0], time_samples
    out = np.zeros((N, len(COMPONENTS)), dtype=np.float64)
    per_pass = max(1, batch_size // K)  # images per chunk; a chunk's N·K rows are split into batches
    grid = None if gammas is None else torch.as_tensor(np.asarray(gammas, dtype=np.float64))
    bar = progress_bar(progress, desc="evaluating", unit="img", total=N)
    with evaluation_mode(model, steps), autocast(precision, model.device):
        for start in range(0, N, per_pass):
            idx = range(start, min(start + per_pass, N))
            draws = [image_noise(seed, i, tuple(data.shape[1:]), K) for i in idx]
            t = torch.cat([d[0] for d in draws])
            eps = torch.cat([d[1] for d in draws])
            eps_0 = torch.cat([d[2] for d in draws])
            x = data[start:start + len(idx)].repeat_interleave(K, dim=0)
            terms = _loss_terms(model, x, t, eps, eps_0, batch_size, conditioning, grid)  # (len(idx)·K, 3) nats
            bpd = bits_per_dim(terms, model.num_dims(x)).view(len(idx), K, -1).mean(1)
            out[start:start + len(idx)] = bpd.double().numpy()
            bar.update(len(idx))
    bar.close()
    return out


def _loss_terms(model: VDM, x: Tensor, t: Tensor, eps: Tensor, eps_0: Tensor, batch_size: int,
                conditioning: float = 0.0, gammas: Tensor | None = None) -> Tensor:
    """model.loss (or `chain_loss` with `gammas`) on rows of (x, t, ε, ε₀) in batches of `batch_size`:
    (rows, 3) float64 nats on the CPU."""
    dev = model.device
    rows = []
    for b in range(0, x.shape[0], batch_size):
        sl = slice(b, b + batch_size)
        args = (x[sl].to(dev), t[sl].to(dev), eps[sl].to(dev), eps_0[sl].to(dev))
        cond = torch.full((len(x[sl]),), float(conditioning), device=dev, dtype=model.dtype)
        out = model.loss(*args, conditioning=cond) if gammas is None else chain_loss(model, *args, gammas, cond)
        rows.append(torch.stack([out[c].double() for c in COMPONENTS], dim=1).cpu())
    return torch.cat(rows)


def chain_loss(model: VDM, x: Tensor, t: Tensor, eps: Tensor, eps_0: Tensor, gammas: Tensor,
               conditioning: Tensor | None = None) -> dict[str, Tensor]:
    """`VDM.loss`'s terms {"prior", "recon", "diff"} (B,) in nats for the T-step chain whose log-SNR parameters
    are `gammas` (T + 1 increasing values from γ(0) to γ(1)) instead of the model's γ(i/T).

    Time t falls in step i = ⌈t·T⌉ (t = 0 in step 1), whose diffusion term is a one-sample estimate of
    T·KL(q(z_{i−1} | z_i, x) ‖ p(z_{i−1} | z_i)) (`losses.diffusion_loss_discrete`); stratified times that fall
    once in every step give the chain's negative ELBO. No gradient reaches `gammas`."""
    f = model.encode(x)
    g0, g1 = model.gamma.endpoints()
    gammas = gammas.to(device=f.device, dtype=f.dtype)
    T = len(gammas) - 1
    i = torch.ceil(t * T).clamp_min(1).long()
    gamma_t, gamma_s = gammas[i], gammas[i - 1]
    z_t = process.sample_z_t(f, gamma_t[:, None, None, None], eps.to(f.dtype))
    eps_hat = model.eps_hat(z_t, gamma_t, conditioning)
    return {"prior": losses.prior_kl(f, g1),
            "recon": losses.reconstruction_loss(x, g0, eps_0.to(f.dtype), model.config.vocab_size),
            "diff": losses.diffusion_loss_discrete(gamma_s, gamma_t, T, eps.to(f.dtype), eps_hat)}


@torch.no_grad()
def diffusion_integrand(model: VDM, data: np.ndarray | Tensor, times: Sequence[float], *, seed: int = 0,
                        batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """The continuous-time diffusion-loss integrand ½·γ'(t)·E‖ε − ε̂(z_t; t)‖²/D at each of `times`, in bits
    per dimension per unit time, averaged over the images `data` (N, C, H, W): shape (len(times),).

    Its integral over t ∈ [0, 1] is the mean diffusion loss in bits per dimension (paper, eq. 17), so on the
    midpoint grid t_k = (k + ½)/P the mean of the values estimates it. One ε per image, the same at every t
    (common random numbers: the curve's wiggles are the model's, not the noise's). Eval mode, no gradients.
    """
    data = torch.as_tensor(np.asarray(data)) if not isinstance(data, Tensor) else data
    g = torch.Generator().manual_seed(int(seed))
    eps_all = torch.randn(data.shape, generator=g)
    D = model.num_dims(data)
    out = np.zeros(len(times), dtype=np.float64)
    bar = progress_bar(progress, desc="integrand", unit="img", total=len(times) * data.shape[0])
    with evaluation_mode(model, 0):
        for k, t in enumerate(times):
            total = 0.0
            for b in range(0, data.shape[0], batch_size):
                x = data[b:b + batch_size].to(model.device)
                eps = eps_all[b:b + batch_size].to(device=model.device, dtype=model.dtype)
                t_b = torch.full((x.shape[0],), float(t), device=model.device, dtype=model.dtype)
                gamma_t, dgamma_t = model.gamma.gamma_and_derivative(t_b)
                z_t = process.sample_z_t(model.encode(x), gamma_t[:, None, None, None], eps)
                diff = losses.diffusion_loss_continuous(dgamma_t, eps, model.eps_hat(z_t, gamma_t))
                total += float(losses.bits_per_dim(diff.double(), D).sum())
                bar.update(x.shape[0])
            out[k] = total / data.shape[0]
    bar.close()
    return out


def summarise(terms: np.ndarray, *, steps: int = 0, time_samples: int = 1) -> dict:
    """Mean bits per dimension over images, its standard error, and the mean of each term.

    `terms` is (N, 3) per-image prior, reconstruction and diffusion losses in bits per dimension.
    The standard error is sd(per-image totals, ddof = 1)/√N (NaN for a single image).
    """
    terms = np.asarray(terms, dtype=np.float64)
    total = terms.sum(1)
    n = total.shape[0]
    if n == 0:
        raise ValueError("no images to evaluate")
    sem = float(total.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    result = {"bpd": float(total.mean()), "bpd_sem": sem}
    result.update({c: float(terms[:, j].mean()) for j, c in enumerate(COMPONENTS)})
    result.update({"count": int(n), "steps": int(steps), "time_samples": int(time_samples)})
    return result


def evaluate(model: VDM, data: np.ndarray | Tensor, *, steps: int = 0, time_samples: int = 1,
             batch_size: int = 64, seed: int = 0, progress: bool = True, precision: str = "fp32",
             conditioning: float = 0.0) -> dict:
    """The test-set negative VLB of `model` on integer images `data` (N, C, H, W), in bits per dimension.

    Returns {"bpd", "bpd_sem" (standard error over images), "prior", "recon", "diff" (mean terms, bits per
    dimension), "count" (N), "steps" (0 = continuous time, else T), "time_samples" (K)}. Runs in eval mode
    without gradients; the model is left as it was. Deterministic for a given `seed`.
    """
    terms = image_losses(model, data, steps=steps, time_samples=time_samples, batch_size=batch_size,
                         seed=seed, progress=progress, precision=precision, conditioning=conditioning)
    return summarise(terms, steps=steps, time_samples=time_samples)


def format_result(r: dict) -> str:
    """One line: 'test bpd 4.123 ± 0.012 (prior …, recon …, diff …) on N images, continuous time'."""
    when = "continuous time" if r["steps"] == 0 else f"T = {r['steps']} steps"
    sem = "n/a" if math.isnan(r["bpd_sem"]) else f"{r['bpd_sem']:.3f}"
    return (f"test bpd {r['bpd']:.3f} ± {sem} (prior {r['prior']:.4f}, recon {r['recon']:.4f}, "
            f"diff {r['diff']:.4f}) on {r['count']} images, {when}, {r['time_samples']} time sample(s) each")


# --- the probability-flow ODE bound -------------------------------------------------------------------------
ODE_COMPONENTS = ("ode", "recon", "log_q")


@torch.no_grad()
def ode_image_terms(model: VDM, data: np.ndarray | Tensor, *, rtol: float = 1e-5, atol: float = 1e-5,
                    hutchinson: int | None = 1, batch_size: int = 64, seed: int = 0, progress: bool = True,
                    conditioning: float = 0.0) -> tuple[np.ndarray, list[int]]:
    """Per-image terms of the probability-flow bound on −log p(x), in bits per dimension: (N, 3) float64
    with columns −log p_ODE(z_0), −log p(x | z_0), log q(z_0 | x) (`ODE_COMPONENTS`), and the number of
    ODE function evaluations of each batch.

    With z_0 = α_0 f + σ_0 ε₀ ~ q(z_0 | x) (ε₀ the one drawn for image i by `image_noise`), the row sum is
    an unbiased one-draw estimate of E_q[−log p_ODE(z_0) − log p(x | z_0) + log q(z_0 | x)] ≥ −log p(x),
    where p(x) = ∫ p(x | z_0) p_ODE(z_0) dz_0 is the model with the probability flow in place of the
    diffusion (Song et al. 2021, section 4.3; Kingma et al. 2021, appendix). log p_ODE uses `hutchinson` = K
    Rademacher probes per image (from the generator of (seed, i, 1)), or the exact trace when None.
    `conditioning` is the network's conditioning input, as for `image_losses`.
    """
    data = torch.as_tensor(np.asarray(data)) if not isinstance(data, Tensor) else data
    N, shape, D = data.shape[0], tuple(data.shape[1:]), data[0].numel()
    out, calls = np.zeros((N, len(ODE_COMPONENTS)), dtype=np.float64), []
    bar = progress_bar(progress, desc="ODE bound", unit="img", total=N)
    g0 = model.gamma(torch.tensor(0.0, dtype=model.dtype, device=model.device))
    alpha_0, sigma_0 = process.alpha_sigma(g0)
    for start in range(0, N, batch_size):
        idx = range(start, min(start + batch_size, N))
        x = data[start:start + len(idx)].to(model.device)
        eps_0 = torch.cat([image_noise(seed, i, shape, 1)[2] for i in idx]).to(model.device, model.dtype)
        probes = None
        if hutchinson is not None:
            gens = [seeded_generator(seed, i, 1) for i in idx]
            probes = torch.stack([torch.randint(0, 2, (hutchinson, *shape), generator=g) for g in gens], 1)
            probes = (2 * probes - 1).to(model.device, model.dtype)  # (K, B, C, H, W) of ±1
        z_0 = alpha_0 * model.encode(x) + sigma_0 * eps_0
        cond = torch.full((len(idx),), float(conditioning), dtype=model.dtype, device=model.device)
        log_p, n = ode_log_likelihood(model, z_0, conditioning=cond, probes=probes, rtol=rtol, atol=atol,
                                      progress=progress)
        recon = losses.reconstruction_loss(x, g0, eps_0, model.config.vocab_size)
        log_q = -0.5 * eps_0.flatten(1).square().sum(1) - D * (torch.log(sigma_0) + 0.5 * math.log(2 * math.pi))
        terms = torch.stack([-log_p, recon, log_q], 1).double()
        out[start:start + len(idx)] = bits_per_dim(terms, D).cpu().numpy()
        calls.append(n)
        bar.update(len(idx))
    bar.close()
    return out, calls


def summarise_ode(terms: np.ndarray, calls: Sequence[int], *, hutchinson: int | None, rtol: float,
                  atol: float) -> dict:
    """The mean ODE bound over images in bits per dimension, its standard error over images, the mean of each
    term, and the function evaluations per batch (mean and max)."""
    total = np.asarray(terms, dtype=np.float64).sum(1)
    n = total.shape[0]
    if n == 0:
        raise ValueError("no images to evaluate")
    sem = float(total.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    r = {"ode_bpd": float(total.mean()), "ode_bpd_sem": sem}
    r.update({f"ode_{c}" if c != "ode" else "ode_nll": float(terms[:, j].mean())
              for j, c in enumerate(ODE_COMPONENTS)})
    r.update({"count": int(n), "function_evals": float(np.mean(calls)), "function_evals_max": int(max(calls)),
              "hutchinson": hutchinson, "exact_trace": hutchinson is None, "rtol": rtol, "atol": atol})
    return r
