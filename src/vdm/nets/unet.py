"""The VDM score network: a U-Net without downsampling that predicts ε from (z_t, conditioning).

Architecture of the official implementation (`ScoreUNet` in google-research/vdm `model_vdm.py`), in NCHW:
conv_in (3×3) on [z, Fourier features of z] → L residual blocks (outputs kept as skips) → middle
(block, single-head self-attention, block) → L + 1 up blocks on concat(h, skip) → GroupNorm, swish,
conv_out → + z. This module knows nothing of the diffusion: it sees z and a scalar t_c ∈ [0, 1] per example.

This is the one description of the architecture. Its pieces are published for the codec's exact network
(`vdm.codec.intnet`), which quantises what it finds here instead of restating it: the constants of the time
embedding and of the Fourier features, the conditioning MLP (`ScoreUNet.cond_layers`, each followed by swish),
and the ordered plan of the body (`ScoreUNet.layers`), which `ScoreUNet.forward` itself walks.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vdm.nets.winograd import conv3x3

GN_GROUPS = 32  # GroupNorm: min(32, C) groups …
GN_EPS = 1e-6  # … and this ε, everywhere in the network
TIME_SCALE = 1000.0  # the time embedding sees 1000·t_c …
LN_MAX_PERIOD = 9.210340371976184  # … at frequencies exp(−ln(10⁴)·i/(half − 1)) (the float64 nearest ln 10⁴)


def timestep_log_step(dim: int) -> float:
    """−ln(10⁴)/(half − 1): the time embedding's frequencies are exp(i·this), i = 0 … half − 1."""
    return -(LN_MAX_PERIOD / (dim // 2 - 1))


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of 1000·t, (B,) → (B, dim): [sin(1000 t ω_i), cos(1000 t ω_i)],
    ω_i = exp(−ln(10⁴)·i/(half − 1)), a zero appended when `dim` is odd. As in the official code, 1000·t is
    rounded to float32 even when the model runs in float64 (`timesteps.astype(float32)`), while the frequencies
    and the sines are computed in the working precision (float64 for a float64 model, float32 otherwise).
    """
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype, device=t.device) * timestep_log_step(dim))
    arg = (t * TIME_SCALE).to(torch.float32).to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def fourier_frequencies(exponents: Sequence[int]) -> list[float]:
    """2ⁿ·2π for n in `exponents` (float64; exact powers of two times the float64 2π)."""
    return [2.0 ** n * (2 * math.pi) for n in exponents]


def fourier_features(z: Tensor, exponents: Sequence[int]) -> Tensor:
    """[sin(2ⁿ·2π·z), cos(2ⁿ·2π·z)] for n in `exponents`, channel-major: (B, C, H, W) → (B, 2·C·len(n), H, W)."""
    n = len(exponents)
    w = torch.tensor(fourier_frequencies(exponents), dtype=z.dtype, device=z.device)
    h = z.repeat_interleave(n, dim=1) * w.repeat(z.shape[1])[None, :, None, None]
    return torch.cat([torch.sin(h), torch.cos(h)], dim=1)


def lecun_normal_(weight: Tensor) -> Tensor:
    """flax's default kernel init `lecun_normal`: a normal truncated at ±2 standard deviations, scaled so that
    the variance is 1/fan_in (fan_in = in_features, or in_channels·kh·kw for a convolution)."""
    if weight.is_meta:  # shapes only (FLOP counting): no values to draw
        return weight
    fan_in = weight[0].numel()
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # std of N(0, 1) truncated to [−2, 2]
    with torch.no_grad():
        flat = weight.view(-1)
        flat.normal_()
        out = (flat.abs() > 2).nonzero().squeeze(1)
        while out.numel():  # rejection: redraw the 4.6 % outside [−2, 2] (an exact truncated normal, and
            redraw = torch.randn(out.numel(), dtype=flat.dtype, device=flat.device)  # far faster than erfinv)
            flat[out] = redraw
            out = out[redraw.abs() > 2]
        return weight.mul_(std)


def official_init_(net: nn.Module) -> None:
    """The official initialisation: every Dense/Conv kernel `lecun_normal`, every bias zero, GroupNorm scale
    one and bias zero, and exact zeros in the layers that start each residual branch at zero — every block's
    `conv2` and `cond_proj`, attention's `proj_out` — and in `conv_out`."""
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            lecun_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in net.modules():
        zero = []
        if isinstance(m, ResnetBlock):
            zero = [m.conv2, m.cond_proj]
        elif isinstance(m, AttnBlock):
            zero = [m.proj_out]
        for layer in zero:
            nn.init.zeros_(layer.weight)
    if hasattr(net, "conv_out"):
        nn.init.zeros_(net.conv_out.weight)


class Conv3x3(nn.Conv2d):
    """3×3 convolution with padding 1; Winograd (NNPACK) inside `vdm.nets.winograd.use_winograd()`."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(in_ch, out_ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return conv3x3(x, self.weight, self.bias)


_dropout = threading.local()


@contextlib.contextmanager
def dropout_generator(generator: torch.Generator | None):
    """Within the block, on this thread, CPU dropout masks come from `generator` instead of torch's global one
    (so that parts of a batch run on several threads draw reproducible masks)."""
    previous = getattr(_dropout, "generator", None)
    _dropout.generator = generator
    try:
        yield
    finally:
        _dropout.generator = previous


class Dropout(nn.Dropout):
    """Dropout whose CPU mask comes from 31-bit integers (two per 64-bit draw of the generator) instead of
    `bernoulli_` on floats: the same distribution up to a rate rounded to 2⁻³¹, about twice as fast on CPU.
    Elsewhere (CUDA) it is `F.dropout`. The CPU generator is torch's global one unless `dropout_generator`
    names another."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        if self.p == 1.0:
            return x * 0.0
        n = x.numel()
        bits = torch.empty((n + 1) // 2, dtype=torch.int64).random_(generator=getattr(_dropout, "generator", None))
        bits = bits.view(torch.int32)[:n]  # ~U{0..2⁶³−1}
        keep = bits.bitwise_and(0x7FFFFFFF) >= round(self.p * 2**31)  # each 31-bit half is uniform
        return x * keep.view(x.shape).to(x.dtype).mul_(1.0 / (1.0 - self.p))


class GroupNorm(nn.GroupNorm):
    """GroupNorm with the official settings (32 groups, ε = 1e-6)."""

    def __init__(self, channels: int):
        super().__init__(min(GN_GROUPS, channels), channels, eps=GN_EPS)


class ResnetBlock(nn.Module):
    """GN → swish → conv3×3 → + Dense(cond) → GN → swish → dropout → conv3×3 (zero init) → + shortcut."""

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, dropout: float):
        super().__init__()
        self.norm1 = GroupNorm(in_ch)
        self.conv1 = Conv3x3(in_ch, out_ch)
        self.cond_proj = nn.Linear(cond_dim, out_ch, bias=False)
        self.norm2 = GroupNorm(out_ch)
        self.dropout = Dropout(dropout)
        self.conv2 = Conv3x3(out_ch, out_ch)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.cond_proj(cond)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H·W positions, with a residual connection."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = GroupNorm(ch)
        self.q = nn.Linear(ch, ch)
        self.k = nn.Linear(ch, ch)
        self.v = nn.Linear(ch, ch)
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (lin(h).unsqueeze(1) for lin in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        h = self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


@dataclass(frozen=True)
class Layer:
    """One step of the U-Net's body, in the order the forward pass takes them."""

    module: nn.Module  # a ResnetBlock (called with the conditioning) or an AttnBlock
    pop_skip: bool = False  # first concatenate the latest kept skip to the input, channels last (up path)
    push_skip: bool = False  # then keep the output as a skip (down path)


class ScoreUNet(nn.Module):
    """ε̂(z, t_c): `channels` image channels, width `n_embd`, depth `n_layer` (the official `sm_*` settings).

    The forward pass: cond = swish(dense1(swish(dense0([emb(t_c), conditioning])))); h = conv_in([z, Fourier
    features of z]), kept as the first skip; the `layers` in order; conv_out(swish(norm_out(h))) + z."""

    def __init__(self, channels: int = 3, n_embd: int = 128, n_layer: int = 32, dropout: float = 0.1,
                 attention: bool = False, fourier_exponents: Sequence[int] = (6, 7)):
        super().__init__()
        self.n_embd = n_embd
        self.fourier_exponents = tuple(fourier_exponents)
        cond_dim = 4 * n_embd
        self.dense0 = nn.Linear(n_embd + 1, cond_dim)
        self.dense1 = nn.Linear(cond_dim, cond_dim)
        in_ch = channels * (1 + 2 * len(self.fourier_exponents))
        self.conv_in = Conv3x3(in_ch, n_embd)

        def block(cin: int) -> ResnetBlock:
            return ResnetBlock(cin, n_embd, cond_dim, dropout)

        def attn() -> nn.Module:
            return AttnBlock(n_embd) if attention else nn.Identity()

        self.down = nn.ModuleList(block(n_embd) for _ in range(n_layer))
        self.down_attn = nn.ModuleList(attn() for _ in range(n_layer))
        self.mid_block1 = block(n_embd)
        self.mid_attn = AttnBlock(n_embd)
        self.mid_block2 = block(n_embd)
        self.up = nn.ModuleList(block(2 * n_embd) for _ in range(n_layer + 1))
        self.up_attn = nn.ModuleList(attn() for _ in range(n_layer + 1))
        self.norm_out = GroupNorm(n_embd)
        self.conv_out = Conv3x3(n_embd, channels)
        official_init_(self)
        self.cond_layers = (self.dense0, self.dense1)  # each followed by swish
        self.layers = self._plan()

    def _plan(self) -> tuple[Layer, ...]:
        """The body in order: each down block (its attention after it, if any) keeps a skip; the middle; each up
        block takes one."""
        plan: list[Layer] = []
        for blk, att in zip(self.down, self.down_attn):
            if isinstance(att, AttnBlock):
                plan += [Layer(blk), Layer(att, push_skip=True)]
            else:
                plan.append(Layer(blk, push_skip=True))
        plan += [Layer(self.mid_block1), Layer(self.mid_attn), Layer(self.mid_block2)]
        for blk, att in zip(self.up, self.up_attn):
            plan.append(Layer(blk, pop_skip=True))
            if isinstance(att, AttnBlock):
                plan.append(Layer(att))
        return tuple(plan)

    def inputs(self, z: Tensor) -> Tensor:
        """conv_in's input: z and its Fourier features, (B, C·(1 + 2·len(exponents)), H, W)."""
        if not self.fourier_exponents:
            return z
        return torch.cat([z, fourier_features(z, self.fourier_exponents)], dim=1)

    def forward(self, z: Tensor, t_c: Tensor, conditioning: Tensor | None = None) -> Tensor:
        """z (B, C, H, W); t_c (B,) normalised log-SNR in [0, 1]; conditioning (B,) scalar (zeros by default)."""
        if conditioning is None:
            conditioning = torch.zeros_like(t_c)
        temb = timestep_embedding(t_c, self.n_embd).to(z.dtype)
        cond = torch.cat([temb, conditioning.to(z.dtype)[:, None]], dim=1)
        for dense in self.cond_layers:
            cond = F.silu(dense(cond))

        h = self.conv_in(self.inputs(z))
        skips = [h]
        for layer in self.layers:
            if layer.pop_skip:
                h = torch.cat([h, skips.pop()], dim=1)
            h = layer.module(h, cond) if isinstance(layer.module, ResnetBlock) else layer.module(h)
            if layer.push_skip:
                skips.append(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return h + z
