"""The chain's step spacing (format 5): SNR-weighted steps in γ, checked against closed forms.

For data x ~ N(0, s²) the exact ε-predictor leaves e(γ) = E(ε − ε̂)² = s²/(s² + e^γ) per dimension, so the
T-step chain's diffusion loss ½·Σ_i expm1(γ_i − γ_{i−1})·e(γ_i) and its continuous limit ½·∫e(γ)dγ =
½·[γ − ln(s² + e^γ)] are known exactly; e(γ)^½ is the density's family with a = 1, b = ln s².
"""

from __future__ import annotations

import hashlib
import math
import struct

import numpy as np
import pytest

from vdm.codec import container
from vdm.codec.chain import SPACING_INTERVALS, snr_spaced_gammas
from vdm.codec.container import CodecFormatError, CodingParams


def gaussian_chain_loss(g: np.ndarray, s2: float) -> float:
    return 0.5 * float(np.sum(np.expm1(np.diff(g)) * s2 / (s2 + np.exp(g[1:]))))


def gaussian_continuous_loss(g0: float, g1: float, s2: float) -> float:
    f = lambda g: g - math.log(s2 + math.exp(g))  # an antiderivative of s²/(s² + e^γ) … up to ln s²
    return 0.5 * (f(g1) - f(g0))


def test_endpoints_monotone_and_uniform_when_flat():
    g = snr_spaced_gammas(-12.1, 4.96, 200, 0.5, -7.5)
    assert len(g) == 201 and g[0] == -12.1 and g[-1] == 4.96 and np.all(np.diff(g) > 0)
    flat = snr_spaced_gammas(-13.3, 5.0, 50, 0.0, 0.0)  # a = 0: constant density, equal steps in γ
    np.testing.assert_allclose(flat, np.linspace(-13.3, 5.0, 51), rtol=0, atol=1e-12)


def test_steps_follow_the_density():
    """Step i spans an equal share of ∫ρ: Δγ_i·ρ(γ at its middle) is the same for every step (to O(Δγ²))."""
    a, b = 0.5, -7.5
    g = snr_spaced_gammas(-12.1, 4.96, 400, a, b)
    mid = 0.5 * (g[1:] + g[:-1])
    mass = np.diff(g) / np.sqrt(1 + np.exp(a * (mid - b)))
    np.testing.assert_allclose(mass, mass.mean(), rtol=2e-3)
    assert np.diff(g)[-1] > 5 * np.diff(g)[0]  # large steps where the data is already clear


def test_chain_loss_excess_matches_its_first_order_form_on_gaussian_data():
    """With steps of density ρ, the chain's loss exceeds its continuous limit by ¼·(∫ρ)·(∫e²/ρ)/T + O(1/T²)
    (per step ½·Δ²·(e + e′)/2, and e + e′ = e² here). Even steps (ρ = 1) and the SNR-weighted ones with the
    data's own family (ρ = e^½: a = 1, b = ln s²) both follow it, and the weighted ones are a third better."""
    s2, g0, g1, T = 0.05, -13.3, 5.0, 400
    limit = gaussian_continuous_loss(g0, g1, s2)
    grid = np.linspace(g0, g1, 400_001)
    e = s2 / (s2 + np.exp(grid))

    def integral(f):
        return float(np.sum(0.5 * (f[1:] + f[:-1])) * (grid[1] - grid[0]))

    for rho, g in ((np.ones_like(e), np.linspace(g0, g1, T + 1)),
                   (np.sqrt(e), snr_spaced_gammas(g0, g1, T, 1.0, math.log(s2)))):
        predicted = 0.25 * integral(rho) * integral(e * e / rho) / T
        assert gaussian_chain_loss(g, s2) - limit == pytest.approx(predicted, rel=0.03)
    even = gaussian_chain_loss(np.linspace(g0, g1, T + 1), s2) - limit
    spaced = gaussian_chain_loss(snr_spaced_gammas(g0, g1, T, 1.0, math.log(s2)), s2) - limit
    assert spaced < 0.7 * even


def test_the_spacing_is_pinned():
    """The grid is part of the format: these bits must not change (a change would strand version-5 files)."""
    g = snr_spaced_gammas(-12.109073638916016, 4.961147308349609, 200, 0.5, -7.5)
    digest = hashlib.sha256(struct.pack("<201d", *g)).hexdigest()
    assert SPACING_INTERVALS == 4096
    assert digest == PINNED, digest


PINNED = "41182feeee24678f598f2a85f4e35206744776ad788143dedcd6580f7c5426b3"


def test_spacing_fields_round_trip_and_bad_ones_are_refused():
    params = CodingParams(steps=3, spacing=1, spacing_a=300, spacing_b=-2000, error_knots=(3, 200, 0))
    c = container.Container(b"\1" * 16, params, 1, [container.ImageInfo(2, 4, 4)], [1],
                            np.array([1], dtype=np.uint32))
    data = container.pack(c)
    back = container.read_header(data)
    assert back.params == params and back.version == container.VERSION == 7
    with pytest.raises(ValueError, match="spacing must be 0"):
        CodingParams(spacing=2)
    with pytest.raises(ValueError, match="spacing_a"):
        CodingParams(spacing_a=-1)
    bad = bytearray(data)
    at = bad.index(struct.pack("<d", 0.0)) + 8
    bad[at] = 7  # spacing kind 7
    bad = bytes(bad[:-4]) + struct.pack("<I", __import__("zlib").crc32(bytes(bad[:-4])))
    with pytest.raises(CodecFormatError, match="spacing"):
        container.read_header(bad)
