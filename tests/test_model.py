"""VDM as a module: shapes, determinism, input checks, model files."""

import pytest
import torch

from vdm import VDM
from vdm.checkpoint import CheckpointError, load_model, save_model, save_pretrained


def tiny(**kw):
    return VDM(image_size=8, n_embd=32, n_layer=1, **kw)


def test_loss_is_deterministic_given_a_generator_and_backpropagates():
    model = tiny(dropout=0.0)
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    a = model.loss(x, generator=torch.Generator().manual_seed(3))
    b = model.loss(x, generator=torch.Generator().manual_seed(3))
    for k in ("prior", "recon", "diff", "bpd", "t"):
        assert a[k].shape == (4,)
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    a["bpd"].mean().backward()
    assert model.gamma.w.grad is not None and model.score_model.conv_in.weight.grad is not None


def test_discrete_time_rounds_t_up_to_the_grid():
    model = tiny(timesteps=10)
    out = model.loss(torch.randint(0, 256, (8, 3, 8, 8)), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["t"] * 10, torch.round(out["t"] * 10))
    assert torch.all(out["t"] > 0)


@pytest.mark.parametrize("channels,size", [(3, 8), (1, 6)])
def test_sample_returns_uint8_images_deterministically(channels, size):
    model = VDM(image_size=size, channels=channels, n_embd=32, n_layer=1)
    a = model.sample(3, 4, generator=torch.Generator().manual_seed(1))
    b = model.sample(3, 4, generator=torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == (3, channels, size, size)
    assert torch.equal(a, b)
    assert model.training  # mode restored
    c = model.sample(2, 2, generator=torch.Generator().manual_seed(1), image_size=(5, 7))
    assert c.shape == (2, channels, 5, 7)


def test_bad_inputs_are_named():
    model = tiny()
    with pytest.raises(TypeError, match="integer"):
        model.loss(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="channels"):
        model.loss(torch.zeros(2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="0..255"):
        model.loss(torch.full((2, 3, 8, 8), 256))
    with pytest.raises(ValueError, match="gamma_type"):
        VDM(gamma_type="cosine")
    with pytest.raises(ValueError, match="steps"):
        model.sample(1, 0)


@pytest.mark.parametrize("kind", ["fixed_linear", "learned_linear", "learned_nnet"])
def test_model_file_round_trip(tmp_path, kind):
    model = tiny(gamma_type=kind, attention=True)
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    loaded = load_model(path)
    assert loaded.config == model.config
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_bad_model_files_are_rejected_clearly(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_model(junk)
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "missing")
    model = tiny()
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    data = bytearray(path.read_bytes())
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        load_model(truncated)


def test_save_pretrained_and_from_pretrained(tmp_path):
    """The folder layout of a model repository (config.json + model.safetensors) round-trips exactly, and
    loading gives a model in eval mode (no dropout)."""
    import json

    model = VDM(image_size=8, n_embd=32, n_layer=1, gamma_type="learned_nnet", dropout=0.2)
    save_pretrained(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == model.config.to_dict()
    loaded = load_model(tmp_path / "m")
    assert not loaded.training and loaded.config == model.config
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_model_builds_and_runs_on_the_meta_device():
    """The benchmarks count FLOPs with shapes only: building a model (its official initialisation included)
    and running its loss forward and backward on the meta device must work."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = VDM(image_size=8, n_embd=16, n_layer=1, dropout=0.0)
    x = torch.zeros(1, 3, 8, 8, dtype=torch.uint8, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        out = model.loss(x)
        (out["prior"] + out["recon"] + out["diff"]).mean().backward()
    assert model.score_model.conv_in.weight.is_meta and counter.get_total_flops() > 0
