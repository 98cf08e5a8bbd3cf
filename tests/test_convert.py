"""`vdm convert`: official checkpoint files (flax MessagePack) → vdm model files that reproduce the official outputs.

The official-format checkpoint `tests/fixtures/official_checkpoint/D/checkpoints-0.flax` and the official model's
outputs for its EMA parameters (`D.npz`, float64) come from the official code; other checkpoints here are written in the same
format (flax's `to_bytes` layout, `vdm.testing.pack_array`) from random official parameter trees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

import official_reference as ref
from conftest import CHECKPOINT_FIXTURES as CKPT, FIXTURES
from vdm.checkpoint import load_model, read_source
from vdm.convert import convert_checkpoint, parameter_map
from vdm.flax_checkpoint import FlaxCheckpointError, read_parameters
from vdm.testing import nest, pack_array
from vdm.official_configs import OFFICIAL_CONFIGS, official_config

SRC = Path(__file__).resolve().parents[1] / "src"


def run_vdm(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "vdm.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def nchw(a, dtype) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a)).permute(0, 3, 1, 2).to(dtype)


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).double().numpy()


def rel_err(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape
    scale = np.abs(theirs) if theirs.ndim <= 1 else np.abs(theirs).max()
    return float(np.max(np.abs(ours - theirs) / scale))


# --- writing official-format files (flax.serialization.to_bytes layout) -------------------------------------
def pack_flax(state: dict) -> bytes:
    return msgpack.packb(state, default=pack_array, use_bin_type=True)


def official_state(ema: dict[str, np.ndarray], step: int = 7) -> dict:
    raw = {k: (v + 0.01).astype(v.dtype) for k, v in ema.items()}
    zeros = {k: np.zeros_like(v) for k, v in ema.items()}
    return {"step": step, "params": nest(raw), "ema_params": nest(ema),
            "opt_state": {"0": {"count": np.array(step, np.int32), "mu": nest(zeros), "nu": nest(zeros)},
                          "1": {}, "2": {}}}


# --- the official checkpoint and its outputs ----------------------------------------------------------------
@pytest.fixture(scope="module")
def converted_d(tmp_path_factory):
    out = tmp_path_factory.mktemp("convert") / "d.safetensors"
    proc = run_vdm("convert", str(CKPT / "D" / "checkpoints-0"), "--config", str(CKPT / "D.json"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "step 12345" in proc.stdout
    return out


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-9)])
@torch.no_grad()
def test_converted_checkpoint_reproduces_the_official_outputs(converted_d, dtype, rtol):
    d = np.load(CKPT / "D.npz")
    model = load_model(converted_d).to(dtype)
    assert not model.training
    x = torch.from_numpy(d["input/x"]).permute(0, 3, 1, 2)
    t = torch.from_numpy(d["input/t"]).to(dtype)
    cond = torch.from_numpy(d["input/conditioning"]).to(dtype)
    loss = model.loss(x, t=t, eps=nchw(d["input/eps"], dtype), eps_0=nchw(d["input/eps_0"], dtype),
                      conditioning=cond)
    g_t, dg_t = model.gamma.gamma_and_derivative(loss["t"])
    z_t = torch.from_numpy(d["output/z_t"]).permute(0, 3, 1, 2).to(dtype)
    ours = {"g_0": model.gamma(0.0).reshape(1), "g_1": model.gamma(1.0).reshape(1), "g_t": g_t, "dg_t": dg_t,
            "loss_recon": loss["recon"], "loss_klz": loss["prior"], "loss_diff": loss["diff"], "bpd": loss["bpd"],
            "eps_hat": nhwc(model.eps_hat(z_t, g_t, cond))}
    for key, value in ours.items():
        theirs = np.reshape(d[f"output/{key}"], np.shape(value))
        err = rel_err(value.double().numpy() if torch.is_tensor(value) else value, theirs)
        assert err <= rtol, f"{key}: relative error {err:.1e} > {rtol} in {dtype}"


def test_converted_file_records_its_source(converted_d):
    source = read_source(converted_d)
    assert source["step"] == 12345 and source["params"] == "ema_params" and source["file"] == "checkpoints-0.flax"
    assert source["official_config"]["gamma_type"] == "learnable_scalar"


def test_raw_and_ema_weights_and_every_way_to_name_the_file(tmp_path):
    _, ema = read_parameters(CKPT / "D")  # a directory: its highest-numbered *.flax
    step, raw = read_parameters(CKPT / "D" / "checkpoints-0.flax", "params")
    assert step == 12345 and set(ema) == set(raw)
    assert any(not np.array_equal(ema[k], raw[k]) for k in ema)
    model, source = convert_checkpoint(CKPT / "D" / "checkpoints-0", str(CKPT / "D.json"), tree="params")
    assert source["params"] == "params"
    state = model.state_dict()
    for path, (name, transform) in parameter_map(model.config).items():
        np.testing.assert_array_equal(state[name].numpy(), np.asarray(transform(raw[path])), err_msg=path)


# --- checkpoints of other configurations, written in the official format --------------------------------------
@pytest.mark.parametrize("config", [
    dict(gamma_type="learnable_nnet", sm_n_embd=32, sm_n_layer=1, with_attention=True, with_fourier_features=True),
    dict(gamma_type="fixed", sm_n_embd=32, sm_n_layer=2, with_attention=False, with_fourier_features=False),
], ids=["nnet-attention", "fixed"])
@torch.no_grad()
def test_other_configurations_convert_through_the_command_line(tmp_path, config):
    cfg = dict(vocab_size=256, gamma_min=-13.3, gamma_max=5.0, sm_n_timesteps=0, sm_pdrop=0.1, **config)
    rng = np.random.default_rng(3)
    params = ref.random_official_params(cfg, 3, rng)
    params = {k: np.asarray(v, np.float32) for k, v in params.items()}
    (tmp_path / "checkpoints-3.flax").write_bytes(pack_flax(official_state(params, step=3)))
    (tmp_path / "checkpoints-12.flax").write_bytes(pack_flax(official_state(params, step=12)))
    (tmp_path / "config.json").write_text(json.dumps({"config": cfg, "height": 6}))
    out = tmp_path / "m.safetensors"
    proc = run_vdm("convert", str(tmp_path), "--config", str(tmp_path / "config.json"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert read_source(out)["step"] == 12  # the highest-numbered file of the directory
    model = load_model(out).double()
    assert model.config.image_size == 6
    t = np.array([0.0, 0.3, 1.0])
    assert rel_err(model.gamma(torch.from_numpy(t)).numpy(), ref.gamma(params, cfg, t)) <= 1e-9
    z = rng.normal(size=(2, 6, 6, 3))
    g = ref.gamma(params, cfg, np.array([0.2, 0.8]))
    eps_hat = nhwc(model.eps_hat(nchw(z, torch.float64), torch.from_numpy(g)))
    assert rel_err(eps_hat, ref.score_net(params, cfg, z, g)) <= 1e-9


def test_named_configurations_are_the_official_ones():
    """The named cifar10 configuration builds exactly the parameter set of the official CIFAR-10 model
    (shapes from the official `model.init`, official_vdm/init_stats.json)."""
    from vdm.convert import config_from_official
    from vdm.model import VDM

    stats = json.loads((FIXTURES / "init_stats.json").read_text())["cifar10"]
    fields, size = official_config("cifar10")
    assert size == 32 and {k: fields[k] for k in stats["config"]} == stats["config"]
    cfg = config_from_official(fields, channels=3, image_size=size)
    state = VDM(cfg).state_dict()
    for path, (name, transform) in parameter_map(cfg).items():
        assert np.asarray(transform(np.zeros(stats["params"][path]["shape"]))).shape == state[name].shape
    assert set(OFFICIAL_CONFIGS) == {"cifar10", "cifar10_aug", "cifar10_aug_paper", "imagenet32", "imagenet64"}
    assert official_config("imagenet64")[1] == 64


# --- bad input: one line naming the problem, no traceback, nothing written ------------------------------------
def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = (CKPT / "D" / "checkpoints-0.flax").read_bytes()
    files = {}

    def put(name, data, expect):
        p = tmp_path / f"{name}.flax"
        p.write_bytes(data)
        files[name] = (p, expect)

    put("truncated", good[: len(good) // 2], "truncated")
    put("random", np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes(), "not")
    put("not-vdm", msgpack.packb({"step": 1, "ema_params": {"encoder": {"w": 1}}}), "not a VDM training state")
    put("no-ema", msgpack.packb({"step": 1, "params": {}}), "no 'ema_params'")
    complex_ext = msgpack.packb({"step": 1, "ema_params": {"score_model": msgpack.ExtType(2, b"x")}})
    put("ext2", complex_ext, "extension type 2")
    chunked = {"step": 1, "ema_params": {"score_model": {"conv_in": {"kernel": {
        "__msgpack_chunked_array__": True, "shape": [2], "chunks": {}}}}}}
    put("chunked", msgpack.packb(chunked), "chunks")
    bad_len = msgpack.ExtType(1, msgpack.packb([[4, 4], "float32", b"\0" * 10]))
    put("short-array", msgpack.packb({"step": 1, "ema_params": {"score_model": {"k": bad_len}}}), "10 bytes")
    return files


def test_bad_files_are_refused_with_one_line(tmp_path):
    for name, (path, expect) in _bad_files(tmp_path).items():
        with pytest.raises(FlaxCheckpointError, match=expect):
            read_parameters(path)
    # through the command line: exit 2, one line on stderr, no traceback, no output file
    for name in ("truncated", "random", "not-vdm"):
        path, expect = _bad_files(tmp_path)[name]
        out = tmp_path / f"{name}.safetensors"
        proc = run_vdm("convert", str(path), "--config", "cifar10", "--out", str(out))
        assert proc.returncode == 2, (name, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr and expect in lines[0], (name, proc.stderr)
        assert not out.exists()


def test_config_that_does_not_fit_and_existing_output(tmp_path):
    out = tmp_path / "m.safetensors"
    proc = run_vdm("convert", str(CKPT / "D"), "--config", "cifar10", "--out", str(out))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "do not match the config" in proc.stderr and "n_layer 32" in proc.stderr
    assert not out.exists()
    out.write_bytes(b"keep me")
    proc = run_vdm("convert", str(CKPT / "D"), "--config", str(CKPT / "D.json"), "--out", str(out))
    assert proc.returncode == 2 and "--force" in proc.stderr and out.read_bytes() == b"keep me"
    proc = run_vdm("convert", str(CKPT / "D"), "--config", "cifar11", "--out", str(tmp_path / "n.safetensors"))
    assert proc.returncode == 2 and "cifar11" in proc.stderr


def test_written_files_respect_the_umask(converted_d):
    """Outputs get the permissions every other file gets (0666 less the umask), not mkstemp's 0600."""
    mask = os.umask(0o022)
    os.umask(mask)
    assert converted_d.stat().st_mode & 0o777 == 0o666 & ~mask
