"""`vdm.evaluate` and `vdm eval`: the test-set bpd against direct computations and closed forms."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import vdm
from vdm.checkpoint import save_model
from vdm.cli import main
from vdm.evaluate import diffusion_integrand, evaluate, image_losses, summarise

LN2 = math.log(2.0)


def tiny_model(**kw) -> vdm.VDM:
    torch.manual_seed(0)
    return vdm.VDM(n_embd=32, n_layer=1, image_size=8, **kw)


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)


def zero_eps_hat(model: vdm.VDM) -> vdm.VDM:
    """A model whose ε̂ is 0: its diffusion loss is ½·γ'(t)·‖ε‖² (known in closed form)."""
    model.eps_hat = lambda z_t, gamma_t, conditioning=None: torch.zeros_like(z_t)
    return model


# --- the estimator ----------------------------------------------------------------------------------------
def test_matches_model_loss_on_the_documented_noise():
    model, x, K, seed = tiny_model(), images(5), 3, 7
    got = evaluate(model, x, time_samples=K, batch_size=4, seed=seed, progress=False)
    model.eval()
    per_image = []
    for i in range(len(x)):  # the recipe of `image_noise`, written out
        s = np.random.SeedSequence([seed, i]).generate_state(2, dtype=np.uint32)
        g = torch.Generator().manual_seed(int(s[0]) << 32 | int(s[1]))
        u = torch.rand((), generator=g)
        t = (u + torch.arange(K) / K) % 1.0
        eps_0, eps = torch.randn((K, 3, 8, 8), generator=g), torch.randn((K, 3, 8, 8), generator=g)
        with torch.no_grad():
            out = model.loss(torch.from_numpy(x[i:i + 1]).repeat(K, 1, 1, 1), t, eps, eps_0)
        per_image.append({c: float(out[c].double().mean()) / (192 * LN2) for c in ("prior", "recon", "diff")})
    totals = [sum(p.values()) for p in per_image]
    assert got["bpd"] == pytest.approx(np.mean(totals), rel=1e-6)
    assert got["bpd_sem"] == pytest.approx(np.std(totals, ddof=1) / math.sqrt(5), rel=1e-5)
    for c in ("prior", "recon", "diff"):
        assert got[c] == pytest.approx(np.mean([p[c] for p in per_image]), rel=1e-6, abs=1e-12)
    assert (got["count"], got["steps"], got["time_samples"]) == (5, 0, K)


def test_summarise_closed_form():
    terms = np.array([[0.5, 0.25, 2.25], [0.5, 0.25, 3.25], [0.5, 0.25, 4.25], [0.5, 0.25, 5.25]])
    r = summarise(terms, steps=4, time_samples=2)  # totals 3, 4, 5, 6
    assert r["bpd"] == pytest.approx(4.5)
    assert r["bpd_sem"] == pytest.approx(math.sqrt(5 / 3) / 2)  # sd (ddof 1) = √(5/3), over √4
    assert (r["prior"], r["recon"], r["diff"]) == pytest.approx((0.5, 0.25, 3.75))
    assert (r["count"], r["steps"], r["time_samples"]) == (4, 4, 2)
    assert math.isnan(summarise(terms[:1])["bpd_sem"])
    with pytest.raises(ValueError):
        summarise(np.zeros((0, 3)))


def test_diffusion_loss_closed_form_continuous_and_discrete():
    """ε̂ = 0, fixed linear γ (Δ = γ₁ − γ₀): continuous E[L_diff]/D = Δ/2 nats, T steps T·expm1(Δ/T)/2;
    on the same noise the ratio discrete/continuous is exactly T·expm1(Δ/T)/Δ."""
    model = zero_eps_hat(tiny_model(gamma_type="fixed_linear"))
    delta = 5.0 - (-13.3)
    x = images(16)
    cont = evaluate(model, x, time_samples=4, seed=1, progress=False)
    assert cont["diff"] == pytest.approx(delta / (2 * LN2), rel=0.04)  # 12288 squared normals: sd 1.3 %
    for T in (10, 100, 1000):
        disc = evaluate(model, x, steps=T, time_samples=4, seed=1, progress=False)
        assert disc["diff"] / cont["diff"] == pytest.approx(T * math.expm1(delta / T) / delta, rel=1e-5)
        assert (disc["prior"], disc["recon"]) == (cont["prior"], cont["recon"])
    assert model.config.timesteps == 0  # the user's model is left in continuous time


def test_discrete_time_bound_exceeds_continuous_and_converges():
    model, x = tiny_model(), images(12, seed=3)
    kw = dict(time_samples=8, seed=2, progress=False)
    cont = evaluate(model, x, **kw)["bpd"]
    disc = {T: evaluate(model, x, steps=T, **kw)["bpd"] for T in (10, 100, 1000)}
    assert all(math.isfinite(v) for v in [cont, *disc.values()])
    assert disc[10] > disc[100] > disc[1000] > cont
    assert disc[1000] == pytest.approx(cont, rel=0.03)


def test_deterministic_batch_independent_and_eval_mode():
    model, x = tiny_model(dropout=0.5), images(6)
    model.train()
    a = image_losses(model, x, time_samples=3, batch_size=64, seed=5, progress=False)
    b = image_losses(model, x, time_samples=3, batch_size=64, seed=5, progress=False)
    c = image_losses(model, x, time_samples=3, batch_size=2, seed=5, progress=False)
    d = image_losses(model, x, time_samples=3, batch_size=64, seed=6, progress=False)
    np.testing.assert_array_equal(a, b)  # same seed, dropout off: identical
    np.testing.assert_allclose(a, c, rtol=1e-5)  # batch size does not change the draws
    assert not np.allclose(a, d)
    assert model.training  # restored


def test_diffusion_integrand_closed_form():
    """ε̂ = 0, fixed linear γ: the integrand is ½·Δ·mean(ε²)/ln 2 at every t, ε the documented draw."""
    model = zero_eps_hat(tiny_model(gamma_type="fixed_linear"))
    x = images(4)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).double()
    expected = 0.5 * 18.3 * float(eps.square().mean()) / LN2
    got = diffusion_integrand(model, x, [0.1, 0.5, 0.9], seed=3, batch_size=3)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_diffusion_integrand_averages_to_the_diffusion_loss():
    model, x = tiny_model(), images(6)
    P = 32
    curve = diffusion_integrand(model, x, (np.arange(P) + 0.5) / P, seed=0)
    ref = evaluate(model, x, time_samples=32, seed=0, progress=False)["diff"]
    assert curve.mean() == pytest.approx(ref, rel=0.1)


# --- the command ------------------------------------------------------------------------------------------
def make_run(tmp_path, data_root=None):
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    save_model(tiny_model(), step / "ema.safetensors")
    (run / "checkpoints" / "best").write_text("step_00000010\n")
    if data_root is not None:
        (run / "config.json").write_text(json.dumps({"data": {"name": "folder", "root": str(data_root)}}))
    return run


def image_folder(tmp_path):
    """A folder dataset: test/ holds one 16×16 picture, i.e. four 8×8 tiles."""
    root = tmp_path / "imgs"
    (root / "test").mkdir(parents=True)
    pixels = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "test" / "a.png")
    return root


def test_cli_eval_json_uses_the_run_config(tmp_path, capsys):
    run = make_run(tmp_path, image_folder(tmp_path))
    assert main(["eval", str(run), "--json", "--time-samples", "2", "--device", "cpu"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["count"], r["data"], r["split"], r["steps"]) == (4, "folder", "test", 0)
    assert r["bpd"] == pytest.approx(r["prior"] + r["recon"] + r["diff"])
    assert r["checkpoint"].endswith("ema.safetensors")


def test_cli_eval_text_line(tmp_path, capsys):
    run = make_run(tmp_path, image_folder(tmp_path))
    assert main(["eval", str(run / "checkpoints" / "step_00000010"), "--steps", "50", "--limit", "3",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("test bpd ") and "± " in out and "on 3 images, T = 50 steps" in out


@pytest.mark.parametrize("target", ["missing", "garbage.safetensors"])
def test_cli_eval_errors(tmp_path, capsys, target):
    (tmp_path / "garbage.safetensors").write_bytes(b"not a model at all")
    assert main(["eval", str(tmp_path / target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vdm eval: error:") and target in err and "Traceback" not in err


def test_cli_eval_bad_dataset(tmp_path, capsys):
    run = make_run(tmp_path)
    assert main(["eval", str(run), "--data", "folder", "--data-root", str(tmp_path / "nope")]) == 2
    assert "folder" in capsys.readouterr().err


def test_cli_eval_limit_takes_the_first_images(tmp_path, capsys):
    run = make_run(tmp_path, image_folder(tmp_path))
    assert main(["eval", str(run), "--json", "--limit", "2", "--time-samples", "2", "--device", "cpu"]) == 0
    r = json.loads(capsys.readouterr().out)
    from vdm.data import load_dataset
    x = load_dataset("folder", "test", root=tmp_path / "imgs", channels=3, image_size=8)
    expected = evaluate(vdm.checkpoint.load_model(run), x[:2], time_samples=2, progress=False)
    assert r["count"] == 2 and r["bpd"] == pytest.approx(expected["bpd"], rel=1e-12)


def test_cli_eval_ode_bound(tmp_path, capsys):
    run = make_run(tmp_path, image_folder(tmp_path))
    torch.manual_seed(0)  # a smaller network: the exact trace takes D = 192 vector-Jacobian products a call
    save_model(vdm.VDM(n_embd=8, n_layer=0, image_size=8), run / "checkpoints" / "step_00000010" / "ema.safetensors")
    args = ["eval", str(run), "--likelihood", "ode", "--limit", "2", "--rtol", "1e-2", "--atol", "1e-2",
            "--device", "cpu"]
    assert main(args + ["--json", "--hutchinson", "2"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["count"] == 2 and r["hutchinson"] == 2 and r["function_evals"] >= 6
    assert r["ode_bpd"] == pytest.approx(r["ode_nll"] + r["ode_recon"] + r["ode_log_q"])
    assert "bpd" in r  # the VLB of the same images beside it
    assert main(args + ["--exact-trace", "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ODE bound ") and "exact trace" in out and "\ntest bpd " in out
    assert main(args + ["--hutchinson", "0"]) == 2
    assert "--hutchinson" in capsys.readouterr().err
