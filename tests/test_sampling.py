"""`vdm.samplers`, `vdm.sample_run` and `vdm sample`: agreement with `VDM.sample`, exactness on a known data
distribution, conditioning, files."""


import numpy as np
import pytest
import torch
from PIL import Image

import vdm
from vdm import process
from vdm.checkpoint import save_model
from vdm.cli import main
from vdm.image_files import load_npz, make_grid, save_grid_png, save_npz
from vdm.sample_run import sample_images
from vdm.samplers import SAMPLERS, ancestral_sample, generate, lambda_times, prior_latent, uniform_times
from vdm.seeding import image_generators


def tiny_model(**kw) -> vdm.VDM:
    torch.manual_seed(0)
    return vdm.VDM(n_embd=32, n_layer=1, image_size=8, **kw)


def test_model_sample_is_the_ancestral_sampler():
    model = tiny_model(dropout=0.3)
    model.train()
    theirs = model.sample(3, 7, torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    z_1 = prior_latent(model, 3, generator=g)
    ours = ancestral_sample(model, z_1, 7, generator=g)
    assert ours.dtype == torch.uint8 and ours.shape == (3, 3, 8, 8)
    assert torch.equal(ours, theirs)
    assert model.training  # restored


def test_image_i_depends_only_on_seed_and_i():
    """z_1 and the step noise of image i come from the generator of (seed, i): the same images whatever the
    batch size or the offset, and the same z_1 for every sampler."""
    model = tiny_model()
    a = sample_images(model, 5, sampler="ancestral", steps=3, seed=7, batch=2)
    assert a.dtype == torch.uint8 and a.shape == (5, 3, 8, 8)
    assert torch.equal(a, sample_images(model, 5, sampler="ancestral", steps=3, seed=7, batch=5))
    assert torch.equal(a[3:], sample_images(model, 2, sampler="ancestral", steps=3, seed=7, start=3, batch=1))
    assert not torch.equal(a, sample_images(model, 5, sampler="ancestral", steps=3, seed=8))
    gens = image_generators(7, range(5))
    z_1 = prior_latent(model, 5, generator=gens)
    assert torch.equal(a, generate(model, z_1, "ancestral", uniform_times(3), generator=gens))
    d = sample_images(model, 2, sampler="dpmpp-2m", steps=4, grid="lambda", seed=7)
    z_1 = prior_latent(model, 2, generator=image_generators(7, range(2)))
    assert torch.equal(d, generate(model, z_1, "dpmpp-2m", lambda_times(model, 4)))


def test_ancestral_sample_is_the_model_step_loop():
    model = tiny_model()
    g = torch.Generator().manual_seed(4)
    z_1 = prior_latent(model, 2, generator=g, image_size=(8, 12))
    x = ancestral_sample(model, z_1, 5, generator=torch.Generator().manual_seed(9))
    g2, z = torch.Generator().manual_seed(9), z_1.clone()
    with torch.no_grad():
        for i in range(5):
            z = model.sample_step(z, i, 5, torch.randn(z.shape, generator=g2))
        assert torch.equal(x, model.decode(z).to(torch.uint8))
    assert x.shape == (2, 3, 8, 12)


class PointMass(vdm.VDM):
    """A VDM whose ε̂ is the exact posterior mean of ε when the data is one image x*: ε̂ = (z_t − α_t f*)/σ_t."""

    def set_target(self, x_star: torch.Tensor) -> None:
        self.f_star = self.encode(x_star)

    def eps_hat(self, z_t, gamma_t, conditioning=None):
        alpha, sigma = process.alpha_sigma(gamma_t.reshape(-1, 1, 1, 1))
        return (z_t - alpha * self.f_star) / sigma


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_exact_denoiser_samples_the_data_point(sampler):
    """With the ideal ε̂ for a point mass, x̂ = x* at every step, so every sampler ends at z_0 = α_0 f* + σ_0·e
    with |e| of order 1 (for the ancestral sampler p(z_s|z_t) = q(z_s|z_t, x*), z_0 ~ q(z_0|x*)), which at
    γ(0) = −16 (σ_0/α_0 = e⁻⁸, 1/23 of half a pixel step) decodes to x* exactly, for any time grid."""
    model = PointMass(n_embd=32, n_layer=1, image_size=8, gamma_type="fixed_linear", gamma_min=-16.0)
    x_star = torch.randint(0, 256, (1, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    model.set_target(x_star)
    z_1 = prior_latent(model, 4, generator=torch.Generator().manual_seed(1))
    for times in (uniform_times(10), [1.0, 0.9, 0.5, 0.2, 0.01, 0.0]):
        x = generate(model, z_1, sampler, times, generator=torch.Generator().manual_seed(2),
                     **({"eta": 0.5} if sampler == "ddim" else {}))
        assert torch.equal(x, x_star.expand(4, -1, -1, -1))


def test_conditioning_goes_through_the_sampler_signature(monkeypatch):
    """Every network call gets the conditioning as an argument and the samplers leave the model's attributes
    alone: a wrapper around `model.eps_hat` (here counting calls) survives sampling with a conditioning, and
    sees K calls per image for each K-step sampler."""
    model = tiny_model()
    calls, real = [], model.eps_hat

    def counted(z_t, gamma_t, conditioning=None):
        calls.append((z_t.shape[0], conditioning))
        return real(z_t, gamma_t, conditioning)

    monkeypatch.setattr(model, "eps_hat", counted)
    for sampler in ("ancestral", "ddim", "dpmpp-2m", "dpmpp-3m"):
        calls.clear()
        sample_images(model, 3, sampler=sampler, steps=4, batch=2, conditioning=1.0)
        assert sum(n for n, _ in calls) == 4 * 3
        assert all(c is not None and torch.equal(c, torch.ones(n)) for n, c in calls)
        assert model.eps_hat is counted


def test_threads_sample_one_model_with_different_conditionings():
    """No state on the model: threads sampling it at once, with conditionings 0 and 1, get what each gets
    alone (one torch thread: a shared intra-op pool would round differently), and the model is as it was."""
    from concurrent.futures import ThreadPoolExecutor

    model = tiny_model().eval()
    with torch.no_grad():
        for p in model.score_model.parameters():  # a network that reads its conditioning input
            p.add_(torch.randn_like(p) * 0.05)

    def draw(c):
        return sample_images(model, 2, sampler="ddim", steps=6, conditioning=c)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = [draw(0.0), draw(1.0)]
        with ThreadPoolExecutor(2) as pool:
            together = list(pool.map(draw, [0.0, 1.0] * 3))
    finally:
        torch.set_num_threads(threads)
    assert not torch.equal(*alone)
    for k, x in enumerate(together):
        assert torch.equal(x, alone[k % 2])
    assert not model.training and all(p.requires_grad for p in model.parameters())


def test_time_grid_checked():
    model = tiny_model()
    z = prior_latent(model, 1)
    for bad in ([1.0], [0.0, 1.0], [1.0, 0.5, 0.5, 0.0], [1.0, 0.5]):
        with pytest.raises(ValueError):
            generate(model, z, "ancestral", bad)
    with pytest.raises(ValueError, match="unknown sampler"):
        generate(model, z, "euler", [1.0, 0.0])
    with pytest.raises(ValueError):
        uniform_times(0)
    assert uniform_times(4) == [1.0, 0.75, 0.5, 0.25, 0.0]


# --- files ------------------------------------------------------------------------------------------------
def test_grid_layout():
    imgs = np.arange(5 * 3 * 2 * 3, dtype=np.uint8).reshape(5, 3, 2, 3)
    grid = make_grid(imgs, nrow=2, padding=1)  # 3 rows of 2: (3·3 + 1) × (2·4 + 1)
    assert grid.shape == (10, 9, 3)
    np.testing.assert_array_equal(grid[1:3, 5:8], imgs[1].transpose(1, 2, 0))  # row 0, column 1
    np.testing.assert_array_equal(grid[7:9, 1:4], imgs[4].transpose(1, 2, 0))  # row 2, column 0
    assert grid[0].max() == 0 and grid[7:9, 5:8].max() == 0  # frame and the empty slot stay black


def test_png_and_npz_round_trip(tmp_path):
    grey = np.random.default_rng(0).integers(0, 256, (4, 1, 5, 6), dtype=np.uint8)
    save_grid_png(grey, tmp_path / "g.png", nrow=4, padding=0)
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == "L" and im.size == (24, 5)
        np.testing.assert_array_equal(np.asarray(im)[:, 6:12], grey[1, 0])
    save_npz(grey, tmp_path / "g.npz")
    np.testing.assert_array_equal(load_npz(tmp_path / "g.npz"), grey)
    with np.load(tmp_path / "g.npz") as d:  # what FID tools read: arr_0, N×H×W×C uint8
        assert d.files == ["arr_0"] and d["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(d["arr_0"], grey.transpose(0, 2, 3, 1))
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="bad.npz"):
        load_npz(tmp_path / "bad.npz")
    with pytest.raises(ValueError):
        save_npz(np.full((1, 3, 2, 2), 300), tmp_path / "x.npz")


# --- the command ------------------------------------------------------------------------------------------
@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_model(tiny_model(), path)
    return path


def run_sample(model_file, out, seed, *extra, steps=4):
    args = ["sample", str(model_file), "-n", "5", "--seed", str(seed), "--out", str(out), "--device", "cpu",
            *(["--steps", str(steps)] if steps else []), *extra]
    assert main(args) == 0
    return load_npz(out.with_suffix(".npz"))


def test_cli_sample_writes_grid_and_npz(tmp_path, model_file):
    a = run_sample(model_file, tmp_path / "a.png", 1, "--sampler", "ancestral")
    assert a.dtype == np.uint8 and a.shape == (5, 3, 8, 8)
    with Image.open(tmp_path / "a.png") as im:  # ⌈√5⌉ = 3 a row, 2 rows, 2-pixel padding
        assert im.mode == "RGB" and im.size == (3 * 10 + 2, 2 * 10 + 2)
        np.testing.assert_array_equal(np.asarray(im)[2:10, 12:20], a[1].transpose(1, 2, 0))
    np.testing.assert_array_equal(a, run_sample(model_file, tmp_path / "b.png", 1, "--sampler", "ancestral"))
    assert not np.array_equal(a, run_sample(model_file, tmp_path / "c.png", 2, "--sampler", "ancestral"))
    model = vdm.checkpoint.load_model(model_file)
    gens = image_generators(1, range(5))
    z_1 = prior_latent(model, 5, generator=gens)
    np.testing.assert_array_equal(a, ancestral_sample(model, z_1, 4, generator=gens).numpy())
    assert not (tmp_path / "a.partial").exists()


def test_cli_sample_without_a_model_uses_the_packaged_sampling_model(tmp_path, model_file, monkeypatch, capsys):
    import vdm.pretrained as pre
    monkeypatch.setattr(pre, "PRETRAINED_DIR", tmp_path / "pretrained")
    args = ["sample", "-n", "5", "--seed", "1", "--steps", "4", "--device", "cpu", "--sampler", "ancestral"]
    assert main([*args, "--out", str(tmp_path / "x.png")]) == 2  # not there: one line naming the file
    err = capsys.readouterr().err
    assert "sample.safetensors is missing" in err and "Traceback" not in err and not (tmp_path / "x.png").exists()
    (tmp_path / "pretrained").mkdir()
    model_file.rename(tmp_path / "pretrained" / pre.SAMPLING_MODEL)
    assert main([*args, "--out", str(tmp_path / "a.png")]) == 0
    a = load_npz(tmp_path / "a.npz")
    model = vdm.checkpoint.load_model(tmp_path / "pretrained" / pre.SAMPLING_MODEL)
    gens = image_generators(1, range(5))
    np.testing.assert_array_equal(a, ancestral_sample(model, prior_latent(model, 5, generator=gens), 4,
                                                      generator=gens).numpy())


def test_cli_sample_default_is_20_calls_of_dpmpp_2m(tmp_path, model_file, monkeypatch):
    import vdm.sample_run as sampling
    seen = []
    real = sampling.sample_images

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(sampling, "sample_images", spy)
    assert main(["sample", str(model_file), "-n", "2", "--out", str(tmp_path / "a.png"), "--device", "cpu"]) == 0
    assert seen and all(k["sampler"] == "dpmpp-2m" and k["steps"] == 20 and k["grid"] == "lambda" for k in seen)


def test_cli_sample_image_size_and_nrow(tmp_path, model_file):
    a = run_sample(model_file, tmp_path / "a.png", 0, "--image-size", "12", "--nrow", "5")
    assert a.shape == (5, 3, 12, 12)
    with Image.open(tmp_path / "a.png") as im:
        assert im.size == (5 * 14 + 2, 14 + 2)


def test_cli_sample_errors(tmp_path, model_file, capsys):
    assert main(["sample", str(tmp_path / "none"), "--out", str(tmp_path / "x.png")]) == 2
    assert main(["sample", str(model_file), "--out", str(tmp_path / "x.jpg")]) == 2
    err = capsys.readouterr().err
    assert "none: no such file" in err and ".png" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("sampler,extra", [("ddim", ["--eta", "0.5", "--grid", "t"]), ("dpmpp-2m", []),
                                           ("dpmpp-3m", ["--grid", "lambda"]), ("ode", ["--rtol", "1e-3"])])
def test_cli_samplers_batch_independent(tmp_path, model_file, sampler, extra):
    steps = None if sampler == "ode" else 3
    a = run_sample(model_file, tmp_path / "a.png", 3, "--sampler", sampler, *extra, "--batch", "2", steps=steps)
    b = run_sample(model_file, tmp_path / "b.png", 3, "--sampler", sampler, *extra, "--batch", "5", steps=steps)
    assert a.shape == (5, 3, 8, 8)
    if sampler == "ode":  # one adaptive solve per batch: equal up to the tolerance, so nearly every pixel
        assert np.mean(a == b) > 0.99
    else:
        np.testing.assert_array_equal(a, b)


def test_cli_sample_resumes_and_refuses_other_arguments(tmp_path, model_file, monkeypatch, capsys):
    import vdm.sample_run as sampling

    expected = run_sample(model_file, tmp_path / "ref.png", 4, "--batch", "2", "--sampler", "ancestral")
    real, calls, stop_at = sampling.sample_images, [], [2]

    def interrupted(*args, **kwargs):
        calls.append(kwargs["start"])
        if kwargs["start"] in stop_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample_images", interrupted)
    out = tmp_path / "s.png"
    base = ["sample", str(model_file), "-n", "5", "--steps", "4", "--out", str(out), "--device", "cpu",
            "--batch", "2", "--sampler", "ancestral"]
    assert main(base + ["--seed", "4"]) == 130  # stopped inside the second batch
    assert sorted(p.name for p in (tmp_path / "s.partial").iterdir()) == ["batch_000000.npy", "settings.json"]
    assert main(base + ["--seed", "5"]) == 2  # other arguments: refused, the partial folder kept
    err = capsys.readouterr().err
    assert "seed" in err and "s.partial" in err and "Traceback" not in err
    calls.clear()
    stop_at.clear()
    assert main(base + ["--seed", "4"]) == 0
    assert calls == [2, 4]  # only the batches that were missing
    np.testing.assert_array_equal(load_npz(out.with_suffix(".npz")), expected)
    assert not (tmp_path / "s.partial").exists()


@pytest.mark.parametrize("extra,message", [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--sampler", "ode", "--steps", "10"], "do not apply to --sampler ode"),
    (["--sampler", "ode", "--rtol", "0"], "--rtol and --atol must be positive"),
    (["--sampler", "ddim", "--eta", "1.5"], "--eta must lie in [0, 1]"),
    (["--eta", "0.5"], "--eta applies to --sampler ddim only"),
    (["-n", "0"], "must be positive"),
    (["--batch", "0"], "must be positive"),
])
def test_cli_sample_bad_arguments(tmp_path, model_file, capsys, extra, message):
    assert main(["sample", str(model_file), "--out", str(tmp_path / "x.png"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vdm sample: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_cli_sample_unknown_sampler(tmp_path, model_file, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", str(model_file), "--sampler", "euler"])
    assert e.value.code == 2 and "invalid choice: 'euler'" in capsys.readouterr().err
