"""Precision from the hardware: the resolver maps (requested, device, CPU flags, CUDA capability) correctly,
warns where bf16 would be emulated, and the training loop's EMA update is the closed form."""

import warnings

import pytest
import torch

from vdm import precision as P
from vdm.nets import winograd
from vdm.nets.unet import Conv3x3, Dropout
from vdm.config import TrainConfig
from vdm.train.ema import EMA
from vdm.train.loop import TrainingError, _check_same_run

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl"}
AVX512_BF16 = AVX512 | {"avx512_bf16"}
SAPPHIRE_RAPIDS = AVX512_BF16 | {"amx_tile", "amx_bf16", "amx_int8"}
GRAVITON3 = frozenset({"fp", "asimd", "sve", "bf16", "i8mm"})


@pytest.mark.parametrize("flags, native", [(AVX2, False), (AVX512, False), (AVX512_BF16, True),
                                           (SAPPHIRE_RAPIDS, True), (GRAVITON3, True), (frozenset(), False)])
def test_auto_on_cpu_uses_bf16_only_where_it_is_native(flags, native):
    c = P.choose_precision("auto", "cpu", cpu_flags=flags)
    assert c.precision == ("bf16" if native else "fp32") and not c.emulated
    assert c.reason.startswith("auto: CPU with" + ("" if native else "out") + " native bf16")


@pytest.mark.parametrize("capability, native", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((8, 6), True),
                                                ((9, 0), True), (None, False)])
def test_auto_on_cuda_uses_bf16_from_compute_capability_8(capability, native):
    c = P.choose_precision("auto", "cuda", cuda_capability=capability)
    assert c.precision == ("bf16" if native else "fp32") and not c.emulated


def test_explicit_choices_are_kept_and_emulated_bf16_is_flagged():
    assert P.choose_precision("fp32", "cpu", cpu_flags=SAPPHIRE_RAPIDS).precision == "fp32"
    assert P.choose_precision("bf16", "cpu", cpu_flags=AVX2) == P.Choice("bf16", "bf16 as asked; CPU without "
                                                                         "native bf16", emulated=True)
    assert not P.choose_precision("bf16", "cpu", cpu_flags=AVX512_BF16).emulated
    assert P.choose_precision("bf16", "cuda", cuda_capability=(7, 0)).emulated
    assert not P.choose_precision("bf16", "cuda", cuda_capability=(8, 0)).emulated
    assert P.choose_precision("auto", "mps").precision == "fp32"
    with pytest.raises(ValueError, match="fp16"):
        P.choose_precision("fp16", "cpu")


def test_explicit_bf16_warns_only_where_it_would_be_emulated(monkeypatch):
    monkeypatch.setattr(P, "cpu_flags", lambda: AVX2)
    with pytest.warns(P.EmulatedBF16Warning, match="emulated"):
        assert P.resolve_precision("bf16", "cpu").precision == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert P.resolve_precision("auto", "cpu").precision == "fp32"
        monkeypatch.setattr(P, "cpu_flags", lambda: AVX512_BF16)
        assert P.resolve_precision("bf16", "cpu").precision == "bf16"
        assert P.resolve_precision("auto", "cpu").precision == "bf16"


def test_autocast_context_matches_the_precision():
    with P.autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")
    with P.autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError):
        P.autocast("auto", "cpu")


def test_cpu_flags_are_read_from_this_machine():
    flags = P.cpu_flags()
    assert isinstance(flags, frozenset) and isinstance(P.cpu_summary(), str)


def test_resuming_a_checkpoint_written_with_the_old_bf16_key():
    current = TrainConfig.from_dict({"run": {"precision": "fp32"}}).to_dict()
    old = {section: dict(values) for section, values in current.items()}
    old["run"].pop("precision")
    old["run"]["bf16"] = False
    _check_same_run(old, current, "ckpt")  # same computation: no error
    old["run"]["bf16"] = True
    with pytest.raises(TrainingError, match="run.precision"):
        _check_same_run(old, current, "ckpt")


def test_ema_update_is_the_closed_form_in_one_foreach_call():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = EMA(net, decay=0.9, warmup=True)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
        net[1].running_mean.add_(1.0)
        net[1].num_batches_tracked.add_(3)
    step = 5
    d = ema.decay_at(step)
    assert d == pytest.approx(6 / 15)
    ema.update(net, step)
    params = dict(net.named_parameters())
    for k, v in net.state_dict().items():
        if k in params:
            torch.testing.assert_close(ema.state_dict()[k], d * before[k] + (1 - d) * v, rtol=1e-6, atol=1e-7)
        else:  # buffers are copied
            assert torch.equal(ema.state_dict()[k], v)


@pytest.mark.parametrize("flags, precision, expected", [(AVX2, "fp32", "winograd"), (AVX512, "fp32", "direct"),
                                                        (AVX512_BF16, "fp32", "direct"), (AVX2, "bf16", "direct"),
                                                        (GRAVITON3, "fp32", "direct")])
def test_auto_conv_algorithm_takes_winograd_only_for_fp32_on_one_avx2_thread(flags, precision, expected):
    assert P.choose_conv_algorithm("auto", "cpu", precision, cpu_flags=flags) == expected
    assert P.choose_conv_algorithm("auto", "cpu", precision, cpu_flags=flags, threads=2) == "direct"
    assert P.choose_conv_algorithm("auto", "cuda", precision, cpu_flags=flags) == "direct"
    assert P.choose_conv_algorithm("auto", "cpu", precision, cpu_flags=flags, nnpack=False) == "direct"
    assert P.choose_conv_algorithm("direct", "cpu", precision, cpu_flags=flags) == "direct"
    assert P.choose_conv_algorithm("winograd", "cpu", "fp32", cpu_flags=flags) == "winograd"
    with pytest.raises(ValueError):
        P.choose_conv_algorithm("fft", "cpu", precision)


@pytest.mark.skipif(not winograd.available(), reason="this PyTorch build has no NNPACK")
def test_winograd_convolution_and_its_gradients_match_the_direct_one():
    torch.manual_seed(0)
    conv = Conv3x3(32, 48)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    g = torch.randn(2, 48, 8, 8)
    results = []
    for on in (False, True):
        x.grad = None
        conv.zero_grad()
        with winograd.use_winograd(on):
            assert winograd.enabled() == on
            y = conv(x)
        y.backward(g)
        results.append((y.detach(), x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()))
    assert not winograd.enabled()
    for direct, wino in zip(*results):
        torch.testing.assert_close(wino, direct, rtol=1e-4, atol=1e-4 * float(direct.abs().max()))
    assert not torch.equal(results[0][0], results[1][0])  # the Winograd path was taken (it rounds differently)
    with winograd.use_winograd(True):  # deterministic, as exact resume needs
        assert torch.equal(conv(x), results[1][0])
    with winograd.use_winograd(True):  # float64 always takes the direct path, exactly
        x64, conv64 = x.detach().double(), Conv3x3(32, 48).double()
        assert torch.equal(conv64(x64), torch.nn.functional.conv2d(x64, conv64.weight, conv64.bias, padding=1))


def test_cpu_dropout_drops_at_the_rate_and_rescales():
    drop = Dropout(0.25)
    x = torch.ones(200_000)
    torch.manual_seed(0)
    y = drop(x)
    assert torch.unique(y).tolist() == pytest.approx([0.0, 1 / 0.75])
    assert abs(float((y == 0).float().mean()) - 0.25) < 0.005
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # seeded by the global generator, like F.dropout
    assert torch.equal(drop.eval()(x), x)
    xg = torch.randn(1000, requires_grad=True)
    drop.train()(xg).sum().backward()
    assert torch.unique(xg.grad).tolist() == pytest.approx([0.0, 1 / 0.75])
