"""Bits-back compression: exact round trips, rate against the negative ELBO, file format robustness, CLI."""

from __future__ import annotations

import dataclasses
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import constriction
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdm import process
from vdm.checkpoint import save_model
from vdm.cli import main as vdm_main
from vdm.codec import (CodecFormatError, CodingParams, ModelMismatchError, compress_images, decompress_images,
                       read_header)
from vdm.codec import bitsback, compressor, container, tiling
from vdm.codec.chain import gammas, make_chain
from vdm.codec.compressor import _Network, seed_words
from vdm.evaluate import image_losses
from vdm.codec.images import ImageReadError, read_images, write_images
from vdm.model import VDM

FAST = CodingParams(steps=2, grid_bits=2, tile=8, warmup=4, batch=4, threads=1)


def model_fp(model) -> bytes:
    from vdm.checkpoint import model_fingerprint
    return model_fingerprint(model)[:container.FINGERPRINT_BYTES]


def tiny(seed: int = 0, channels: int = 3) -> VDM:
    torch.manual_seed(seed)
    return VDM(n_embd=32, n_layer=1, image_size=8, channels=channels, dropout=0.0).eval()


def some_images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (13, 10, 3), dtype=np.uint8),  # colour, odd size, edge tiles
            (np.arange(9 * 7).reshape(9, 7) * 3).astype(np.uint8),  # grey (H, W)
            rng.integers(100, 110, (5, 6, 1), dtype=np.uint8)]  # grey (H, W, 1)


@pytest.fixture(scope="module")
def model():
    return tiny(0)


@pytest.fixture(scope="module")
def packed(model):
    return compress_images(some_images(), model, FAST, names=["a.png", "b.npy", "c.npz:x"])


class WienerVDM(VDM):
    """A VDM whose ε̂ is the exact posterior mean E[ε | z_t] for data f ~ N(0, s²) per dimension:
    ε̂ = σ_t z_t / (α_t² s² + σ_t²). A closed-form, near-optimal model for discretised Gaussian images."""

    def __init__(self, s: float, **kw):
        super().__init__(**kw)
        self.s = s

    def eps_hat(self, z_t, gamma_t, conditioning=None):
        alpha, sigma = process.alpha_sigma(gamma_t.reshape(-1, 1, 1, 1))
        return sigma * z_t / (alpha.square() * self.s ** 2 + sigma.square())


# --- round trips --------------------------------------------------------------------------------------------
def test_conditioned_round_trip_decodes_with_the_conditioning_from_the_file(model):
    """A file coded with conditioning 1 decodes exactly, and its bits differ from those of conditioning 0, so
    the decoder must have used the recorded value (the tiny model's network reads its conditioning input)."""
    images = some_images(1)[:1]
    coded = compress_images(images, model, dataclasses.replace(FAST, conditioning=1.0))
    assert container.read_header(coded).params.conditioning == 1.0
    np.testing.assert_array_equal(decompress_images(coded, model)[0].pixels, images[0])
    assert coded != compress_images(images, model, FAST)


def test_round_trip_colour_grey_odd_sizes_in_one_file(model, packed):
    out = decompress_images(packed, model)
    for original, decoded in zip(some_images(), out):
        assert decoded.pixels.dtype == np.uint8 and decoded.pixels.shape == original.shape
        np.testing.assert_array_equal(decoded.pixels, original)
    assert [d.name for d in out] == ["a.png", "b.npy", "c.npz:x"]


def test_round_trip_grey_model_codes_colour_planes_separately():
    grey = tiny(1, channels=1)
    images = [np.random.default_rng(3).integers(0, 256, (6, 9, 3), dtype=np.uint8)]
    out = decompress_images(compress_images(images, grey, FAST), grey)
    np.testing.assert_array_equal(out[0].pixels, images[0])


def test_network_gives_the_same_bits_on_any_number_of_threads(model, monkeypatch):
    """A stage's evaluations run side by side on a thread pool when threads > 1: the same ε̂ bits as one by one
    (units of mixed sizes, as in the warm-up; more units than one evaluation takes)."""
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    chain = make_chain(gammas(model, 3), 3)
    rng = np.random.default_rng(5)
    groups = [rng.standard_normal((11, 3, 8, 8)), rng.standard_normal((3, 3, 4, 4))]
    with _Network(model, chain, threads=1) as one, _Network(model, chain, threads=3) as three:
        assert three.pool is not None
        for i in (1, 3):
            for a, b in zip(one(groups, i), three(groups, i), strict=True):
                assert a.shape == b.shape
                assert np.array_equal(a.view(np.uint64), b.view(np.uint64))


def test_the_thread_count_does_not_change_the_file(model):
    """The encoder's thread count is recorded (the decoder's default) but keys nothing: with 1 and 2 threads
    the same images give the same payload, and either file decodes with any thread count."""
    import dataclasses
    images = some_images(1)
    one = compress_images(images, model, FAST)
    two = compress_images(images, model, dataclasses.replace(FAST, threads=2))
    assert read_header(one).params.threads == 1 and read_header(two).params.threads == 2
    assert read_header(one).payload.tobytes() == read_header(two).payload.tobytes()
    for data, threads in ((one, 2), (two, 1)):
        for got, want in zip(decompress_images(data, model, threads=threads), images, strict=True):
            np.testing.assert_array_equal(got.pixels.reshape(want.shape), want)


def test_stage_round_trip_restores_the_stack_exactly(model):
    """Decoding a stage pops exactly what encoding pushed: the ANS stack returns to its initial words."""
    chain = make_chain(gammas(model, 2), 3)
    net = _Network(model, chain)
    x = np.random.default_rng(1).integers(0, 256, (2, 3, 4, 3))
    seed = seed_words(4000)
    coder = constriction.stream.stack.AnsCoder(seed)
    bitsback.encode_stage(coder, chain, net, [x])
    back = constriction.stream.stack.AnsCoder(coder.get_compressed())
    (y,) = bitsback.decode_stage(back, chain, net, [x.shape])
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(back.get_compressed(), seed)


def test_masking_is_a_free_involution_of_the_stack():
    """mask_stack changes the words a pop would read, costs 0 bits, and undoes itself."""
    seed = seed_words(64)
    coder = constriction.stream.stack.AnsCoder(seed)
    bitsback.mask_stack(coder, 3, 40)
    assert coder.num_bits() == 64 * 32
    assert not np.array_equal(coder.get_compressed(), seed)
    bitsback.mask_stack(coder, 3, 40)
    np.testing.assert_array_equal(coder.get_compressed(), seed)


def test_escaped_values_round_trip():
    """Values far outside a Gaussian's window are escaped and still decode exactly."""
    models = bitsback._Gaussians()
    coder = constriction.stream.stack.AnsCoder(seed_words(8))
    idx = np.array([0, 3, -400, 70000, 5])
    mean = np.array([0.2, 2.9, 0.0, -3.0, 5.4])
    bitsback.push_gaussian(coder, models, idx, mean, 2.0, escape=True)
    back = constriction.stream.stack.AnsCoder(coder.get_compressed())
    np.testing.assert_array_equal(bitsback.pop_gaussian(back, models, mean, 2.0, escape=True), idx)
    np.testing.assert_array_equal(back.get_compressed(), seed_words(8))


# --- rate -------------------------------------------------------------------------------------------------
def test_net_rate_is_close_to_the_negative_elbo():
    """The bits a stage adds to the stack match −ELBO_T (same T) of the model.

    Model: the exact Gaussian denoiser for discretised N(0, 0.3²) images (16 × 3 × 16 × 16 = 12288 dims),
    T = 200, grid σ/4. The ELBO estimate (one draw per step and dimension) has a standard error of ≈ 0.2 %;
    the coder's own excess (24-bit ANS probabilities, window tails, bits that are not perfectly random after
    pushes) measured 0.4 %; the tolerance 2 % covers both with margin while failing any accounting error
    (a lost log δ term or a wrong std is ≥ 10 %)."""
    s = 0.3
    m = WienerVDM(s, n_embd=32, n_layer=0, image_size=8, gamma_type="fixed_linear").eval()
    rng = np.random.default_rng(0)
    x = np.clip(np.floor((rng.normal(0, s, (16, 3, 16, 16)) + 1) * 128), 0, 255).astype(np.uint8)
    T = 200
    chain = make_chain(gammas(m, T), 2)
    coder = constriction.stream.stack.AnsCoder(seed_words(8000))
    before = coder.num_bits()

    def wiener_eps(groups, i):  # the same closed form as WienerVDM.eps_hat, in float64 on the chain's α, σ
        a, sg = chain.alpha[i], chain.sigma[i]
        return [sg * z / (a * a * s * s + sg * sg) for z in groups]

    bitsback.encode_stage(coder, chain, wiener_eps, [x])
    net = (coder.num_bits() - before) / x.size
    elbo = image_losses(m, x, steps=T, time_samples=T, seed=1, progress=False).sum(1).mean()  # −ELBO_T, bits/dim
    assert 4.0 < elbo < 12.0  # a sane number of bits per dimension, not a degenerate model
    assert net == pytest.approx(elbo, rel=0.02)


def test_snr_spaced_chain_codes_gaussian_data_at_its_own_elbo_and_below_even_steps():
    """The SNR-weighted chain (format 5) with the data's own density (a = 1, b = ln s²) codes the Wiener model's
    images at the chain's −ELBO (`image_losses(gammas=…)`), which is well below the evenly spaced chain's at the
    same T = 50 (closed-form excess ratio ≈ 0.64; tests/test_spacing.py)."""
    from vdm.codec.chain import snr_spaced_gammas
    s = 0.3
    m = WienerVDM(s, n_embd=32, n_layer=0, image_size=8, gamma_type="fixed_linear").eval()
    x = np.clip(np.floor((np.random.default_rng(0).normal(0, s, (16, 3, 16, 16)) + 1) * 128), 0, 255
                ).astype(np.uint8)
    T = 50
    even = gammas(m, T)
    spaced = snr_spaced_gammas(float(even[0]), float(even[-1]), T, 1.0, math.log(s * s))
    rates = {}
    for name, g in (("even", even), ("spaced", spaced)):
        chain = make_chain(g, 2)
        coder = constriction.stream.stack.AnsCoder(seed_words(8000))
        before = coder.num_bits()
        eps = lambda groups, i: [chain.sigma[i] * z / (chain.alpha[i] ** 2 * s * s + chain.sigma[i] ** 2)
                                 for z in groups]
        bitsback.encode_stage(coder, chain, eps, [x])
        net = (coder.num_bits() - before) / x.size
        elbo = image_losses(m, x, time_samples=T, seed=1, progress=False, gammas=g).sum(1).mean()
        assert net == pytest.approx(elbo, rel=0.02), name
        rates[name] = net
    assert rates["spaced"] < rates["even"] - 0.2


def test_chain_elbo_with_the_even_grid_is_the_discrete_time_elbo():
    """`image_losses(gammas=γ(i/T))` is the T-step loss `image_losses(steps=T)` (same draws; γ by detmath)."""
    m = tiny(3)
    x = np.stack(some_images(2)[:1] * 4).transpose(0, 3, 1, 2)[:, :, :8, :8].copy()
    a = image_losses(m, x, steps=20, time_samples=5, seed=2, progress=False)
    b = image_losses(m, x, time_samples=5, seed=2, progress=False, gammas=gammas(m, 20))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


class WienerCoding:
    """Stands in for the coding network of a WienerVDM: its closed-form ε̂ in float64."""

    def __init__(self, model, device="cpu", version=None):
        self.s = model.s

    def eps(self, z, gamma, conditioning=0.0):
        a2, s2 = 1 / (1 + np.exp(gamma)), 1 / (1 + np.exp(-gamma))
        return np.sqrt(s2) * z / (a2 * self.s ** 2 + s2)


def test_whole_file_rate_is_close_to_the_negative_elbo(monkeypatch):
    """`compress_images` over many stages (8×8 tiles, 4×4 warm-up pieces) keeps the whole file within 2 % of
    −ELBO_T. Measured 0.8 % (0.6 % of it the top-up words of a file this small). Fails if a stage reads past the
    bottom of the stack (its pops draw latents from zeros and each such stage feeds garbage to the next: ≈ 50 %
    over before top-up words existed) or without the masking of popped bits (2.5 % over)."""
    s = 0.3
    m = WienerVDM(s, n_embd=32, n_layer=0, image_size=8, gamma_type="fixed_linear").eval()
    rng = np.random.default_rng(0)
    x = np.clip(np.floor((rng.normal(0, s, (16, 3, 16, 16)) + 1) * 128), 0, 255).astype(np.uint8)
    params = CodingParams(steps=100, grid_bits=2, tile=8, warmup=4, batch=8, threads=1, error_knots=())
    monkeypatch.setattr(compressor, "CodingNetwork", WienerCoding)
    data = compress_images([t.transpose(1, 2, 0) for t in x], m, params)
    c = read_header(data)
    assert len(c.stages) > 4  # really many stages
    assert c.params.error_knots == ()  # the reverse steps have the posterior's variance, as −ELBO_T assumes
    elbo = image_losses(m, x, steps=100, time_samples=100, seed=1, progress=False).sum(1).mean()
    rate = 8 * len(data) / x[0].size / len(x)
    assert rate == pytest.approx(elbo, rel=0.02)
    out = decompress_images(data, m)
    np.testing.assert_array_equal(np.stack([o.pixels.transpose(2, 0, 1) for o in out]), x)


@pytest.mark.parametrize("steps", [10, 40])
def test_fitted_reverse_variances_code_smaller_files(monkeypatch, steps):
    """With the error knots the encoder measures, p(z_s | z_t) has the variance fitted to the step, which must
    take bits off the file most at few steps (Wiener model: exact ε̂ for Gaussian data, so the measured errors
    are the true ones); both files decode exactly. Measured 59 % (T = 10) and 19 % (T = 40) smaller."""
    s = 0.3
    m = WienerVDM(s, n_embd=32, n_layer=0, image_size=8, gamma_type="fixed_linear").eval()
    x = np.clip(np.floor((np.random.default_rng(1).normal(0, s, (8, 3, 16, 16)) + 1) * 128), 0, 255)
    images = [t.transpose(1, 2, 0).astype(np.uint8) for t in x]
    monkeypatch.setattr(compressor, "CodingNetwork", WienerCoding)
    base = CodingParams(steps=steps, grid_bits=2, tile=8, warmup=4, batch=8, threads=1)
    posterior = compress_images(images, m, dataclasses.replace(base, error_knots=()))
    fitted = compress_images(images, m, base)
    knots = read_header(fitted).params.error_knots
    assert len(knots) == compressor.ERROR_KNOTS and max(knots) > 0
    assert len(fitted) < (0.6 if steps == 10 else 0.9) * len(posterior)
    for data in (posterior, fitted):
        np.testing.assert_array_equal(np.stack([o.pixels for o in decompress_images(data, m)]), np.stack(images))


def test_error_knots_set_the_reverse_variances():
    """`knot_errors` interpolates the knots linearly in γ; `variance_ratio` is 1 + expm1(Δγ)·ē, capped."""
    from vdm.codec.chain import MAX_VARIANCE_RATIO, knot_errors, variance_ratio
    g = np.array([-10.0, -8.0, -5.0, 0.0, 5.0])
    e = knot_errors(g, (0, 128, 64))  # ē = 0 at γ = −10, 1 at −2.5, 0.5 at 5
    np.testing.assert_allclose(e[1:], [2 / 7.5, 5 / 7.5, 1 - 0.5 * 2.5 / 7.5, 0.5])
    r = variance_ratio(g, e)
    np.testing.assert_allclose(r[1:3], 1 + np.expm1(np.diff(g))[:2] * e[1:3])
    assert r[3] == r[4] == MAX_VARIANCE_RATIO  # 1 + expm1(5)·ē ≈ 124 and 75: capped
    assert np.all(knot_errors(g, (77,))[1:] == 77 / 128)


def test_zero_size_images_are_refused_before_coding(model):
    with pytest.raises(ValueError, match="zero size"):
        compress_images([np.zeros((0, 5, 3), np.uint8)], model, FAST)


def test_whole_planes_too_large_for_attention_are_refused(model):
    big = np.zeros((300, 300), np.uint8)
    params = CodingParams(steps=2, tile=0, warmup=8, batch=1, threads=1)
    with pytest.raises(ValueError, match="too large to code whole"):
        compress_images([big], model, params)
    forged = container.Container(model_fp(model), params, 1, [container.ImageInfo(0, 300, 300)], [1],
                                 seed_words(1))  # a header no encoder writes: refused, not a long hang
    with pytest.raises(CodecFormatError, match="too large"):
        decompress_images(container.pack(forged), model)


def test_a_stage_short_of_bits_is_coded_again_with_top_up_words(model, monkeypatch):
    """With a wildly optimistic estimate of the bits a stage borrows, the encoder still never lets a stage read
    past the bottom of the stack: it detects it and codes the stage again over fresh top-up words."""
    from vdm.codec import compressor
    lows = []
    real = bitsback.encode_stage

    def recording(*a, **kw):
        lows.append(real(*a, **kw))
        return lows[-1]

    monkeypatch.setattr(bitsback, "deficit_bits_per_dim", lambda chain: 0.01)
    monkeypatch.setattr(compressor, "SLACK_BITS", 0)
    monkeypatch.setattr(bitsback, "mask_words", lambda n, std: 1)  # masks alone would lend bits past the bottom
    monkeypatch.setattr(bitsback, "encode_stage", recording)
    images = some_images(4)
    data = compress_images(images, model, FAST)
    c = read_header(data)
    assert sum(c.topups) > 0
    assert len(lows) > len(c.stages)  # some stage was coded more than once
    assert min(lows) < compressor.SAFE_BITS  # … because a first attempt ran dry
    for original, decoded in zip(images, decompress_images(data, model)):  # (decoder masks the same way)
        np.testing.assert_array_equal(decoded.pixels, original)


def test_stage_bits_account_for_the_whole_payload(model):
    """The stages' code lengths (what each kept `bitsback.encode_stage` added to the stack), plus the top-up
    words and the initial words, are the payload's size exactly (the stack's bits telescope over the stages)."""
    from vdm.codec.compressor import seed_words
    from vdm.testing import recorded_stage_bits
    with recorded_stage_bits() as stage_bits:
        data = compress_images(some_images(4), model, FAST)
    c = read_header(data)
    assert len(stage_bits) == len(c.stages)
    start = constriction.stream.stack.AnsCoder(seed_words(c.seed_words)).num_bits()
    end = constriction.stream.stack.AnsCoder(c.payload).num_bits()
    assert start + sum(stage_bits) + 32 * sum(c.topups) == end


def test_file_rate_counts_every_byte(model, packed):
    """The reported rate is the file size: header + payload (whole final stack, seed included) + checksum."""
    c = read_header(packed)
    assert len(packed) >= 4 * len(c.payload) + 4 + 1 + 16 + 4
    assert len(c.payload) >= c.seed_words


def test_warmup_cuts_tiles_into_quadrants_down_to_the_warmup_side(model):
    chain = make_chain(gammas(model, 4), 2)
    per_dim = bitsback.deficit_bits_per_dim(chain)
    assert 6.0 < per_dim < 10.0  # two pops of ≈ log2(√(2πe)·4) ≈ 4.05 bits in flight
    tiles = tiling.plan_units([(3, 64, 32)], 3, 32)
    always = tiling.WarmupPlan(tiles, 8, lambda u: True)
    units = list(always)
    # the first tile becomes 8×8 pieces in quadtree order; the second is still a warm-up tile (no whole tile
    # was coded yet), so it is cut too
    assert [(u.y, u.x, u.h, u.w) for u in units[:5]] == [(0, 0, 8, 8), (0, 8, 8, 8), (8, 0, 8, 8), (8, 8, 8, 8),
                                                         (0, 16, 8, 8)]
    assert len(units) == 32 and always.flags == [True] * 10
    once = tiling.WarmupPlan(tiles, 8, lambda u: u.h == 32 and u.y == 0)  # cut the first tile into 16×16 only
    units = list(once)
    assert [(u.h, u.w) for u in units] == [(16, 16)] * 4 + [(32, 32)]
    assert once.flags == [True, False, False, False, False, False]
    assert tiling.replay_units(tiles, 8, once.flags) == units
    with pytest.raises(ValueError):
        tiling.replay_units(tiles, 8, once.flags[:-1])
    with pytest.raises(ValueError):
        tiling.replay_units(tiles, 8, once.flags + [False])


# --- tiling -------------------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([1, 3]), st.integers(1, 20), st.integers(1, 20)), min_size=1, max_size=3),
       st.integers(0, 9), st.integers(0, 5), st.sampled_from([1, 3]), st.lists(st.booleans(), min_size=1))
def test_units_cover_every_subpixel_once(shapes, tile, warmup, model_channels, choices):
    if model_channels == 3 and any(c not in (1, 3) for c, _, _ in shapes):
        return
    cover = [np.zeros((c, h, w), int) for c, h, w in shapes]
    tiles = tiling.plan_units(shapes, model_channels, tile)
    k = iter(range(10 ** 9))
    plan = tiling.WarmupPlan(tiles, warmup, lambda u: choices[next(k) % len(choices)])
    units = list(plan)
    assert tiling.replay_units(tiles, warmup, plan.flags) == units
    for u in units:
        chans = tiling.plane_channels(shapes[u.image][0], model_channels)[u.plane]
        for c in set(chans):
            cover[u.image][c, u.y:u.y + u.h, u.x:u.x + u.w] += 1
    assert all((c == 1).all() for c in cover)


# --- refusing bad files -------------------------------------------------------------------------------------
def test_wrong_model_is_refused_with_a_clear_error(packed):
    with pytest.raises(ModelMismatchError, match="different model"):
        decompress_images(packed, tiny(7))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_corruptions_are_refused(model, packed, data):
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "append"]))
    b = bytearray(packed)
    if kind == "flip":
        pos = data.draw(st.integers(0, 8 * len(b) - 1))
        b[pos // 8] ^= 1 << (pos % 8)
    elif kind == "truncate":
        b = b[:data.draw(st.integers(0, len(b) - 1))]
    else:
        pos = len(b) if kind == "append" else data.draw(st.integers(0, len(b)))
        b[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    with pytest.raises(CodecFormatError):
        decompress_images(bytes(b), model)


def _recrc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_corrupt_payload_with_valid_checksum_is_refused(model, packed):
    """Past the checksum, a damaged payload still cannot yield images: the stack must end at its seed."""
    body = bytearray(packed[:-4])
    body[-6] ^= 0x10  # inside the payload's last words
    with pytest.raises(CodecFormatError):
        decompress_images(_recrc(bytes(body)), model)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_bit_flips_behind_a_recomputed_checksum_are_refused(model, packed, data):
    """Flips the checksum cannot see (it is recomputed) end in a clear error, never in wrong pixels. (A flip in
    an image's name, which the checksum alone protects, gives the right pixels under another name.)"""
    body = bytearray(packed[:-4])
    for pos in data.draw(st.lists(st.integers(8 * 5, 8 * len(body) - 1), min_size=1, max_size=3, unique=True)):
        body[pos // 8] ^= 1 << (pos % 8)
    try:
        decoded = decompress_images(_recrc(bytes(body)), model)
    except (CodecFormatError, ModelMismatchError):
        return
    expected = some_images()
    assert len(decoded) == len(expected)
    for got, want in zip(decoded, expected):
        np.testing.assert_array_equal(np.asarray(got.pixels).reshape(want.shape), want)


def test_image_table_stores_runs_of_equal_images_compactly():
    infos = [container.ImageInfo(2, 32, 32)] * 64 + [container.ImageInfo(0, 5, 7, "g.png")]
    c = container.Container(b"\2" * 16, FAST, 1, infos, [65], seed_words(1))
    data = container.pack(c)
    assert container.read_header(data).images == infos
    # magic, version, fingerprint, 7 parameters, conditioning, splits, runs, stages, one word, crc
    assert len(data) <= 4 + 1 + 16 + 7 + 8 + 1 + 2 * 6 + 11 + 2 + 4 + 4


def test_conditioning_round_trips_and_old_versions_are_named():
    infos = [container.ImageInfo(2, 4, 4)]
    params = container.CodingParams(steps=3, conditioning=1.0)
    data = container.pack(container.Container(b"\2" * 16, params, 1, infos, [1], seed_words(1)))
    assert container.read_header(data).params.conditioning == 1.0
    old = bytearray(data)
    old[4] = 2
    with pytest.raises(CodecFormatError, match="version 2.*older vdm"):
        container.read_header(_recrc(bytes(old)))
    with pytest.raises(ValueError, match="conditioning"):
        container.CodingParams(conditioning=float("nan"))


def test_header_keeps_top_ups_and_split_flags():
    flags = [True, False, True, True, False, False, False, True, True, False, True]  # 11 flags: 2 bytes
    c = container.Container(b"\3" * 16, FAST, 0, [container.ImageInfo(2, 8, 8)] * 3, [1, 2, 3],
                            seed_words(5), [4, 0, 1], flags)
    back = container.read_header(container.pack(c))
    assert back.stages == [1, 2, 3] and back.topups == [4, 0, 1] and back.splits == flags
    with pytest.raises(ValueError):
        container.Container(b"\3" * 16, FAST, 0, [], [1, 2], seed_words(1), [0])  # one top-up count per stage


def test_absurd_header_with_valid_checksum_is_refused(model):
    c = container.Container(b"\0" * 16, FAST, 2, [container.ImageInfo(2, 1 << 15, 1 << 15)], [1],
                            seed_words(2))
    with pytest.raises(CodecFormatError, match="implausibly large"):
        decompress_images(container.pack(c), model)
    assert container.read_header(container.pack(
        container.Container(b"\1" * 16, FAST, 2, [container.ImageInfo(0, 3, 4, "é.png")], [1], seed_words(2))
    )).images[0].name == "é.png"


# --- files and the command line -----------------------------------------------------------------------------
def test_image_files_round_trip(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    rgb, grey = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8), rng.integers(0, 256, (3, 2), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.savez(tmp_path / "z.npz", g=grey, h=rgb)
    items = read_images(tmp_path / "a.png") + read_images(tmp_path / "z.npz")
    assert [n for n, _ in items] == ["a.png", "z.npz:g", "z.npz:h"]
    write_images(items, tmp_path / "out")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "a.png")), rgb)
    with np.load(tmp_path / "out" / "z.npz") as z:
        np.testing.assert_array_equal(z["g"], grey)
    # existing outputs are refused (nothing written) unless forced; any member name works, even "file"
    (tmp_path / "out" / "a.png").write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="a.png"):
        write_images(items + [("new.npz:file", grey)], tmp_path / "out")
    assert (tmp_path / "out" / "a.png").read_bytes() == b"keep" and not (tmp_path / "out" / "new.npz").exists()
    write_images(items + [("new.npz:file", grey)], tmp_path / "out", force=True)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "a.png")), rgb)
    with np.load(tmp_path / "out" / "new.npz") as z:
        np.testing.assert_array_equal(z["file"], grey)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="bad.png"):
        read_images(tmp_path / "bad.png")
    np.save(tmp_path / "f.npy", np.zeros((3, 3), np.float32))
    with pytest.raises(ImageReadError, match="uint8"):
        read_images(tmp_path / "f.npy")


def test_resource_errors_are_not_reported_as_corruption(model, packed, monkeypatch):
    """Running out of memory while decoding is the machine's problem, not the file's: it propagates."""
    def out_of_memory(*args, **kwargs):
        raise MemoryError("simulated")
    monkeypatch.setattr(bitsback, "decode_stage", out_of_memory)
    with pytest.raises(MemoryError):
        decompress_images(packed, model)


def test_separate_processes_round_trip(tmp_path):
    """`python -m vdm compress` in one process, `python -m vdm decompress` in another: identical pixels."""
    save_model(tiny(0), tmp_path / "m.safetensors")
    rng = np.random.default_rng(5)
    np.save(tmp_path / "img.npy", rng.integers(0, 256, (10, 7, 3), dtype=np.uint8))
    np.save(tmp_path / "g.npy", rng.integers(0, 256, (6, 9), dtype=np.uint8))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    common = ["--model", str(tmp_path / "m.safetensors"), "-q"]
    run = lambda *a: subprocess.run([sys.executable, "-m", "vdm", *a], env=env, capture_output=True, text=True)
    r = run("compress", str(tmp_path / "img.npy"), str(tmp_path / "g.npy"), "-o", str(tmp_path / "x.vdmc"),
            "--steps", "2", "--tile", "8", "--warmup", "4", "--threads", "1", *common)
    assert r.returncode == 0, r.stderr
    assert "bits per sub-pixel" in r.stdout
    r = run("decompress", str(tmp_path / "x.vdmc"), "-o", str(tmp_path / "out"), *common)
    assert r.returncode == 0, r.stderr
    for name in ("img.npy", "g.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / "out" / name), np.load(tmp_path / name))


def test_cli_errors_exit_nonzero_without_traceback(tmp_path, capsys, packed):
    save_model(tiny(9), tmp_path / "other.safetensors")
    (tmp_path / "x.vdmc").write_bytes(packed)
    (tmp_path / "trunc.vdmc").write_bytes(packed[:40])
    cases = [
        (["compress", str(tmp_path / "missing.png"), "-o", str(tmp_path / "o.vdmc"),
          "--model", str(tmp_path / "other.safetensors")], "missing.png"),
        (["decompress", str(tmp_path / "x.vdmc"), "-o", str(tmp_path / "d"),
          "--model", str(tmp_path / "other.safetensors")], "different model"),
        (["decompress", str(tmp_path / "trunc.vdmc"), "-o", str(tmp_path / "d")], "truncated or corrupted"),
        (["decompress", str(tmp_path / "x.vdmc"), "-o", str(tmp_path / "d"),
          "--model", str(tmp_path / "nothing")], "no such file"),
    ]
    for argv, message in cases:
        assert vdm_main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_missing_packaged_model_gives_a_clear_error(monkeypatch, tmp_path):
    import vdm.pretrained as pre
    monkeypatch.setattr(pre, "PRETRAINED_DIR", tmp_path)
    with pytest.raises(pre.PretrainedMissingError, match="docs/pretrained/README.md"):
        pre.default_model_path()


def test_decompress_finds_the_packaged_model_that_made_the_file(monkeypatch, tmp_path, capsys):
    """With several packaged models, a file made with an older one still decodes without --model; a file made
    with a model that is not packaged is refused, naming its fingerprint."""
    import vdm.pretrained as pre
    packaged = tmp_path / "pretrained"
    packaged.mkdir()
    save_model(tiny(1), packaged / "compress_v1.safetensors")
    save_model(tiny(2), packaged / "compress.safetensors")
    save_model(tiny(3), tmp_path / "elsewhere.safetensors")
    save_model(tiny(4), packaged / pre.SAMPLING_MODEL)  # packaged, but not a compression model
    monkeypatch.setattr(pre, "PRETRAINED_DIR", packaged)
    assert [p.name for p in pre.packaged_models()] == ["compress.safetensors", "compress_v1.safetensors"]
    img = np.random.default_rng(5).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.save(tmp_path / "img.npy", img)
    for name, model_args in (("old", ["--model", str(packaged / "compress_v1.safetensors")]), ("new", [])):
        out = tmp_path / f"{name}.vdmc"
        assert vdm_main(["compress", str(tmp_path / "img.npy"), "-o", str(out), "--steps", "4", "-q",
                         *model_args]) == 0
        assert vdm_main(["decompress", str(out), "-o", str(tmp_path / name), "-q"]) == 0
        np.testing.assert_array_equal(np.load(tmp_path / name / "img.npy"), img)
    assert container.read_header((tmp_path / "old.vdmc").read_bytes()).fingerprint == model_fp(tiny(1))
    foreign = tmp_path / "foreign.vdmc"
    assert vdm_main(["compress", str(tmp_path / "img.npy"), "-o", str(foreign), "--steps", "4", "-q",
                     "--model", str(tmp_path / "elsewhere.safetensors")]) == 0
    capsys.readouterr()
    assert vdm_main(["decompress", str(foreign), "-o", str(tmp_path / "f"), "-q"]) == 2
    err = capsys.readouterr().err
    assert model_fp(tiny(3)).hex() in err and "not packaged" in err and "Traceback" not in err


def test_fuzzed_files_are_refused_or_decode_exactly(model):
    """A seeded slice of bench/fuzz_codec.py: mutated files (checksums mostly recomputed) are refused with a
    format or model error, or decode to exactly the original pixels; nothing else, and nothing slow."""
    from vdm.codec.fuzz import fuzz
    rng = np.random.default_rng(11)
    originals = [some_images(2), [rng.integers(0, 256, (6, 5, 1), dtype=np.uint8)] * 2]
    files = [compress_images(imgs, model, FAST, names=[f"{i}.png" for i in range(len(imgs))]) for imgs in originals]
    report = fuzz(files, originals, model, 400, seed=3, time_limit=10.0)
    assert report.ok, (report.crashes + report.wrong + report.slow)[:5]
    assert report.refused > 300 and report.cases == 400
    assert set(report.by_mutation) == {"flip", "overwrite", "truncate", "splice", "insert", "delete", "forge"}


def test_a_forged_image_table_does_not_decode():
    """Changing an image's declared layout (grey ↔ RGB) and recomputing the checksum makes the stream fail its
    checks: the masks depend on the whole header (container.coding_key)."""
    from vdm.codec.fuzz import recrc
    model = tiny(0)
    img = np.random.default_rng(4).integers(0, 256, (6, 6, 1), dtype=np.uint8)
    data = bytearray(compress_images([img], model, FAST))
    c = container.read_header(bytes(data))
    assert c.images[0].mode == 1
    pos = bytes(data).index(bytes([1, 1, 1, 6, 6]))  # run count 1 image table: n_runs, count, mode, h, w
    data[pos + 2] = 0  # mode 1 (H×W×1) → 0 (H×W): the same pixels in another layout
    with pytest.raises(CodecFormatError):
        decompress_images(recrc(bytes(data)), model)
