"""Our model reproduces the official implementation's own outputs (tests/fixtures/official_vdm): to a relative
1e-9 in float64 (the official outputs were computed in float64), to 1e-5 in float32, on the device under test
(`pytest --device cuda`; the CPU by default)."""

import math

import numpy as np
import pytest
import torch

import official_reference as ref
from conftest import load_case
from vdm import process
from vdm.convert import ConversionError, from_official

RTOL = 1e-9
CASES = ["A", "B"]


def on(device, a, dtype=torch.float64) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a)).to(device, dtype)


def nchw(a, device="cpu") -> torch.Tensor:
    return on(device, a).permute(0, 3, 1, 2)


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).cpu().numpy()


def assert_close(ours, theirs, what, rtol=RTOL):
    if isinstance(ours, torch.Tensor):
        ours = ours.detach().cpu()
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, what
    # relative error: elementwise for scalars and per-example values, against the largest magnitude for images
    scale = np.abs(theirs) if theirs.ndim <= 1 else np.abs(theirs).max()
    err = np.max(np.abs(ours - theirs) / scale)
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol}"


@pytest.fixture(params=CASES)
def case(request, device):
    params, inputs, outputs, meta = load_case(request.param)
    model = from_official(params, meta["config"], image_size=meta["height"], dtype=torch.float64).eval()
    return model.to(device), params, inputs, outputs, meta


@torch.no_grad()
def test_schedule_matches(case):
    model, _, inputs, out, meta = case
    dev = model.device
    assert_close(model.gamma(0.0), np.reshape(out["g_0"], ()), "g_0")
    assert_close(model.gamma(1.0), np.reshape(out["g_1"], ()), "g_1")
    loss = model.loss(on(dev, inputs["x"], torch.uint8).permute(0, 3, 1, 2), t=on(dev, inputs["t"]),
                      eps=nchw(inputs["eps"], dev), eps_0=nchw(inputs["eps_0"], dev))
    assert_close(loss["t"], out["t_used"], "t_used")
    assert_close(model.gamma(loss["t"]), out["g_t"], "g_t")
    T = meta["config"]["sm_n_timesteps"]
    if T:
        assert_close(model.gamma(loss["t"] - 1 / T), out["g_s"], "g_s")
    else:
        _, dg = model.gamma.gamma_and_derivative(loss["t"])
        assert_close(dg, out["dg_t"], "dg_t")


@torch.no_grad()
def test_loss_terms_and_network_match(case):
    model, _, inputs, out, _ = case
    dev = model.device
    x = on(dev, inputs["x"], torch.uint8).permute(0, 3, 1, 2)
    loss = model.loss(x, t=on(dev, inputs["t"]), eps=nchw(inputs["eps"], dev), eps_0=nchw(inputs["eps_0"], dev),
                      conditioning=on(dev, inputs["conditioning"]))
    assert_close(loss["recon"], out["loss_recon"], "loss_recon")
    assert_close(loss["prior"], out["loss_klz"], "loss_klz")
    assert_close(loss["diff"], out["loss_diff"], "loss_diff")
    assert_close(loss["bpd"], out["bpd"], "bpd")
    g_t = on(dev, out["g_t"])
    z_t = process.sample_z_t(model.encode(x), g_t[:, None, None, None], nchw(inputs["eps"], dev))
    assert_close(nhwc(z_t), out["z_t"], "z_t")
    assert_close(nhwc(model.eps_hat(z_t, g_t)), out["eps_hat"], "eps_hat")


@torch.no_grad()
def test_sampling_step_and_decoder_match(case):
    model, _, inputs, out, _ = case
    dev = model.device
    z_s = model.sample_step(nchw(inputs["sample_z_t"], dev), int(inputs["sample_i"]), int(inputs["sample_T"]),
                            nchw(inputs["sample_eps"], dev))
    assert_close(nhwc(z_s), out["sample_z_s"], "sample_z_s")
    x = nhwc(model.decode(nchw(inputs["generate_z_0"], dev)))
    np.testing.assert_array_equal(x, out["generate_x"])


@torch.no_grad()
def test_float32_model_close_to_official(case, device):
    _, params, inputs, out, meta = case
    dev = device
    model = from_official(params, meta["config"]).eval().to(dev)
    loss = model.loss(on(dev, inputs["x"], torch.uint8).permute(0, 3, 1, 2), t=on(dev, inputs["t"], torch.float32),
                      eps=nchw(inputs["eps"], dev).float(), eps_0=nchw(inputs["eps_0"], dev).float())
    np.testing.assert_allclose(loss["bpd"].cpu().numpy(), out["bpd"], rtol=1e-5)


def test_numpy_reference_matches_fixtures(case):
    """The independent reference used below agrees with the official outputs too."""
    _, params, inputs, out, meta = case
    cfg = meta["config"]
    assert_close(ref.gamma(params, cfg, out["t_used"]), out["g_t"], "reference g_t")
    assert_close(ref.score_net(params, cfg, out["z_t"], out["g_t"]), out["eps_hat"], "reference eps_hat")


OTHER_CONFIGS = [
    dict(gamma_type="learnable_nnet", sm_n_layer=1, sm_n_embd=32, with_attention=False, with_fourier_features=True),
    dict(gamma_type="learnable_scalar", sm_n_layer=3, sm_n_embd=64, with_attention=True, with_fourier_features=False),
    dict(gamma_type="fixed", sm_n_layer=0, sm_n_embd=32, with_attention=True, with_fourier_features=True),
]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("overrides", OTHER_CONFIGS, ids=lambda o: f"{o['gamma_type']}-L{o['sm_n_layer']}")
@torch.no_grad()
def test_any_official_config_converts(overrides, channels):
    cfg = dict(vocab_size=256, gamma_min=-13.3, gamma_max=5.0, sm_n_timesteps=0, sm_pdrop=0.1, **overrides)
    rng = np.random.default_rng(0)
    params = ref.random_official_params(cfg, channels, rng)
    model = from_official(params, cfg, image_size=6, dtype=torch.float64).eval()
    t = np.array([0.0, 0.13, 0.5, 0.97, 1.0])
    assert_close(model.gamma(torch.from_numpy(t)), ref.gamma(params, cfg, t), "gamma")
    z = rng.normal(size=(2, 6, 6, channels))
    g = ref.gamma(params, cfg, np.array([0.2, 0.8]))
    assert_close(nhwc(model.eps_hat(nchw(z), torch.from_numpy(g))), ref.score_net(params, cfg, z, g), "eps_hat")


def test_conversion_errors_name_the_problem():
    cfg = dict(gamma_type="fixed", gamma_min=-13.3, gamma_max=5.0, sm_n_embd=32, sm_n_layer=1, with_attention=False)
    params = ref.random_official_params(cfg, 3, np.random.default_rng(0))
    bad = dict(params)
    del bad["params/score_model/up.block_1/conv1/bias"]
    with pytest.raises(ConversionError, match="up.block_1/conv1/bias"):
        from_official(bad, cfg)
    bad = dict(params, **{"params/score_model/extra/kernel": np.zeros(3)})
    with pytest.raises(ConversionError, match="extra/kernel"):
        from_official(bad, cfg)
    bad = dict(params, **{"params/score_model/conv_in/kernel": np.zeros((3, 3, 14, 32), np.float32)})
    with pytest.raises(ConversionError, match="conv_in/kernel"):
        from_official(bad, cfg)
    with pytest.raises(ConversionError, match="gamma_type"):
        from_official(params, dict(cfg, gamma_type="cosine"))


# --- the official initialisation ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cifar10", "nnet_attention"])
def test_initialisation_matches_the_official_statistics(name):
    """A fresh model starts where the official `model.init` starts (official_vdm/init_stats.json): same
    shapes, the same exact zeros and constants, kernels with the official spread (lecun_normal, truncated)."""
    import json
    from conftest import FIXTURES
    from vdm.convert import config_from_official, parameter_map
    from vdm.model import VDM

    official = json.loads((FIXTURES / "init_stats.json").read_text())[name]
    cfg = config_from_official(official["config"], channels=3)
    torch.manual_seed(0)
    state = VDM(cfg).state_dict()
    mapping = parameter_map(cfg)
    assert set(mapping) == set(official["params"]), "parameter sets differ"
    for path_, stats in official["params"].items():
        ours_name, transform = mapping[path_]
        ours = state[ours_name].double().numpy()
        # back to the official layout, so that shapes compare directly
        flax_shape = tuple(stats["shape"])
        assert np.asarray(transform(np.zeros(flax_shape))).shape == ours.shape, path_
        n = ours.size
        frac_zero = float((ours == 0).mean())
        if stats["std"] == 0:  # a constant array: zeros, ones, or the schedule's γ_min / γ_max − γ_min
            np.testing.assert_allclose(ours, stats["mean"], rtol=1e-6, err_msg=path_)
            continue
        assert frac_zero < 1e-4 and stats["frac_zero"] < 1e-4, path_  # random: a float32 zero is rare
        # random kernels: mean and std within sampling error, range within the truncation at ±2σ
        se = stats["std"] / math.sqrt(n)
        assert abs(ours.mean() - stats["mean"]) < 6 * se + 1e-12, (path_, ours.mean(), stats["mean"])
        assert abs(ours.std() / stats["std"] - 1) < 6 / math.sqrt(2 * n) + 0.01, (path_, ours.std(), stats["std"])
        bound = max(abs(stats["min"]), abs(stats["max"]))
        if bound / stats["std"] < 2.4:  # truncated at 2σ_N = 2.27 std (lecun_normal); the schedule's are not
            assert np.abs(ours).max() <= bound * 1.02, (path_, np.abs(ours).max(), bound)
            if n >= 1000:  # enough draws to come near the truncation point
                assert np.abs(ours).max() >= bound * 0.8, (path_, np.abs(ours).max(), bound)
        else:
            assert np.abs(ours).max() / ours.std() > 2.4, path_
