"""The fast samplers and the probability-flow likelihood against closed forms.

For Gaussian data x ~ N(μ, s²I) (in the encoded scale f) the optimal noise prediction is linear,
ε̂(z_t) = σ_t(z_t − α_tμ)/v_t with v_t = α_t²s² + σ_t², the marginals are q(z_t) = N(α_tμ, v_t I), and the
probability-flow ODE is the affine map z_t = α_tμ + √(v_t/v_1)·(z_1 − α_1μ) (the unique increasing map between
the two Gaussians, per dimension). Everything below is checked against these formulas; the samplers, the ODE and
its log-density also on the device under test (`pytest --device cuda`).
"""

import math

import numpy as np
import pytest
import torch

import vdm
from vdm import losses, process
from vdm.evaluate import image_noise, ode_image_terms
from vdm.likelihood import divergence, ode_log_likelihood
from vdm.samplers import ancestral, ddim, dpmpp_2m, dpmpp_3m, dpmpp_update, lambda_times, ode

SCHEDULES = ("fixed_linear", "learned_linear", "learned_nnet")
F64 = dict(dtype=torch.float64)


class GaussianData(vdm.VDM):
    """A VDM whose ε̂ is the exact E[ε | z_t] for data f ~ N(μ, s²I)."""

    def set_data(self, mu: torch.Tensor, s: float) -> None:
        self.mu, self.s = mu, s

    def marginal_var(self, gamma):
        alpha, sigma = process.alpha_sigma(gamma)
        return alpha ** 2 * self.s ** 2 + sigma ** 2

    def eps_hat(self, z_t, gamma_t, conditioning=None):
        gamma = gamma_t.reshape(-1, 1, 1, 1)
        alpha, sigma = process.alpha_sigma(gamma)
        return sigma * (z_t - alpha * self.mu) / self.marginal_var(gamma)

    def flow(self, z_1, gamma):
        """The exact probability-flow solution at γ started from z_1 at γ(1)."""
        g1 = at_time(self, 1.0)
        alpha, alpha_1 = process.alpha_sigma(gamma)[0], process.alpha_sigma(g1)[0]
        return alpha * self.mu + (self.marginal_var(gamma) / self.marginal_var(g1)).sqrt() * (z_1 - alpha_1 * self.mu)


def gaussian_model(schedule: str = "fixed_linear", device="cpu") -> GaussianData:
    torch.manual_seed(0)
    model = GaussianData(n_embd=8, n_layer=0, image_size=4, channels=1, gamma_type=schedule).double()
    if schedule == "learned_nnet":  # a schedule whose shape is not linear
        with torch.no_grad():
            for p in model.gamma.parameters():
                p.add_(0.3 * torch.randn_like(p))
    model.set_data(torch.linspace(-0.5, 0.5, 16, **F64).reshape(1, 1, 4, 4).to(device), 0.3)
    return model.to(device)


def z_1_of(n=4, seed=1, device="cpu"):
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed), **F64).to(device)


def at_time(model, t: float) -> torch.Tensor:
    """γ(t) as a float64 tensor on the model's device."""
    return model.gamma(torch.tensor(t, dtype=torch.float64, device=model.device))


def max_err(a, b) -> float:
    return float((a - b).detach().abs().max())


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ode_sampler_is_the_exact_flow(schedule, device):
    model, z_1 = gaussian_model(schedule, device), z_1_of(device=device)
    with torch.no_grad():
        z_0 = ode(model, z_1, rtol=1e-9, atol=1e-9)
    assert z_0.device.type == device.type
    assert max_err(z_0, model.flow(z_1, at_time(model, 0.0))) < 1e-6


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_lambda_grid_is_uniform_in_log_snr(schedule):
    model = gaussian_model(schedule)
    times = lambda_times(model, 7)
    assert times[0] == 1.0 and times[-1] == 0.0
    with torch.no_grad():
        lam = process.log_snr(model.gamma(torch.tensor(times, **F64)))
    np.testing.assert_allclose(np.diff(lam.numpy()), float(lam[-1] - lam[0]) / 7, rtol=1e-6)


def global_errors(sampler, model, z_1, steps):
    ref = model.flow(z_1, at_time(model, 0.0))
    with torch.no_grad():
        return [max_err(sampler(model, z_1, lambda_times(model, k)), ref) for k in steps]


@pytest.mark.parametrize("schedule", ("fixed_linear", "learned_nnet"))
def test_ddim_and_dpmpp_2m_converge_at_orders_1_and_2(schedule, device):
    """Halving the λ-steps divides DDIM's error at t = 0 by 2 and DPM-Solver++(2M)'s by 4."""
    model, z_1 = gaussian_model(schedule, device), z_1_of(device=device)
    for sampler, order in ((ddim, 1), (dpmpp_2m, 2)):
        errs = global_errors(sampler, model, z_1, (20, 40, 80))
        observed = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
        assert np.all(np.abs(observed - order) < 0.15), (sampler.__name__, errs, observed)


@pytest.mark.parametrize("order", (1, 2, 3))
def test_dpmpp_update_has_local_error_h_to_the_order_plus_one(order):
    """One multistep update from exact history (data predictions at λ − kh, exact z at λ) to λ + h: the local
    error shrinks by 2^(order+1) when h halves (a wrong φ coefficient would leave a lower power)."""
    model = gaussian_model()
    z_1, g1 = z_1_of(), model.gamma(torch.tensor(1.0, **F64))

    def local_error(h):
        gammas = [torch.tensor(-2.0 * (0.5 - k * h), **F64) for k in range(-order + 1, 2)]  # λ = 0.5 + k·h
        x_hats = [process.data_prediction(model.flow(z_1, g), model.eps_hat(model.flow(z_1, g), g), g)
                  for g in gammas[:-1]]
        lams = [process.log_snr(g) for g in gammas[:-1]]
        z_t = model.flow(z_1, gammas[-2])
        return max_err(dpmpp_update(z_t, x_hats, lams, gammas[-2], gammas[-1]), model.flow(z_1, gammas[-1]))

    assert g1 > 0  # the λ used above (0.5 ± a few h) lie inside the schedule's range
    ratio = local_error(0.1) / local_error(0.05)
    assert abs(math.log2(ratio) - (order + 1)) < 0.2, ratio


def test_dpmpp_2m_update_is_algorithm_2_of_the_paper():
    """The second-order update is Lu et al.'s algorithm 2, written here in the paper's own variables: with
    h_i = λ_i − λ_{i−1}, r_i = h_{i−1}/h_i and D_i = (1 + 1/(2r_i))·x̂_{i−1} − 1/(2r_i)·x̂_{i−2},
    x̃_i = (σ_i/σ_{i−1})·x̃_{i−1} − α_i·(e^{−h_i} − 1)·D_i — not the Taylor-expansion variant, which differs at
    O(h³) and had 1.4× the 10-step error on a trained model."""
    g = [torch.tensor(v, **F64) for v in (1.2, 0.3, -0.9)]  # γ at t_{i−2}, t_{i−1}, t_i
    lam = [-v / 2 for v in g]
    x_prev2, x_prev1, z_prev = (torch.tensor(v, **F64) for v in (0.3, -0.2, 0.7))
    h, h_prev = lam[2] - lam[1], lam[1] - lam[0]
    r = h_prev / h
    D = (1 + 1 / (2 * r)) * x_prev1 - 1 / (2 * r) * x_prev2
    sigma = [torch.sqrt(torch.sigmoid(v)) for v in g]
    alpha = [torch.sqrt(torch.sigmoid(-v)) for v in g]
    expected = sigma[2] / sigma[1] * z_prev - alpha[2] * (torch.exp(-h) - 1) * D
    got = dpmpp_update(z_prev, [x_prev2, x_prev1], lam[:2], g[1], g[2])
    assert abs(float(got - expected)) < 1e-14


def test_dpmpp_3m_update_is_exact_for_quadratic_data_predictions():
    """With x̂(λ) = a + bλ + cλ² the third-order update is the exact z_s = (σ_s/σ_t)·z_t + σ_s∫e^λ x̂(λ)dλ
    (∫e^λ x̂ dλ = e^λ·(a − b + 2c + (b − 2c)λ + cλ²)). The update of the DPM-Solver reference code, diffusers
    and k-diffusion, written out below in their variables (r₀ = h₀/h, r₁ = h₁/h, D₂ weighted by φ₃), misses
    by α_s·φ₃·h²·x̂''/2, as `dpmpp_update`'s docstring says."""
    a, b, c = 0.3, -0.7, 1.9
    lam = [torch.tensor(v, **F64) for v in (0.2, 0.5, 1.0, 1.4)]  # λ_{t−2}, λ_{t−1}, λ_t, λ_s: unequal steps
    gamma = [-2 * v for v in lam]
    x_hats = [a + b * v + c * v ** 2 for v in lam[:3]]
    z_t = torch.tensor(0.4, **F64)
    (alpha_s, sigma_s), (_, sigma_t) = process.alpha_sigma(gamma[3]), process.alpha_sigma(gamma[2])

    def antiderivative(v):
        return torch.exp(v) * (a - b + 2 * c + (b - 2 * c) * v + c * v ** 2)

    exact = sigma_s / sigma_t * z_t + sigma_s * (antiderivative(lam[3]) - antiderivative(lam[2]))
    ours = dpmpp_update(z_t, x_hats, lam[:3], gamma[2], gamma[3])
    assert abs(float(ours - exact)) < 1e-13

    h, h_0, h_1 = lam[3] - lam[2], lam[2] - lam[1], lam[1] - lam[0]
    r0, r1 = h_0 / h, h_1 / h
    d1_0, d1_1 = (x_hats[2] - x_hats[1]) / r0, (x_hats[1] - x_hats[0]) / r1
    d1, d2 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1), (d1_0 - d1_1) / (r0 + r1)
    phi_1 = torch.expm1(-h)
    phi_2 = phi_1 / h + 1
    phi_3 = phi_2 / h - 0.5
    common = sigma_s / sigma_t * z_t - alpha_s * phi_1 * x_hats[2] + alpha_s * phi_2 * d1 - alpha_s * phi_3 * d2
    assert abs(float(common - exact - alpha_s * phi_3 * h ** 2 * (2 * c) / 2)) < 1e-13
    assert abs(float(common - exact)) > 1e-3


def test_dpmpp_3m_beats_2m():
    """Globally the third-order multistep is far closer to the flow than the second-order one (its first two
    steps, of orders 1 and 2 as in Lu et al., leave an h² term with a small coefficient)."""
    model, z_1 = gaussian_model("learned_nnet"), z_1_of()
    e2, e3 = global_errors(dpmpp_2m, model, z_1, (20, 40)), global_errors(dpmpp_3m, model, z_1, (20, 40))
    assert e3[0] < e2[0] / 5 and e3[1] < e2[1] / 20
    assert math.log2(e3[0] / e3[1]) > 3


def test_ddim_eta_1_is_the_ancestral_step():
    """DDIM with η = 1 has the mean and variance of p(z_s | z_t): the same draws give the same path."""
    model, z_1 = gaussian_model("learned_nnet"), z_1_of()
    times = [1.0, 0.7, 0.3, 0.05, 0.0]
    with torch.no_grad():
        a = ancestral(model, z_1, times, generator=torch.Generator().manual_seed(3))
        b = ddim(model, z_1, times, eta=1.0, generator=torch.Generator().manual_seed(3))
    assert max_err(a, b) < 1e-10


def log_p_ode_closed_form(model, z_0):
    """log p_ODE(z_0) = log N(z_1; 0, I) + (D/2)·log(v_1/v_0) with z_1 the exact flow of z_0 to γ(1)."""
    g0, g1 = at_time(model, 0.0), at_time(model, 1.0)
    v0, v1 = model.marginal_var(g0), model.marginal_var(g1)
    a0, a1 = process.alpha_sigma(g0)[0], process.alpha_sigma(g1)[0]
    z_1 = a1 * model.mu + (v1 / v0).sqrt() * (z_0 - a0 * model.mu)
    D = z_0[0].numel()
    return -0.5 * (z_1.square() + math.log(2 * math.pi)).flatten(1).sum(1) + 0.5 * D * torch.log(v1 / v0)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ode_log_likelihood_is_the_analytic_density(schedule, device):
    """Exact trace, and Rademacher probes (exact for the diagonal Jacobian of this ε̂)."""
    model = gaussian_model(schedule, device)
    z_0 = 0.4 * z_1_of(3, seed=2, device=device) + model.mu
    expected = log_p_ode_closed_form(model, z_0)
    exact, calls = ode_log_likelihood(model, z_0, rtol=1e-9, atol=1e-9)
    probes = 2.0 * torch.randint(0, 2, (2, 3, 1, 4, 4), generator=torch.Generator().manual_seed(0)) - 1
    hutch, _ = ode_log_likelihood(model, z_0, probes=probes.double().to(device), rtol=1e-9, atol=1e-9)
    assert calls > 10
    assert max_err(exact, expected) < 1e-6 and max_err(hutch, expected) < 1e-6


def test_divergence_exact_and_hutchinson_on_a_dense_linear_map():
    """For fn(z) = A z: the exact trace is tr A; Rademacher probes vᵀAv have mean tr A and variance
    ½·Σ_{i≠j}(A_ij + A_ji)², so their mean over K probes lies within 4 standard errors."""
    A = torch.randn(6, 6, generator=torch.Generator().manual_seed(0), **F64)
    z = torch.randn(1, 6, **F64)
    out, div = divergence(lambda y: y @ A.T, z, None)
    assert max_err(out, z @ A.T) < 1e-12 and abs(float(div[0] - A.trace())) < 1e-12
    K = 4000
    probes = (2.0 * torch.randint(0, 2, (K, 1, 6), generator=torch.Generator().manual_seed(1)) - 1).double()
    _, est = divergence(lambda y: y @ A.T, z, probes)
    S = A + A.T
    var = 0.5 * float((S.square().sum() - S.diagonal().square().sum()))
    assert abs(float(est[0] - A.trace())) < 4 * math.sqrt(var / K)
    assert abs(float(est[0] - A.trace())) > 0  # an estimate, not the exact trace


def test_ode_bound_terms_are_the_closed_forms():
    """`ode_image_terms` for image i uses z_0 = α_0 f + σ_0 ε₀ with image i's ε₀: its columns are the analytic
    −log p_ODE(z_0), the decoder's −log p(x|z_0) and log N(z_0; α_0 f, σ_0²), in bits per dimension."""
    model = gaussian_model("learned_nnet")
    x = torch.randint(60, 200, (3, 1, 4, 4), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    terms, calls = ode_image_terms(model, x, rtol=1e-9, atol=1e-9, hutchinson=None, batch_size=2, seed=4,
                                   progress=False)
    assert len(calls) == 2
    g0 = model.gamma(torch.tensor(0.0, **F64))
    alpha_0, sigma_0 = process.alpha_sigma(g0)
    eps_0 = torch.cat([image_noise(4, i, (1, 4, 4), 1)[2] for i in range(3)]).double()
    f = model.encode(x)
    z_0 = alpha_0 * f + sigma_0 * eps_0
    to_bpd = 1 / (16 * math.log(2))
    log_q = torch.distributions.Normal(alpha_0 * f, sigma_0).log_prob(z_0).flatten(1).sum(1)
    with torch.no_grad():
        expected = torch.stack([-log_p_ode_closed_form(model, z_0), losses.reconstruction_loss(x, g0, eps_0),
                                log_q], 1) * to_bpd
    np.testing.assert_allclose(terms, expected.numpy(), rtol=1e-6, atol=1e-6)
