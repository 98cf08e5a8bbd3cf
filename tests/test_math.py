"""The mathematics against closed forms: schedules, the forward process, the decoder, the VLB terms."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from vdm import VDM, losses, process
from vdm.schedule import FixedLinearSchedule, LearnedLinearSchedule, MonotoneNetSchedule, make_schedule

KINDS = ["fixed_linear", "learned_linear", "learned_nnet"]


@pytest.fixture(autouse=True)
def _float64():
    """These closed-form checks run in float64; the default dtype is restored for the other test files."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def randomised(kind: str) -> nn.Module:
    sched = make_schedule(kind, -10.0, 6.0).double()
    with torch.no_grad():
        for p in sched.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return sched


# --- schedules ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_schedule_strictly_increasing_with_exact_derivative(kind):
    sched = randomised(kind)
    t = torch.linspace(0, 1, 2001, requires_grad=True)
    g, dg = sched.gamma_and_derivative(t)
    assert torch.all(g[1:] > g[:-1])
    assert torch.all(dg > 0)
    (autograd_dg,) = torch.autograd.grad(g.sum(), t)
    torch.testing.assert_close(dg, autograd_dg, rtol=1e-10, atol=1e-10)
    g0, g1 = sched.endpoints()
    torch.testing.assert_close(g[0], g0, rtol=0, atol=1e-12)
    torch.testing.assert_close(g[-1], g1, rtol=0, atol=1e-12)


def test_schedule_initialisations_follow_the_paper():
    t = torch.tensor([0.0, 0.25, 1.0])
    expected = -13.3 + 18.3 * t
    torch.testing.assert_close(FixedLinearSchedule()(t).double(), expected)
    torch.testing.assert_close(LearnedLinearSchedule().double()(t), expected)
    nnet = MonotoneNetSchedule().double()
    # official init: l1 = (γ_max − γ_min)·t + γ_min exactly, plus the l2/l3 term of N(0, 0.01²) kernels, which
    # moves the endpoints by at most Σ|w₃|·|φ(|w₂|)|/n ≤ max|w₃|·max|w₂| ≈ 1e-3
    assert (nnet.l1_weight.item(), nnet.l1_bias.item()) == (18.3, -13.3)
    bound = (nnet.l3_weight.abs().max() * nnet.l2_weight.abs().max()).item()
    g0, g1 = nnet.endpoints()
    assert abs(g0.item() + 13.3) <= bound and abs(g1.item() - 5.0) <= bound
    assert torch.all(torch.diff(nnet(torch.linspace(0, 1, 101))) > 0)


def test_monotone_network_is_the_official_network_and_increasing():
    """γ(t) = g(t) exactly (no stored endpoints); any weights, even negative ones, give γ(0) < γ(1)."""
    torch.manual_seed(1)
    nnet = MonotoneNetSchedule(n_features=16).double()
    with torch.no_grad():
        for p in nnet.parameters():
            p.copy_(torch.randn_like(p) * 3)
    t = torch.linspace(0, 1, 257, dtype=torch.float64)
    w2, w3 = nnet.l2_weight.abs(), nnet.l3_weight.abs()
    phi = 2 * (torch.sigmoid(w2 * (2 * t[:, None] - 1) + nnet.l2_bias) - 0.5)
    g = nnet.l1_weight.abs() * t + nnet.l1_bias + (phi * w3).sum(-1) / 16
    torch.testing.assert_close(nnet(t), g, rtol=1e-14, atol=1e-13)
    assert torch.all(torch.diff(nnet(t)) > 0)


def test_model_files_with_stored_endpoints_still_load():
    """Older model files stored γ₀, γ₁ apart from the network; they load as the same γ(t)."""
    torch.manual_seed(2)
    nnet = MonotoneNetSchedule(n_features=8).double()
    old = {k: v.clone() for k, v in nnet.state_dict().items()}
    old["gamma_0"], old["gamma_1"] = torch.tensor(-11.0, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64)
    t = torch.linspace(0, 1, 33, dtype=torch.float64)
    g, _ = nnet.net(t)
    g0, g1 = nnet.net(torch.tensor([0.0, 1.0], dtype=torch.float64))[0]
    expected = -11.0 + 15.0 * (g - g0) / (g1 - g0)  # the old parametrisation, γ₀ + (γ₁ − γ₀)·s(t)
    fresh = MonotoneNetSchedule(n_features=8).double()
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh(t), expected, rtol=1e-13, atol=1e-13)


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="cosine"):
        make_schedule("cosine")


# --- forward process -----------------------------------------------------------------------------------
def test_markov_composition_and_posterior_closed_form():
    g_s, g_t = torch.tensor(-3.0), torch.tensor(1.5)
    a_s, s_s = process.alpha_sigma(g_s)
    a_t, s_t = process.alpha_sigma(g_t)
    assert torch.allclose(a_s**2 + s_s**2, torch.tensor(1.0))
    # q(z_t|x) = ∫ q(z_t|z_s) q(z_s|x): mean α_{t|s} α_s f = α_t f, variance α_{t|s}² σ_s² + σ²_{t|s} = σ_t².
    f = torch.tensor(0.3)
    m_ts, sd_ts = process.q_t_given_s(a_s * f, g_s, g_t)
    torch.testing.assert_close(m_ts, a_t * f)
    alpha_ts = a_t / a_s
    torch.testing.assert_close(alpha_ts**2 * s_s**2 + sd_ts**2, s_t**2)
    # Posterior from the joint Gaussian of (z_s, z_t) given x: Cov(z_s, z_t) = α_{t|s} σ_s².
    z_t = torch.tensor(0.7)
    cov = alpha_ts * s_s**2
    mean_ref = a_s * f + cov / s_t**2 * (z_t - a_t * f)
    var_ref = s_s**2 - cov**2 / s_t**2
    mean, sd = process.posterior(z_t, f, g_s, g_t)
    torch.testing.assert_close(mean, mean_ref)
    torch.testing.assert_close(sd**2, var_ref)


def test_ancestral_step_with_the_true_noise_is_the_posterior():
    f = torch.randn(2, 3, 4, 4) * 0.5
    eps = torch.randn_like(f)
    g_s, g_t = torch.tensor(-2.0), torch.tensor(0.5)
    z_t = process.sample_z_t(f, g_t, eps)
    noise = torch.randn_like(f)
    mean, sd = process.posterior(z_t, f, g_s, g_t)
    torch.testing.assert_close(process.ancestral_step(z_t, eps, g_s, g_t, noise), mean + sd * noise)


# --- the decoder and the prior ---------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [2, 17, 256])
def test_decoder_is_a_distribution(vocab):
    z = torch.randn(3, 2, 5, 5)
    logp = losses.decoder_log_probs(z, torch.tensor(-5.0), vocab)
    assert logp.shape == (3, 2, 5, 5, vocab)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(3, 2, 5, 5))


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_reconstruction_loss_is_minus_log_decoder_probability(channels):
    vocab = 9
    x = torch.randint(0, vocab, (2, channels, 3, 3))
    eps_0, g0 = torch.randn(2, channels, 3, 3), torch.tensor(-1.0)
    z0_rescaled = process.encode(x, vocab) + torch.exp(0.5 * g0) * eps_0
    f_k = 2 * (torch.arange(vocab) + 0.5) / vocab - 1
    dens = torch.exp(-0.5 * (z0_rescaled[..., None] - f_k) ** 2 / torch.exp(g0))
    p = dens / dens.sum(-1, keepdim=True)
    expected = -torch.log(p.gather(-1, x[..., None])).flatten(1).sum(1)
    torch.testing.assert_close(losses.reconstruction_loss(x, g0, eps_0, vocab), expected)


def test_prior_kl_closed_form():
    f, g1 = torch.rand(2, 3, 2, 2) * 2 - 1, torch.tensor(2.0)
    a2, s2 = torch.sigmoid(-g1), torch.sigmoid(g1)
    kl = 0.5 * ((a2 * f**2 + s2) - torch.log(s2) - 1)  # KL(N(a f, s2) || N(0, 1)) per dimension
    torch.testing.assert_close(losses.prior_kl(f, g1), kl.flatten(1).sum(1))


# --- times ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 7, 128])
def test_antithetic_times_cover_the_unit_interval_evenly(batch):
    gen = torch.Generator().manual_seed(batch)
    for _ in range(20):
        t = losses.antithetic_times(batch, generator=gen)
        assert torch.all((t >= 0) & (t < 1))
        counts = torch.bincount(torch.floor(t * batch).long(), minlength=batch)
        assert torch.all(counts == 1)  # one time in each stratum [j/B, (j+1)/B)
        gaps = torch.diff(torch.sort(t).values)
        torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / batch))


def test_discretised_times_lie_on_the_grid():
    t = torch.tensor([0.0, 1e-9, 0.1, 0.1000001, 0.55, 0.999999])
    torch.testing.assert_close(losses.discretise_time(t, 10), torch.tensor([0.1, 0.1, 0.1, 0.2, 0.6, 1.0]))


# --- Gaussian data and its optimal linear denoiser --------------------------------------------------------
class LinearDenoiser(nn.Module):
    """ε̂ for data with zero mean and per-dimension variance s²: x̂ = α s² z/(α² s² + σ²), ε̂ = (z − α x̂)/σ.

    Stands in for the U-Net; it receives the normalised γ exactly as the U-Net does.
    """

    def __init__(self, s2: float, gamma_min: float, gamma_max: float):
        super().__init__()
        self.s2, self.lo, self.hi = s2, gamma_min, gamma_max
        self.conv_in = nn.Conv2d(1, 1, 1)  # carries dtype/device for VDM

    def forward(self, z, t_c, conditioning=None):
        g = (self.lo + (self.hi - self.lo) * t_c)[:, None, None, None]
        a, s = process.alpha_sigma(g)
        x_hat = a * self.s2 * z / (a**2 * self.s2 + s**2)
        return (z - a * x_hat) / s


def discretised_gaussian(std_pixels: float, vocab: int = 256):
    k = np.arange(vocab)
    p = np.exp(-0.5 * ((k - (vocab - 1) / 2) / std_pixels) ** 2)
    return p / p.sum()


def gaussian_model(s2: float, gamma_type="fixed_linear", T=0):
    model = VDM(image_size=4, channels=1, n_embd=32, n_layer=0, gamma_type=gamma_type, timesteps=T).double()
    model.score_model = LinearDenoiser(s2, model.config.gamma_min, model.config.gamma_max).double()
    return model


def analytic_diffusion_loss(s2: float, g0: float, g1: float) -> float:
    """½ ∫ mse_x(v) dv over SNR v from e^{−γ1} to e^{−γ0}, with mse_x(v) = s²/(1 + v s²): per dimension."""
    return 0.5 * math.log((1 + math.exp(-g0) * s2) / (1 + math.exp(-g1) * s2))


def sample_pixels(p, n, gen):
    return torch.multinomial(torch.from_numpy(p), n, replacement=True, generator=gen)


@pytest.fixture(scope="module")
def gaussian_data():
    p = discretised_gaussian(20.0)
    f_k = 2 * (np.arange(256) + 0.5) / 256 - 1
    s2 = float((p * f_k**2).sum())  # E f² (the mean is zero by symmetry)
    gen = torch.Generator().manual_seed(0)
    x = sample_pixels(p, 16384 * 16, gen).reshape(16384, 1, 4, 4)
    return p, s2, x


def test_linear_denoiser_diffusion_loss_equals_its_analytic_value(gaussian_data):
    p, s2, x = gaussian_data
    model = gaussian_model(s2)
    with torch.no_grad():
        out = model.loss(x, generator=torch.Generator().manual_seed(1))
    D = 16
    expected = D * analytic_diffusion_loss(s2, -13.3, 5.0)
    mean, se = out["diff"].mean().item(), out["diff"].std().item() / math.sqrt(len(x))
    assert abs(mean - expected) < 4 * se, (mean, expected, se)
    assert se < 0.01 * expected  # the check is sharp


def test_vlb_bounds_the_exact_negative_log_likelihood(gaussian_data):
    p, s2, x = gaussian_data
    entropy = float(-(p * np.log(p)).sum()) * 16  # exact NLL of the data under its own law, per image (nats)
    model = gaussian_model(s2)
    with torch.no_grad():
        out = model.loss(x, generator=torch.Generator().manual_seed(2))
    vlb = out["prior"] + out["recon"] + out["diff"]
    mean, se = vlb.mean().item(), vlb.std().item() / math.sqrt(len(x))
    assert mean - 4 * se > entropy
    assert mean < entropy * 1.15  # and it is a useful bound, not a vacuous one
    torch.testing.assert_close(out["bpd"], vlb / (16 * math.log(2)))


def test_continuous_loss_is_invariant_to_the_schedule_shape(gaussian_data):
    """Same endpoints, different interior: the same expected diffusion loss (paper, section 5)."""
    _, s2, x = gaussian_data
    means = []
    for kind in ("fixed_linear", "learned_nnet"):
        model = gaussian_model(s2, kind)
        if kind == "learned_nnet":
            g = model.gamma
            with torch.no_grad():  # a strongly curved shape, then l1 and l3 rescaled to the same endpoints
                g.l2_weight.mul_(400)
                g.l3_weight.mul_(3000)
                g0, g1 = g.endpoints()
                a = 18.3 / (g1 - g0)
                g.l1_bias.copy_(-13.3 + a * (g.l1_bias - g0))
                g.l1_weight.copy_(a * g.l1_weight.abs())
                g.l3_weight.copy_(a * g.l3_weight.abs())
                torch.testing.assert_close(torch.stack(g.endpoints()), torch.tensor([-13.3, 5.0], dtype=g0.dtype))
            t = torch.linspace(0, 1, 11)
            assert (model.gamma(t) - (-13.3 + 18.3 * t)).abs().max() > 1.0
        with torch.no_grad():
            d = model.loss(x, generator=torch.Generator().manual_seed(3))["diff"]
        means.append((d.mean().item(), d.var().item() / len(x)))
    (m1, v1), (m2, v2) = means
    assert abs(m1 - m2) < 4 * math.sqrt(v1 + v2), means


def test_discrete_loss_decreases_to_the_continuous_one(gaussian_data):
    """E[L_T] = Σ_i ½(SNR(s_i) − SNR(t_i))·mse_x(t_i), evaluated through `diffusion_loss_discrete` with
    the exact expected squared error E‖ε − ε̂‖² = SNR(t)·mse_x(t) of the linear denoiser."""
    _, s2, _ = gaussian_data
    sched = FixedLinearSchedule().double()
    continuous = analytic_diffusion_loss(s2, -13.3, 5.0)
    previous = math.inf
    for T in (1, 2, 4, 16, 64, 256, 4096, 65536):
        t = torch.arange(1, T + 1) / T
        g_t, g_s = sched(t), sched(t - 1 / T)
        v_t = torch.exp(-g_t)
        expected_sq = v_t * s2 / (1 + v_t * s2)
        eps = expected_sq.sqrt()[:, None, None, None]  # ‖eps − 0‖² = E‖ε − ε̂‖² for one dimension
        per_step = losses.diffusion_loss_discrete(g_s, g_t, T, eps, torch.zeros_like(eps))
        L_T = per_step.mean().item()  # E over t uniform on the grid
        assert continuous < L_T < previous
        previous = L_T
    assert previous / continuous - 1 < 1e-3


def test_discrete_time_loss_through_the_model(gaussian_data):
    """Model.loss with T steps estimates the same discrete sum (Monte Carlo over t and ε)."""
    _, s2, x = gaussian_data
    T = 4
    model = gaussian_model(s2, T=T)
    with torch.no_grad():
        d = model.loss(x, generator=torch.Generator().manual_seed(4))["diff"]
    sched = FixedLinearSchedule().double()
    t = torch.arange(1, T + 1) / T
    v_s, v_t = torch.exp(-sched(t - 1 / T)), torch.exp(-sched(t))
    expected = 16 * (0.5 * (v_s - v_t) * s2 / (1 + v_t * s2)).sum().item()
    se = d.std().item() / math.sqrt(len(x))
    assert abs(d.mean().item() - expected) < 4 * se


# --- variance minimisation ------------------------------------------------------------------------------
def test_variance_minimisation_gradient_is_that_of_the_second_moment():
    """With variance minimisation, the gradient that reaches the schedule's parameters through the shape
    s(t) is ∂ mean(L_diff²) (the second moment) and the one through the endpoints γ₀, γ₁ is the VLB's."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 8, 8))
    t, eps, eps_0 = torch.rand(6), torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    model = VDM(image_size=8, n_embd=32, n_layer=1, dropout=0.0, gamma_type="learned_nnet").double()
    with torch.no_grad():  # make the network's output depend on the conditioning; a curved schedule
        for p in model.score_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.gamma.l2_weight.mul_(300)
        model.gamma.l3_weight.mul_(300)
    sched = model.gamma

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in sched.named_parameters()}

    def detached(method):
        return lambda *a: tuple(v.detach() for v in method(*a))

    model.config.variance_minimisation = False
    sched.shape = detached(sched.shape)  # the gradient through the endpoints only
    out = model.loss(x, t, eps, eps_0)
    through_endpoints = grads((out["prior"] + out["recon"] + out["diff"]).mean())
    del sched.shape
    sched.endpoints = detached(sched.endpoints)  # the gradient through the shape only
    through_shape = grads(model.loss(x, t, eps, eps_0)["diff"].square().mean())
    del sched.endpoints
    model.config.variance_minimisation = True
    out = model.loss(x, t, eps, eps_0)
    varmin = grads((out["prior"] + out["recon"] + out["diff"]).mean())
    for name in ("l1_weight", "l1_bias", "l2_weight", "l2_bias", "l3_weight"):
        torch.testing.assert_close(varmin[name], through_endpoints[name] + through_shape[name])
    for name in ("l1_weight", "l2_weight", "l2_bias", "l3_weight"):
        assert through_shape[name].abs().max() > 0 and through_endpoints[name].abs().max() > 0
