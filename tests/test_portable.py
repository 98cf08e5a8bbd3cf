"""Portable `.vdmc` files: the coding network and the coding distributions give the same bits on any machine.

The properties that make this hold by construction are checked directly (integer sums within the exactness
bounds, elementary functions accurate and built from correctly rounded operations), and end to end: a file made
in this process decodes in another process whose torch kernels (ATEN_CPU_CAPABILITY), oneDNN instruction set,
numpy SIMD loops and thread count all differ.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vdm.cli import main as vdm_main
from vdm.codec import detmath, intnet, read_header
from vdm.codec.chain import gammas, make_chain
from vdm.codec.intnet import CodingNetwork, exact_arithmetic
from vdm.data import load_dataset
from vdm.pretrained import load_default_model

FIXTURES = Path(__file__).parent / "fixtures" / "codec"
OTHER_MACHINE = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "OMP_NUM_THREADS": "1",
                 "NPY_DISABLE_CPU_FEATURES": "AVX2 FMA3", "NUMBA_CPU_NAME": "generic"}


@pytest.fixture(scope="module")
def packaged():
    return load_default_model()


@pytest.fixture(scope="module")
def coding(packaged):
    return CodingNetwork(packaged)


def photo_crop() -> np.ndarray:
    """A 24×40 RGB crop of held-out photo tiles (uint8, H×W×3)."""
    tiles = load_dataset("photos", "test")
    return np.ascontiguousarray(np.concatenate([tiles[300], tiles[900]], axis=2).transpose(1, 2, 0)[4:28, 8:48])


# --- elementary functions -----------------------------------------------------------------------------------
def _ulps(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.spacing(np.maximum(np.abs(b), 1e-300))))


def test_detmath_agrees_with_the_true_functions_to_a_few_ulps():
    x = np.linspace(-700, 700, 200_001)
    assert _ulps(detmath.exp(x), np.exp(x)) <= 4
    y = np.concatenate([np.linspace(-3, 3, 100_001), [1e-12, -1e-9, 0.49999, 0.5]])
    assert _ulps(detmath.expm1(y), np.expm1(y)) <= 4
    p = np.exp(np.linspace(-700, 700, 100_001))
    assert np.max(np.abs(detmath.log2(p) - np.log2(p))) <= 4 * np.spacing(1024.0)
    t = np.linspace(-5000, 5000, 1_000_001)
    s, c = detmath.sin_cos(t)
    assert np.max(np.abs(s - np.sin(t))) < 1e-15 and np.max(np.abs(c - np.cos(t))) < 1e-15
    assert detmath.dot(np.array([[1e16, 1.0, -1e16]]), np.ones(3))[0] == 1.0  # correctly rounded sums


def test_detmath_refuses_arguments_outside_its_domain():
    with pytest.raises(ValueError, match="out of range"):
        detmath.sin_cos(np.array([2.0 ** 21]))
    with pytest.raises(ValueError, match="positive"):
        detmath.log2(np.array([0.0]))


# --- exact integer arithmetic ---------------------------------------------------------------------------------
def _layers(net: CodingNetwork):
    for blk in net.blocks:
        yield from (layer for layer in (blk.conv1, blk.conv2, blk.nin) if layer is not None)
    for att in [net.mid_attn] + [a for a in net.down_attn + net.up_attn if a is not None]:
        yield from (att.q, att.k, att.v, att.proj)
    yield from (net.conv_in_z, net.conv_in_f, net.conv_out)


def test_every_layer_keeps_its_integer_sums_within_the_exactness_bound(coding):
    """a_max·Σ|w| ≤ 2^24 (float32 sums) or 2^53 (float64) for every output channel of every layer, so any
    order of summation gives the exact integer."""
    for layer in _layers(coding):
        w = layer.weight.double().flatten(1)
        assert torch.equal(w, w.round())
        assert float((w.abs().sum(1) * layer.a_max).max()) <= layer.exact
        assert layer.exact == (intnet.EXACT32 if layer.weight.dtype == torch.float32 else intnet.EXACT64)


def test_the_worst_case_float32_convolution_is_exact(coding):
    """Inputs of ±a_max with the signs of the weights drive every partial sum to its bound: the float32
    convolution still equals the float64 one (exact at these magnitudes)."""
    layer = coding.up[0].conv1
    w = layer.weight
    a = torch.sign(w[:1]) * layer.a_max  # one output channel's worst case, as a 3×3 input patch
    a = F.pad(a, (1, 1, 1, 1))
    got = F.conv2d(a, w, padding=1)[0, 0, 2, 2]
    want = F.conv2d(a.double(), w.double(), padding=1)[0, 0, 2, 2]
    assert float(got) == float(want) == float((w[0].abs() * layer.a_max).sum())


@pytest.mark.parametrize("fused", [True, False])  # compiled CPU kernels / torch operations
@pytest.mark.parametrize("every", [20, 100, 5000])  # dense spikes (a second convolution) / sparse (scattered)
def test_a_convolution_with_inputs_beyond_its_clamp_is_still_exact(coding, every, fused):
    """Inputs beyond ±a_max (up to 3·a_max, so both the second convolution and the scatter take part) give
    the exact integer convolution: equal to the float64 one, exact at these magnitudes (< 2^53)."""
    layer = intnet.QuantLinear.__new__(intnet.QuantLinear)  # the network's layer, on the path under test
    layer.__dict__.update(coding.up[0].conv1.__dict__, fused=fused)
    g = torch.Generator().manual_seed(every)
    a = torch.randint(-layer.a_max, layer.a_max + 1, (2, layer.weight.shape[1], 16, 16), generator=g).float()
    spikes = torch.randint(0, every, a.shape, generator=g) == 0
    a[spikes] = torch.randint(-3 * layer.a_max, 3 * layer.a_max + 1, (int(spikes.sum()),), generator=g).float()
    for b, c, y, x in ((0, 0, 0, 0), (0, 1, 0, 7), (1, 2, 15, 15), (1, 3, 9, 0), (0, 4, 4, 15)):
        a[b, c, y, x] = 3.0 * layer.a_max  # spikes on the border and in the corners: taps that fall outside
    want = F.conv2d(a.double(), layer.weight.double(), padding=1)
    assert torch.equal(layer.acc(a), want)


def test_the_coding_network_follows_the_float_model(packaged, coding):
    """On held-out photo tiles at early, middle and late chain steps, ε̂ of the coding network stays within
    0.02 RMS of the float64 model's (measured 0.004–0.010); a wrong layer or scale gives ≥ 0.1."""
    m64 = load_default_model().double()
    tiles = load_dataset("photos", "test")
    f = 2 * (torch.as_tensor(tiles[::160][:8]).double() + 0.5) / 256 - 1
    chain = make_chain(gammas(packaged, 200), 2)
    rng = np.random.default_rng(0)
    with exact_arithmetic(1):
        for i in (1, 60, 150, 200):
            z = chain.alpha[i] * f.numpy() + chain.sigma[i] * rng.standard_normal(f.shape)
            z = np.rint(z / chain.delta[i]) * chain.delta[i]
            with torch.no_grad():
                want = m64.eps_hat(torch.as_tensor(z), torch.tensor(chain.gamma[i], dtype=torch.float64)).numpy()
            err = coding.eps(z, float(chain.gamma[i])) - want
            assert math.sqrt(float(np.mean(err ** 2))) < 0.02, i


def test_the_compiled_kernels_give_the_bits_of_the_torch_operations(packaged, coding):
    """ε̂ with the CPU kernels (`vdm.codec.kernels`) equals ε̂ with torch operations only (the path of other
    devices), bit for bit: on noised held-out tiles from the chain's start, where convolutions see few inputs
    beyond their clamp, to its end, where some see over 1 % (so the scatter and the dense path both run), and
    on units of another shape."""
    plain = CodingNetwork(packaged, fused=False)
    tiles = load_dataset("photos", "test")
    f = 2 * (tiles[::230][:8].astype(np.float64) + 0.5) / 256 - 1
    chain = make_chain(gammas(packaged, 200), 2)
    rng = np.random.default_rng(2)
    with exact_arithmetic(1):
        for i, shape in ((1, None), (100, None), (200, None), (150, (3, 16, 24))):
            z = chain.alpha[i] * f + chain.sigma[i] * rng.standard_normal(f.shape)
            if shape is not None:
                z = z[:shape[0], :, :shape[1], :shape[2]]
            a, b = coding.eps(z, float(chain.gamma[i])), plain.eps(z, float(chain.gamma[i]))
            assert np.array_equal(a.view(np.uint64), b.view(np.uint64)), i


def test_the_compiled_kernels_agree_at_the_limits_of_the_residual_stream(packaged, coding):
    """Residual-stream inputs spread over the whole range ±(2^17 − 1), some at the bounds: every clamp and
    rounding of a residual block and of the attention block is exercised; both paths agree bit for bit."""
    plain = CodingNetwork(packaged, fused=False)
    rng = np.random.default_rng(3)
    x = rng.integers(-intnet.RES_MAX, intnet.RES_MAX + 1, (2, packaged.config.n_embd, 16, 16)).astype(np.float64)
    x[0, :, :4] = intnet.RES_MAX
    x[1, :, -4:] = -intnet.RES_MAX
    x = torch.from_numpy(x)
    cond = coding.block_biases(-2.0)[len(coding.down)]  # the first middle block's conditioning
    with exact_arithmetic(1):
        for got, want in ((coding.mid_attn(x.clone()), plain.mid_attn(x.clone())),
                          (coding.mid1(x.clone(), cond), plain.mid1(x.clone(), cond))):
            assert torch.equal(got, want) and float(got.abs().max()) == intnet.RES_MAX


def test_attention_sums_over_blocks_of_keys_are_exact(packaged, coding):
    """Format 6's weighted sums Σ e·v: float32 over blocks of 1,024 keys, the blocks added in float64. Over 2,500
    keys (three blocks, the last partial), with every weight and value at the top of its grid (each full
    block's sum is exactly 2^24) and with random ones, they equal the integer sums; and a 48×40 unit (1,920
    pixels: two blocks) through the attention block gives the bits of float64 sums, on both paths."""
    att = coding.mid_attn
    assert att.key_block == 1024 and att.sum_dtype == torch.float32
    top_e, top_v = int(att.exp_table.max()), 2 ** att.v_bits
    assert top_e * top_v * att.key_block == 2 ** 24
    g = torch.Generator().manual_seed(5)
    e = torch.randint(0, top_e + 1, (2, 5, 2500), generator=g).float()
    vt = torch.randint(-top_v, top_v + 1, (2, 3, 2500), generator=g).float()
    e[0], vt[0] = top_e, top_v
    want = np.einsum("bcn,brn->bcr", vt.numpy().astype(np.int64), e.numpy().astype(np.int64))
    assert float(want.max()) == 2500 * 2 ** 14
    assert np.array_equal(att._weighted_sums(vt, e).numpy(), want.astype(np.float64))
    wide = intnet.QuantAttnBlock.__new__(intnet.QuantAttnBlock)  # the same grids, summed in float64 at once
    wide.__dict__.update(att.__dict__, key_block=None, sum_dtype=torch.float64, exp_table=att.exp_table.double())
    plain = CodingNetwork(packaged, fused=False).mid_attn
    x = torch.from_numpy(np.random.default_rng(4).integers(-2 ** 12, 2 ** 12, (1, packaged.config.n_embd, 48, 40))
                         .astype(np.float64))
    with exact_arithmetic(1):
        got = att(x.clone())
        assert torch.equal(got, plain(x.clone())) and torch.equal(got, wide(x.clone()))


def test_older_formats_attention_keeps_its_arithmetic_on_both_paths(packaged):
    """Formats 4 and 5 sum 2^15-level weights and 2^16-level values in float64 (`ATTENTION_GRIDS`): the compiled
    kernels and the torch operations give the same bits for them too, and not those of format 6."""
    v5, v5_plain = CodingNetwork(packaged, version=5), CodingNetwork(packaged, fused=False, version=5)
    assert v5.mid_attn.key_block is None and v5.mid_attn.sum_dtype == torch.float64
    z = np.random.default_rng(6).standard_normal((2, 3, 32, 32))
    with exact_arithmetic(1):
        a, b = v5.eps(z, -1.0), v5_plain.eps(z, -1.0)
        c = CodingNetwork(packaged).eps(z, -1.0)
    assert np.array_equal(a.view(np.uint64), b.view(np.uint64))
    assert not np.array_equal(a, c)


def test_without_numba_the_cpu_runs_the_torch_operations(packaged, monkeypatch):
    from vdm.codec import kernels
    monkeypatch.setattr(kernels, "AVAILABLE", False)
    net = CodingNetwork(packaged)
    assert not any(layer.fused for layer in (net.mid_attn, net.norm_out, net.conv_out, net.up[0].norm1))
    with pytest.raises(ValueError, match="numba"):
        CodingNetwork(packaged, fused=True)


def test_the_coding_network_gives_the_same_bits_for_any_batch_and_thread_count(coding):
    z = np.random.default_rng(1).standard_normal((6, 3, 32, 32))
    with exact_arithmetic(2):
        whole = coding.eps(z, -3.0)
    with exact_arithmetic(1):
        parts = np.concatenate([coding.eps(z[:1], -3.0), coding.eps(z[1:], -3.0)])
    assert np.array_equal(whole.view(np.uint64), parts.view(np.uint64))


# --- end to end -----------------------------------------------------------------------------------------------
def test_a_file_decodes_exactly_in_another_process_with_other_kernels(tmp_path, device):
    """Encode here (on the device under test; on the CPU with 2 threads and this machine's best kernels);
    decode on the CPU in a process with torch's generic kernels, oneDNN limited to SSE4.1, numpy without
    AVX2/FMA and one thread. SNR-weighted steps (format 5's spacing), so the decoder rebuilds the spaced chain
    too."""
    img = photo_crop()
    np.save(tmp_path / "crop.npy", img)
    out_file = tmp_path / "crop.vdmc"
    assert vdm_main(["compress", str(tmp_path / "crop.npy"), "-o", str(out_file), "--steps", "6",
                     "--spacing", "snr", "--threads", "2", "--device", str(device), "-q"]) == 0
    assert read_header(out_file.read_bytes()).params.spacing == 1
    env = dict(os.environ, **OTHER_MACHINE)
    r = subprocess.run([sys.executable, "-m", "vdm", "decompress", str(out_file), "-o", str(tmp_path / "out"),
                        "--threads", "1", "-q"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "crop.npy"), img)


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_files_of_every_readable_format_version_keep_decoding(version, device):
    """Files written with format versions 4 to 7 (tests/fixtures/codec, made on a CPU by `vdm compress
    photo.npy --steps 6` with the packaged model of the time; version 6 with `--tile 0`, so its 48×40 mirror
    mosaic sums attention over two blocks of keys; version 7 with `--spacing snr` and fitted variances) decode to their photo on the device under test: any change
    to the coding arithmetic that would strand existing files fails here."""
    from vdm.codec import decompress_images, read_header
    from vdm.pretrained import load_packaged_model
    data = (FIXTURES / f"photo_T6_v{version}.vdmc").read_bytes()
    header = read_header(data)
    assert header.version == version and header.params.spacing == (version >= 5)
    out = decompress_images(data, load_packaged_model(header.fingerprint).to(device))
    np.testing.assert_array_equal(out[0].pixels, np.load(FIXTURES / "photo.npy"))
