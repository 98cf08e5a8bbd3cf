"""Extending the model: a new schedule or a changed network reaches the codec through one definition.

The codec's chain takes γ from the schedule's own `exact_gamma`, and the coding network walks the float
network's plan (`ScoreUNet.layers`, `cond_layers`), so a schedule or a network changed in one place is coded
as defined — or, for a schedule that gives no exact γ, refused when it is constructed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vdm.codec import CodingParams, compress_images, decompress_images
from vdm.codec.chain import gammas
from vdm.codec.intnet import CodingNetwork, exact_arithmetic
from vdm.model import VDM
from vdm.nets.unet import Layer, ScoreUNet, lecun_normal_
from vdm.schedule import Schedule

FAST = CodingParams(steps=3, grid_bits=2, tile=8, warmup=4, batch=4, threads=1)


class CosineSchedule(Schedule):
    """A toy schedule: γ(t) = γ₀ + (γ₁ − γ₀)·s(t), s(t) = (1 − cos(πt))/2, with its exact γ built from
    `ops.sin_cos` (cos(πt) = sin(π/2 − πt)) and correctly rounded arithmetic."""

    def __init__(self, gamma_0: float = -10.0, gamma_1: float = 6.0):
        super().__init__()
        self.gamma_0, self.gamma_1 = gamma_0, gamma_1
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def endpoints(self):
        return (torch.tensor(self.gamma_0, dtype=self.dtype), torch.tensor(self.gamma_1, dtype=self.dtype))

    def shape(self, t):
        return (1 - torch.cos(math.pi * t)) / 2, math.pi / 2 * torch.sin(math.pi * t)

    def exact_gamma(self, t, ops):
        _, cos = ops.sin_cos(np.multiply(np.asarray(t, dtype=np.float64), math.pi))
        return np.add(self.gamma_0, np.multiply(self.gamma_1 - self.gamma_0, np.multiply(np.subtract(1.0, cos), 0.5)))


class NoExactGamma(Schedule):
    """A schedule that defines γ but not the exact γ the codec needs."""

    def __init__(self):
        super().__init__()
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def endpoints(self):
        return torch.tensor(-10.0), torch.tensor(6.0)


def randomised(model: VDM, seed: int) -> VDM:
    """`model` with every weight drawn afresh (the zero-initialised layers too), so ε̂ depends on every layer."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.score_model.named_parameters():
            if p.dim() > 1:
                lecun_normal_(p)
            else:
                p.normal_(0.0, 0.1).add_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
    return model


def test_a_schedule_without_exact_gamma_is_refused_at_construction():
    with pytest.raises(TypeError, match="exact_gamma"):
        NoExactGamma()


def test_a_new_schedule_compresses_and_decompresses_exactly():
    torch.manual_seed(0)
    model = VDM(n_embd=32, n_layer=1, image_size=8, channels=3, dropout=0.0).eval()
    model.gamma = CosineSchedule()
    t = [i / 8 for i in range(9)]
    with torch.no_grad():
        want = model.gamma(torch.tensor(t, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(gammas(model, 8), want, rtol=0, atol=1e-5)  # the schedule's γ (float32)
    image = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    data = compress_images([image], model, FAST)
    np.testing.assert_array_equal(decompress_images(data, model)[0].pixels, image)


class NoMiddleAttention(ScoreUNet):
    """A network changed in one place: its plan skips the middle attention."""

    def _plan(self):
        return tuple(layer for layer in super()._plan() if layer.module is not self.mid_attn)


@pytest.mark.parametrize("net_cls, attention", [(ScoreUNet, True), (ScoreUNet, False), (NoMiddleAttention, False)])
def test_the_coding_network_walks_the_float_networks_plan(net_cls, attention):
    """With random weights in every layer, the coding network's ε̂ follows the float64 network's, for the
    paper's U-Net with and without attention in every block and for one whose plan was edited: within 5 % of
    the network's own contribution ε̂ − z, RMS (measured 1.3–1.9 %); walking the paper's plan on the edited
    network instead is off by 14 %."""
    model = VDM(n_embd=32, n_layer=2, image_size=8, channels=3, dropout=0.0, attention=attention).eval()
    model.score_model = net_cls(3, 32, 2, 0.0, attention)
    model = randomised(model, 1).double()
    assert all(isinstance(layer, Layer) for layer in model.score_model.layers)
    z = np.random.default_rng(2).standard_normal((2, 3, 8, 8))
    gamma = -2.0
    with torch.no_grad():
        want = model.eps_hat(torch.as_tensor(z), torch.tensor(gamma, dtype=torch.float64)).numpy()
    with exact_arithmetic(1):
        got = CodingNetwork(model).eps(z, gamma)
    contribution = math.sqrt(float(np.mean((want - z) ** 2)))
    assert contribution > 0.1
    assert math.sqrt(float(np.mean((got - want) ** 2))) < 0.05 * contribution


def test_the_plan_keeps_and_takes_one_skip_per_up_block():
    net = ScoreUNet(3, 32, 3, 0.0, attention=True)
    pushes = sum(layer.push_skip for layer in net.layers)
    pops = sum(layer.pop_skip for layer in net.layers)
    assert pushes + 1 == pops == len(net.up)  # conv_in's output is the first skip
