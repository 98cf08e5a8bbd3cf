"""Noise schedules γ(t): the log noise-to-signal ratio, strictly increasing on t ∈ [0, 1].

Every schedule is written as

    γ(t) = γ₀ + (γ₁ − γ₀)·s(t),   s(0) = 0,  s(1) = 1,  s non-decreasing,

so that the endpoints (γ₀, γ₁), which set the VLB, are apart from the interior shape s, which can be trained
to minimise the variance of the diffusion-loss estimator (paper, appendix on variance minimisation; the
continuous-time loss does not depend on the shape in expectation, section 5): the gradient that reaches the
parameters through s is replaced by that of the estimator's second moment (`shape_grad_hook`).

Each schedule returns γ(t) and its time derivative γ'(t) in one pass (`gamma_and_derivative`), so the
continuous-time loss never needs a second network evaluation or a Jacobian-vector product.

Each schedule also gives its γ(t) with the same bits on every machine (`exact_gamma`), from which the codec
derives its chain: a schedule that cannot is refused when it is constructed, not when an image is compressed.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from types import ModuleType

import numpy as np
import torch
from torch import Tensor, nn

SCHEDULE_KINDS = ("fixed_linear", "learned_linear", "learned_nnet")


class Schedule(nn.Module, metaclass=abc.ABCMeta):
    """Base class. Subclasses define the endpoints, the shape `s(t)` with its derivative (identity unless
    overridden), and `exact_gamma`; one that lacks a method marked abstract cannot be constructed."""

    @abc.abstractmethod
    def endpoints(self) -> tuple[Tensor, Tensor]:
        """(γ₀, γ₁) as 0-d tensors."""

    @abc.abstractmethod
    def exact_gamma(self, t: Sequence[float], ops: ModuleType) -> np.ndarray:
        """γ at the times `t` (float64, in order), with the same bits on every machine: the parameters widened
        to float64, then only correctly rounded float64 operations (+, −, ×, ÷, √, `math.fsum`) in a fixed
        order, and for elementary functions those of `ops` (the codec passes `vdm.codec.detmath`: exp,
        sigmoid, …, each deterministic), never a library's exp or a torch reduction. The codec's chain is
        derived from these values, so a file decodes only where they are reproduced bit for bit."""

    def shape(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(s(t), s'(t)), each the shape of `t`; identity for linear schedules."""
        return t, torch.ones_like(t)

    def gamma_and_derivative(self, t: Tensor, shape_grad_hook: Callable[[Tensor], Tensor] | None = None
                             ) -> tuple[Tensor, Tensor]:
        """γ(t) and dγ/dt at `t` (any shape).

        `shape_grad_hook`, when given, transforms the gradient that flows back into the shape s(t), s'(t)
        (and so into the shape parameters) at backward time; the loss uses it to turn the VLB gradient of
        the shape into the gradient of the estimator's second moment (∂E[L²]/∂η = E[2L·∂L/∂η]).
        """
        g0, g1 = self.endpoints()
        s, ds = self.shape(t)
        if shape_grad_hook is not None:
            for v in (s, ds):
                if v.requires_grad:
                    v.register_hook(shape_grad_hook)
        return g0 + (g1 - g0) * s, (g1 - g0) * ds

    def forward(self, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t, dtype=self.dtype, device=self.device)
        return self.gamma_and_derivative(t)[0]

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def device(self) -> torch.device:
        return self._anchor.device


class FixedLinearSchedule(Schedule):
    """γ(t) = γ_min + (γ_max − γ_min)·t, nothing learned (official "fixed")."""

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0):
        super().__init__()
        if not gamma_max > gamma_min:
            raise ValueError(f"gamma_max ({gamma_max}) must exceed gamma_min ({gamma_min})")
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)
        # constants, not parameters: kept as Python floats (exact in float64); the buffer carries dtype/device
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def endpoints(self) -> tuple[Tensor, Tensor]:
        kw = dict(dtype=self.dtype, device=self.device)
        return torch.tensor(self.gamma_min, **kw), torch.tensor(self.gamma_max, **kw)

    def exact_gamma(self, t: Sequence[float], ops: ModuleType) -> np.ndarray:
        return np.array([self.gamma_min + (self.gamma_max - self.gamma_min) * ti for ti in t], dtype=np.float64)


class LearnedLinearSchedule(Schedule):
    """γ(t) = b + |w|·t (official "learnable_scalar"), init b = γ_min, w = γ_max − γ_min."""

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0):
        super().__init__()
        self.b = nn.Parameter(torch.tensor([float(gamma_min)]))
        self.w = nn.Parameter(torch.tensor([float(gamma_max - gamma_min)]))

    @property
    def _anchor(self) -> Tensor:
        return self.b

    def endpoints(self) -> tuple[Tensor, Tensor]:
        return self.b[0], self.b[0] + self.w[0].abs()

    def exact_gamma(self, t: Sequence[float], ops: ModuleType) -> np.ndarray:
        b, w = float(_float64(self.b)[0]), abs(float(_float64(self.w)[0]))
        return np.array([b + w * ti for ti in t], dtype=np.float64)


class MonotoneNetSchedule(Schedule):
    """The paper's learned monotone network (official "learnable_nnet"): γ(t) = g(t) with

        g(t) = |w₁|·t + b₁ + Σⱼ |w₃ⱼ|·φ(|w₂ⱼ|·(2t − 1) + b₂ⱼ)/n,   φ(h) = 2·(sigmoid(h) − ½),   n = 1024

    (l1: 1→1, l2: 1→n, l3: n→1 without bias; every kernel through abs(), biases free). The endpoints
    γ₀ = g(0), γ₁ = g(1) are functions of the same parameters, so γ is non-decreasing by construction
    (γ₁ − γ₀ = |w₁| + a non-negative sum; strictly increasing unless every weight is zero) and official
    parameters convert exactly, with no derived value to store. It is evaluated as γ₀ + (γ₁ − γ₀)·s(t),
    s = (g − g(0))/(g(1) − g(0)), so that with variance minimisation the gradient reaching the parameters
    through the shape s is that of the estimator's second moment while the VLB gradient reaches them
    through the endpoints.
    """

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0, n_features: int = 1024):
        super().__init__()
        if not gamma_max > gamma_min:
            raise ValueError(f"gamma_max ({gamma_max}) must exceed gamma_min ({gamma_min})")
        self.n_features = n_features
        # the official initialisation: l1 constant (γ_max − γ_min, bias γ_min); l2, l3 kernels N(0, 0.01²)
        # (flax `normal()`), l2 bias 0
        self.l1_weight = nn.Parameter(torch.tensor(float(gamma_max - gamma_min)))
        self.l1_bias = nn.Parameter(torch.tensor(float(gamma_min)))
        self.l2_weight = nn.Parameter(torch.randn(n_features) * 0.01)
        self.l2_bias = nn.Parameter(torch.zeros(n_features))
        self.l3_weight = nn.Parameter(torch.randn(n_features) * 0.01)

    @property
    def _anchor(self) -> Tensor:
        return self.l1_bias

    def net(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """The official network g(t) and its derivative g'(t), elementwise over `t`."""
        t_ = t.unsqueeze(-1)
        w2, w3 = self.l2_weight.abs(), self.l3_weight.abs()
        h = w2 * (2 * t_ - 1) + self.l2_bias
        sig = torch.sigmoid(h)
        phi = 2 * (sig - 0.5)
        dphi = 2 * sig * (1 - sig)
        w1 = self.l1_weight.abs()
        g = w1 * t + self.l1_bias + (phi * w3).sum(-1) / self.n_features
        dg = w1 + (dphi * w2 * w3).sum(-1) * (2.0 / self.n_features)
        return g, dg

    def endpoints(self) -> tuple[Tensor, Tensor]:
        g, _ = self.net(torch.tensor([0.0, 1.0], dtype=self.dtype, device=self.device))
        return g[0], g[1]

    def exact_gamma(self, t: Sequence[float], ops: ModuleType) -> np.ndarray:
        """g(t) term by term: |w₁|·t + b₁ + fsum_j(|w₃ⱼ|·φ(|w₂ⱼ|·(2t − 1) + b₂ⱼ))/n, φ(h) = 2·(ops.sigmoid(h) − ½)."""
        w1, b1 = abs(float(_float64(self.l1_weight))), float(_float64(self.l1_bias))
        w2, b2, w3 = np.abs(_float64(self.l2_weight)), _float64(self.l2_bias), np.abs(_float64(self.l3_weight))
        out = []
        for ti in t:
            phi = np.multiply(np.subtract(ops.sigmoid(np.add(np.multiply(w2, 2.0 * ti - 1.0), b2)), 0.5), 2.0)
            out.append(w1 * ti + b1 + math.fsum(np.multiply(w3, phi)) / self.n_features)
        return np.array(out, dtype=np.float64)

    def shape(self, t: Tensor) -> tuple[Tensor, Tensor]:
        ends, _ = self.net(torch.tensor([0.0, 1.0], dtype=t.dtype, device=t.device))
        span = (ends[1] - ends[0]).clamp_min(torch.finfo(t.dtype).tiny)
        g, dg = self.net(t)
        return (g - ends[0]) / span, dg / span

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "gamma_0" in state_dict and prefix + "gamma_1" in state_dict:
            _fold_stored_endpoints(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _float64(p: Tensor) -> np.ndarray:
    """A parameter's values widened to float64 (exact), as numpy."""
    return p.detach().to("cpu", torch.float64).numpy()


def _fold_stored_endpoints(state: dict, prefix: str) -> None:
    """Load a state that stores the endpoints apart (`gamma_0`, `gamma_1`, with
    γ = γ₀ + (γ₁ − γ₀)·(g − g(0))/(g(1) − g(0))) into this parametrisation. That γ is the affine map
    a·g + c of the network, a = (γ₁ − γ₀)/(g(1) − g(0)) > 0, c = γ₀ − a·g(0): fold it into l1 and l3."""
    p = {k: state[prefix + k].detach().to(torch.float64) for k in
         ("gamma_0", "gamma_1", "l1_weight", "l1_bias", "l2_weight", "l2_bias", "l3_weight")}
    w2, w3 = p["l2_weight"].abs(), p["l3_weight"].abs()
    phi = 2 * (torch.sigmoid(w2 * torch.tensor([[-1.0], [1.0]], dtype=torch.float64) + p["l2_bias"]) - 0.5)
    g = p["l1_weight"].abs() * torch.tensor([0.0, 1.0], dtype=torch.float64) + p["l1_bias"] \
        + (phi * w3).sum(-1) / w3.numel()
    a = (p["gamma_1"] - p["gamma_0"]) / (g[1] - g[0])
    dtype = state[prefix + "l1_bias"].dtype
    state[prefix + "l1_weight"] = (a * p["l1_weight"].abs()).to(dtype)
    state[prefix + "l1_bias"] = (p["gamma_0"] + a * (p["l1_bias"] - g[0])).to(dtype)
    state[prefix + "l3_weight"] = (a * w3).to(dtype)
    del state[prefix + "gamma_0"], state[prefix + "gamma_1"]


def make_schedule(kind: str, gamma_min: float = -13.3, gamma_max: float = 5.0) -> Schedule:
    """The schedule named `kind` (one of SCHEDULE_KINDS), initialised at the given endpoints."""
    if kind == "fixed_linear":
        return FixedLinearSchedule(gamma_min, gamma_max)
    if kind == "learned_linear":
        return LearnedLinearSchedule(gamma_min, gamma_max)
    if kind == "learned_nnet":
        return MonotoneNetSchedule(gamma_min, gamma_max)
    raise ValueError(f"unknown schedule kind {kind!r}; expected one of {', '.join(SCHEDULE_KINDS)}")

