"""`VDM`: the noise schedule and the score network, composed into the negative VLB and the sampler."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from vdm import losses, process
from vdm.nets.unet import ScoreUNet
from vdm.samplers import ancestral_sample, prior_latent
from vdm.schedule import SCHEDULE_KINDS, make_schedule


@dataclass
class VDMConfig:
    """Everything that defines a VDM model (the official `VDMConfig`, with our names)."""

    image_size: int = 32  # height = width of the training images (the network is fully convolutional)
    channels: int = 3  # image channels (3 for RGB, 1 for grey)
    vocab_size: int = 256  # number of discrete pixel values V
    gamma_type: str = "learned_linear"  # one of "fixed_linear", "learned_linear", "learned_nnet"
    gamma_min: float = -13.3  # initial γ(0); also the conditioning's lower constant
    gamma_max: float = 5.0  # initial γ(1); also the conditioning's upper constant
    timesteps: int = 0  # T for the discrete-time loss; 0 means continuous time
    n_embd: int = 128  # U-Net width C
    n_layer: int = 32  # U-Net depth L (residual blocks on the way down)
    dropout: float = 0.1  # dropout in the residual blocks
    attention: bool = False  # self-attention after every down and up block
    fourier_exponents: tuple[int, ...] = (6, 7)  # Fourier features sin/cos(2ⁿ·2π·z); () for none
    antithetic: bool = True  # low-discrepancy times across the batch
    variance_minimisation: bool = False  # shape of γ follows ∂E[L_diff²] (continuous time only)

    def __post_init__(self):
        self.fourier_exponents = tuple(int(n) for n in self.fourier_exponents)
        if self.gamma_type not in SCHEDULE_KINDS:
            raise ValueError(f"gamma_type {self.gamma_type!r} is not one of {', '.join(SCHEDULE_KINDS)}")
        for name in ("image_size", "channels", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {self.vocab_size}")
        if self.timesteps < 0 or self.n_layer < 0:
            raise ValueError("timesteps and n_layer must be non-negative")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["fourier_exponents"] = list(self.fourier_exponents)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VDMConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown VDMConfig field(s): {', '.join(unknown)}")
        return cls(**d)


class VDM(nn.Module):
    """A Variational Diffusion Model: γ(t) schedule + ε-prediction U-Net.

    `loss` gives the per-example negative VLB in nats split into prior, reconstruction and diffusion terms
    (plus bits per dimension); `sample` draws integer images with the ancestral sampler.
    """

    def __init__(self, config: VDMConfig | None = None, **overrides):
        super().__init__()
        config = config or VDMConfig()
        if overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.gamma = make_schedule(config.gamma_type, config.gamma_min, config.gamma_max)
        self.score_model = ScoreUNet(config.channels, config.n_embd, config.n_layer, config.dropout,
                                     config.attention, config.fourier_exponents)

    # --- pieces -------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.score_model.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.score_model.conv_in.weight.device

    def eps_hat(self, z_t: Tensor, gamma_t: Tensor, conditioning: Tensor | None = None) -> Tensor:
        """ε̂(z_t; γ_t): the network, its time input `time_conditioning(γ_t)`."""
        gamma_t = gamma_t.expand(z_t.shape[0]) if gamma_t.dim() == 0 else gamma_t
        return self.score_model(z_t, self.time_conditioning(gamma_t), conditioning)

    def time_conditioning(self, gamma_t):
        """The network's time input t_c = (γ_t − γ_min)/(γ_max − γ_min), γ_min and γ_max the config's constants
        (the official normalisation; t_c ∈ [0, 1] on the initial schedule). A tensor or a Python float."""
        c = self.config
        return (gamma_t - c.gamma_min) / (c.gamma_max - c.gamma_min)

    def encode(self, x: Tensor) -> Tensor:
        """Integer images → f ∈ (−1, 1) in the model's dtype."""
        return process.encode(x, self.config.vocab_size).to(self.dtype)

    def num_dims(self, x: Tensor) -> int:
        return x[0].numel()

    # --- the loss -----------------------------------------------------------------------------------------
    def sample_times(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """Diffusion times for one batch: antithetic (low-discrepancy) or i.i.d. uniform on [0, 1)."""
        if self.config.antithetic:
            return losses.antithetic_times(batch, generator=generator, device=self.device, dtype=self.dtype)
        return torch.rand(batch, generator=generator, device=self.device, dtype=self.dtype)

    def loss(self, x: Tensor, t: Tensor | None = None, eps: Tensor | None = None, eps_0: Tensor | None = None,
             *, conditioning: Tensor | None = None, generator: torch.Generator | None = None
             ) -> dict[str, Tensor]:
        """Negative VLB per example for integer images `x` (B, C, H, W).

        Returns a dict of (B,) tensors: "prior", "recon", "diff" (nats), "bpd" (bits per dimension of their
        sum) and "t" (the times used, after rounding up to the grid when `config.timesteps` = T > 0).
        `t` (B,), `eps` and `eps_0` (shaped like `x`) may be given; otherwise they are drawn (with `generator`).
        """
        _check_images(x, self.config)
        B = x.shape[0]
        f = self.encode(x)
        T = self.config.timesteps
        g0, g1 = self.gamma.endpoints()

        if eps_0 is None:
            eps_0 = torch.randn(f.shape, generator=generator, device=f.device, dtype=f.dtype)
        recon = losses.reconstruction_loss(x, g0, eps_0.to(f.dtype), self.config.vocab_size)
        prior = losses.prior_kl(f, g1)

        t = self.sample_times(B, generator) if t is None else t.to(device=f.device, dtype=f.dtype)
        if eps is None:
            eps = torch.randn(f.shape, generator=generator, device=f.device, dtype=f.dtype)
        eps = eps.to(f.dtype)

        # 2·L_diff per example, filled in below and read by the hook at backward time (a tensor written in
        # place rather than a dict entry, so that torch.compile can trace the hook without a graph break)
        hook = None
        if self.config.variance_minimisation and T == 0 and torch.is_grad_enabled():
            scale = torch.empty(B, device=f.device, dtype=f.dtype)
            hook = lambda grad: grad * scale  # noqa: E731
        if T > 0:
            t = losses.discretise_time(t, T)
        gamma_t, dgamma_t = self.gamma.gamma_and_derivative(t, shape_grad_hook=hook)
        if T > 0:
            gamma_s = self.gamma(t - 1.0 / T)
        z_t = process.sample_z_t(f, gamma_t[:, None, None, None], eps)
        eps_hat = self.eps_hat(z_t, gamma_t, conditioning)
        if T > 0:
            diff = losses.diffusion_loss_discrete(gamma_s, gamma_t, T, eps, eps_hat)
        else:
            diff = losses.diffusion_loss_continuous(dgamma_t, eps, eps_hat)
        if hook is not None:
            scale.copy_(2 * diff.detach())

        total = prior + recon + diff
        return {"prior": prior, "recon": recon, "diff": diff,
                "bpd": losses.bits_per_dim(total, self.num_dims(x)), "t": t.detach()}

    # --- sampling -----------------------------------------------------------------------------------------
    def sample_step(self, z_t: Tensor, i: int, T: int, noise: Tensor, conditioning: Tensor | None = None) -> Tensor:
        """Step i of T of the ancestral sampler: z_t at t = (T − i)/T → z_s at s = (T − i − 1)/T."""
        t = torch.tensor((T - i) / T, dtype=z_t.dtype, device=z_t.device)
        s = torch.tensor((T - i - 1) / T, dtype=z_t.dtype, device=z_t.device)
        gamma_t, gamma_s = self.gamma(t), self.gamma(s)
        eps_hat = self.eps_hat(z_t, gamma_t, conditioning)
        return process.ancestral_step(z_t, eps_hat, gamma_s, gamma_t, noise)

    def decode(self, z_0: Tensor) -> Tensor:
        """The decoder's most likely integer image argmax_x p(x | z_0) (int64, shaped like z_0)."""
        g0 = self.gamma(0.0)
        alpha_0, _ = process.alpha_sigma(g0)
        return losses.decoder_logits(z_0 / alpha_0, g0, self.config.vocab_size).argmax(-1)

    def sample(self, n: int, steps: int, generator: torch.Generator | None = None, *,
               image_size: int | tuple[int, int] | None = None, progress: bool = False) -> Tensor:
        """Draw `n` images with `steps` ancestral steps from z_1 ~ N(0, I); uint8 (n, C, H, W) when V ≤ 256.

        A method form of `vdm.samplers.ancestral_sample` (same noise order, so the same images for a seed).
        """
        z_1 = prior_latent(self, n, image_size=image_size, generator=generator)
        return ancestral_sample(self, z_1, steps, generator=generator, progress=progress)


def _check_images(x: Tensor, config: VDMConfig) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if x.is_floating_point() or x.is_complex():
        raise TypeError(f"x must be an integer tensor of pixel values, got {x.dtype}")
    if x.shape[1] != config.channels:
        raise ValueError(f"x has {x.shape[1]} channels, the model {config.channels}")
    if x.dtype == torch.uint8 and config.vocab_size >= 256:
        return  # every value is valid: skip the check (it would synchronise with the device)
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= config.vocab_size):
        raise ValueError(f"pixel values must lie in 0..{config.vocab_size - 1}, got {int(x.min())}..{int(x.max())}")
