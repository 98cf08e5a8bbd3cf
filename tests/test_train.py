"""`vdm train`: config parsing, data order, EMA, optimiser groups, checkpoints, exact resume after SIGKILL,
non-finite losses, and 2-process DistributedDataParallel against 1 process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vdm.checkpoint import load_model
from vdm.config import ConfigError, OptimConfig, TrainConfig, apply_overrides, build_config, load_preset, preset_names
from vdm.train import NonFiniteLossError, TrainingError, loop, train
from vdm.train.batches import BatchOrder, step_noise
from vdm.train.ema import EMA
from vdm.train.optim import decay_groups, lr_at

ROOT = Path(__file__).resolve().parents[1]


# --- a tiny model on a tiny image folder -------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """root/train and root/test with smooth random 32x32 PNGs: 8x8 tiles, 64 for training, 32 for test."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        (root / split).mkdir()
        for i in range(n):
            base = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
            img = Image.fromarray(base).resize((32, 32), Image.BILINEAR)
            img.save(root / split / f"{i}.png")
    return root


def tiny_toml(folder: Path, device: str = "cpu") -> str:
    return f"""
[model]
image_size = 8
n_embd = 8
n_layer = 1
dropout = 0.1
gamma_type = "learned_linear"
[optim]
lr = 1e-3
warmup_steps = 3
grad_clip = 1.0
[data]
name = "folder"
root = "{folder.as_posix()}"
test_images = 16
[run]
device = "{device}"
batch_size = 8
ema_decay = 0.9
log_every = 2
eval_every = 4
eval_batch_size = 16
checkpoint_every = 4
keep_last = 2
progress = false
tensorboard = false
"""


@pytest.fixture
def tiny(folder, tmp_path, device) -> TrainConfig:
    """The tiny run on the device under test (`pytest --device cuda`; the CPU by default)."""
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_toml(folder, str(device)))
    return build_config(None, [str(path)])


def weights(ckpt: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / name))


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


# `vdm train` in a child process whose steps take at least 0.3 s, so that a test can kill it mid-way
SLOW_TRAIN = """
import sys, time
from vdm.cli import main
from vdm.train.loop import _Trainer
one_step = _Trainer._one_step
def slow_step(self, window):
    one_step(self, window)
    time.sleep(0.3)
_Trainer._one_step = slow_step
sys.exit(main(sys.argv[1:]))
"""


def nonfinite_at(monkeypatch, steps: set[int]) -> None:
    """Make the loss of the given optimiser steps NaN (their noise ε is NaN)."""
    batch = loop._Trainer._batch

    def bad_batch(self):
        n, (x, t, eps_0, eps, conditioning) = batch(self)
        if self.step in steps:
            eps = torch.full_like(eps, float("nan"))
        return n, (x, t, eps_0, eps, conditioning)

    monkeypatch.setattr(loop._Trainer, "_batch", bad_batch)


def sub_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


# --- config ------------------------------------------------------------------------------------------------
def test_presets_load_and_match_the_paper():
    assert {"quick", "small", "compress", "fashion_mnist", "cifar10", "imagenet32", "imagenet64"} <= set(
        preset_names())
    for name in preset_names():
        load_preset(name)
    c = load_preset("cifar10")
    m = c.model
    assert (m.n_embd, m.n_layer, m.dropout, m.gamma_type) == (128, 32, 0.1, "learned_linear")
    o = c.optim
    assert (o.lr, o.beta1, o.beta2, o.eps, o.weight_decay) == (2e-4, 0.9, 0.99, 1e-8, 0.01)
    assert (o.warmup_steps, o.grad_clip, c.run.ema_decay, c.run.batch_size) == (100, 0.0, 0.9999, 128)
    assert (load_preset("imagenet64").model.n_embd, load_preset("imagenet64").model.n_layer) == (256, 64)
    assert load_preset("fashion_mnist").model.channels == 1


def test_overrides_are_typed():
    c = apply_overrides(TrainConfig(), ["optim.lr=1e-3", "model.n_layer=3", "run.precision=bf16",
                                        "data.root=/some/where", "model.fourier_exponents=[5, 6]",
                                        "optim.warmup_steps=10.0", "data.root=none",
                                        "model.gamma_type=learned_nnet"])
    assert (c.optim.lr, c.model.n_layer, c.run.precision, c.data.root) == (1e-3, 3, "bf16", None)
    assert c.model.fourier_exponents == (5, 6) and c.optim.warmup_steps == 10
    assert c.model.gamma_type == "learned_nnet"
    for bad in ("model.n_layer=x", "run.bf16=1", "run.precision=fp16", "optim.lr=fast", "model.nope=1", "nosection.a=1", "lr=1",
                "model.gamma_type=cosine", "model.n_layer=2.5"):
        with pytest.raises(ConfigError):
            apply_overrides(TrainConfig(), [bad])


def test_configs_with_the_old_bf16_key_still_load():
    """Configs written before run.precision existed said run.bf16 = true/false: read as "bf16"/"fp32"."""
    assert apply_overrides(TrainConfig(), ["run.bf16=true"]).run.precision == "bf16"
    assert TrainConfig.from_dict({"run": {"bf16": False}}).run.precision == "fp32"
    assert TrainConfig().run.precision == "auto"


def test_config_files_are_checked(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nn_embd = 3")
    with pytest.raises(ConfigError, match="bad.toml"):
        build_config(None, [str(bad)])
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[optim]\nlearning_rate = 1.0\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        build_config(None, [str(unknown)])
    c = load_preset("compress")
    assert TrainConfig.from_dict(json.loads(c.to_json())) == c


# --- data order, noise, EMA, optimiser ---------------------------------------------------------------------
def test_batch_order_is_a_sequence_of_epoch_permutations():
    order = BatchOrder(n=10, batch_size=4, seed=3)
    stream = torch.cat([order.indices(s) for s in range(5)])  # 20 positions = 2 epochs
    for e in range(2):
        assert sorted(stream[10 * e:10 * e + 10].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:20])  # a new permutation each epoch
    assert torch.equal(BatchOrder(10, 4, 3).indices(3), order.indices(3))
    assert not torch.equal(BatchOrder(10, 4, 4).indices(0), order.indices(0))


def test_step_noise_is_antithetic_over_the_global_batch():
    t, eps_0, eps = step_noise(0, 7, 8, (1, 2, 2), antithetic=True)
    gaps = torch.diff(torch.sort(t).values)
    torch.testing.assert_close(gaps, torch.full((7,), 1 / 8), atol=1e-6, rtol=0)
    assert eps.shape == eps_0.shape == (8, 1, 2, 2) and not torch.equal(eps, eps_0)
    t2, _, eps2 = step_noise(0, 7, 8, (1, 2, 2), antithetic=True)
    assert torch.equal(t, t2) and torch.equal(eps, eps2)


def test_ema_closed_form():
    """Constant weights p, start p₀: after k updates θ_ema = p + dᵏ(p₀ − p)."""
    model = torch.nn.Linear(3, 2)
    p0 = {k: v.clone() for k, v in model.state_dict().items()}
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for s in range(5):
        ema.update(model, s)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ema.state_dict()[k], v + 0.9 ** 5 * (p0[k] - v))
    assert EMA(model, 0.999, warmup=True).decay_at(0) == pytest.approx(0.1)


def test_weight_decay_groups_and_warmup():
    from vdm.model import VDM, VDMConfig
    model = VDM(VDMConfig(n_embd=8, n_layer=1))
    decay, no_decay = decay_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.01
    assert {names[id(p)] for p in no_decay["params"]} >= {"gamma.w", "gamma.b"}
    assert all(names[id(p)].startswith("gamma.") or p.dim() == 1 for p in no_decay["params"])
    cfg = TrainConfig().optim
    assert [lr_at(cfg, s) for s in (0, 49, 99, 100, 10**6)] == pytest.approx(
        [2e-6, 1e-4, 2e-4, 2e-4, 2e-4])
    cos = OptimConfig(lr=1e-3, warmup_steps=100, decay_steps=300)  # half cosine from step 100 to 300
    assert [lr_at(cos, s) for s in (99, 100, 150, 200, 300, 10**6)] == pytest.approx(
        [1e-3, 1e-3, 1e-3 * (1 + 2**-0.5) / 2, 5e-4, 0.0, 0.0], abs=1e-12)
    with pytest.raises(ValueError, match="decay_steps"):
        OptimConfig(warmup_steps=100, decay_steps=100)


def test_prune_keeps_the_last_k_and_the_best(tmp_path):
    from vdm.train import state
    for step in (1, 2, 3, 4):
        d = tmp_path / "checkpoints" / state.checkpoint_name(step)
        d.mkdir(parents=True)
        (d / "state.json").write_text("{}")
    (tmp_path / "checkpoints" / ".tmp_step_00000005_1").mkdir()  # left by a killed run
    state.write_best(tmp_path, state.checkpoint_name(1))
    state.prune(tmp_path, keep_last=2)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["best", "step_00000001", "step_00000003", "step_00000004"]


def test_cli_prints_the_resolved_config(capsys):
    from vdm.cli import main
    assert main(["train", "--preset", "compress", "--set", "optim.lr=1e-3", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 1e-3 and printed["model"]["gamma_type"] == "learned_nnet"
    assert main(["train", "--set", "optim.lr=fast", "--print-config"]) == 2
    assert "optim.lr" in capsys.readouterr().err


# --- runs ----------------------------------------------------------------------------------------------------
def test_run_writes_loadable_checkpoints_metrics_and_best(tiny, tmp_path):
    run = tmp_path / "run"
    summary = train(tiny, run, max_steps=10)
    assert summary["step"] == 10 and summary["stopped"] == "max_steps"
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    best = (run / "checkpoints" / "best").read_text().strip()
    assert ckpts[-2:] == ["step_00000008", "step_00000010"] and best in ckpts
    assert len(ckpts) <= 3  # the last 2 plus, possibly, an older best
    model = load_model(run)
    assert model.config.n_embd == 8
    ck = run / "checkpoints" / "step_00000010"
    assert {"model.safetensors", "ema.safetensors", "train_state.safetensors", "state.json",
            "config.json"} <= {p.name for p in ck.iterdir()}
    state = json.loads((ck / "state.json").read_text())
    assert state["step"] == 10 and state["images_seen"] == 80 and state["nonfinite_total"] == 0
    assert TrainConfig.from_dict(state["config"]) == tiny
    ts = load_file(str(ck / "train_state.safetensors"))
    assert ts["rng.cpu"].dtype == torch.uint8 and any(k.endswith("exp_avg_sq") for k in ts)
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {str(f.relative_to(run)): oct(f.stat().st_mode & 0o777) for f in run.rglob("*") if f.is_file()}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes  # every run file as the umask says (0644)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if "bpd" in r]
    test_recs = [r for r in records if "test_bpd" in r]
    assert [r["step"] for r in train_recs] == [2, 4, 6, 8, 10]
    for r in train_recs:
        assert r["bpd"] == pytest.approx(r["prior"] + r["recon"] + r["diff"])
        assert r["images_per_s"] > 0 and r["lr"] > 0
    assert [r["step"] for r in test_recs] == [4, 8, 10]
    assert min(test_recs, key=lambda r: r["test_bpd"])["step"] == int(best[5:])
    assert json.loads((run / "config.json").read_text()) == tiny.to_dict()
    with pytest.raises(TrainingError, match="--resume"):
        train(tiny, run, max_steps=12)
    with pytest.raises(TrainingError, match="optim.lr"):
        train(apply_overrides(tiny, ["optim.lr=0.5"]), run, resume=True, max_steps=12)


def test_sigkill_then_resume_is_bitwise_identical(tiny, folder, tmp_path, device):
    steps = 16
    config_file = tmp_path / "tiny.toml"
    config_file.write_text(tiny_toml(folder, str(device)))
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_TRAIN, "train", "--config", str(config_file), "--out", str(killed),
         "--max-steps", str(steps)],
        env=sub_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not list((killed / "checkpoints").glob("step_*")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "checkpoints" / f"step_{steps:08d}").exists()  # killed mid-way

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed process: the reduction order of CPU kernels follows the threads
    try:
        resumed = train(tiny, killed, resume=True, max_steps=steps)
        straight = train(tiny, tmp_path / "straight", max_steps=steps)
    finally:
        torch.set_num_threads(threads)
    a, b = Path(resumed["checkpoint"]), Path(straight["checkpoint"])
    for name in ("model.safetensors", "ema.safetensors", "train_state.safetensors"):
        assert_same(weights(a, name), weights(b, name))
    steps_logged = [json.loads(l)["step"] for l in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == sorted(steps_logged)  # records after the checkpoint were dropped, then rewritten


def test_split_steps_equal_whole_batch_steps_and_are_reproducible(tiny, tmp_path, device):
    """run.split = 2 runs each step's batch as two parts on two threads and sums their gradients: without
    dropout the weights after 6 steps equal those of whole-batch steps up to float rounding (the weights: a bias
    right before a GroupNorm has a gradient that is zero but for rounding, which AdamW turns into steps of ±lr,
    so biases are not compared); with dropout (each part its own generator) two split runs give bitwise the
    same weights, and the thread count is restored."""
    if device.type != "cpu":
        pytest.skip("run.split is for the CPU")
    threads = torch.get_num_threads()
    direct = apply_overrides(tiny, ["run.conv_algorithm=direct"])
    no_dropout = apply_overrides(direct, ["model.dropout=0.0"])
    train(no_dropout, tmp_path / "whole", max_steps=6)
    train(apply_overrides(no_dropout, ["run.split=2"]), tmp_path / "split", max_steps=6)
    assert torch.get_num_threads() == threads
    last = "checkpoints/step_00000006"
    whole, split = weights(tmp_path / "whole" / last), weights(tmp_path / "split" / last)
    assert_same({k: v for k, v in whole.items() if k.endswith("weight")},
                {k: v for k, v in split.items() if k.endswith("weight")}, atol=1e-5)
    for name in ("a", "b"):
        train(apply_overrides(direct, ["run.split=2"]), tmp_path / name, max_steps=6)
    assert_same(weights(tmp_path / "a" / last), weights(tmp_path / "b" / last))
    assert not torch.equal(weights(tmp_path / "a" / last)["score_model.down.0.conv2.weight"],
                           weights(tmp_path / "split" / last)["score_model.down.0.conv2.weight"])
    with pytest.raises(ConfigError, match="divisible by split"):
        apply_overrides(tiny, ["run.split=3"])
    with pytest.raises(TrainingError, match="run.split"):
        train(apply_overrides(direct, ["run.split=2", "run.compile=true"]), tmp_path / "c", max_steps=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # the pool sets 1; a constructor failing after it must put 3 back
        with pytest.raises(TrainingError, match="already holds checkpoints"):
            train(apply_overrides(direct, ["run.split=2"]), tmp_path / "split", max_steps=1)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


def test_training_bar_counts_to_a_total(tiny, tmp_path, capsys):
    """The bar counts to the step limit, and under a time limit to the step the run is expected to reach."""
    config = apply_overrides(tiny, ["run.progress=true", "run.checkpoint_every=100"])
    train(config, tmp_path / "steps", max_steps=3)
    assert "3/3 [" in capsys.readouterr().err
    train(config, tmp_path / "minutes", max_steps=3, max_minutes=10)
    assert "3/3 [" in capsys.readouterr().err
    assert loop.bar_total(0, 0, 0.0, 10**7, 1.0) is None  # no rate yet
    assert loop.bar_total(10, 5, 10.0, 10**7, 1.0) == 10 + 25  # 0.5 steps/s for the 50 s left
    assert loop.bar_total(10, 5, 10.0, 20, 1.0) == 20  # the step limit comes first
    assert loop.bar_total(10, 5, 70.0, 10**7, 1.0) == 10  # out of time
    assert loop.bar_total(10, 5, 10.0, 50, None) == 50


def test_nonfinite_steps_are_skipped_and_counted(tiny, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        nonfinite_at(m, {2})
        skipped = train(apply_overrides(tiny, ["run.checkpoint_every=100"]), tmp_path / "skip", max_steps=3)
    plain = train(apply_overrides(tiny, ["run.checkpoint_every=100"]), tmp_path / "plain", max_steps=2)
    assert skipped["nonfinite_total"] == 1
    # step 2 was skipped entirely: the weights after 3 steps are those after 2
    assert_same(weights(Path(skipped["checkpoint"])), weights(Path(plain["checkpoint"])))
    state = json.loads((Path(skipped["checkpoint"]) / "state.json").read_text())
    assert state["nonfinite_total"] == 1 and state["nonfinite_consecutive"] == 1  # the last step was the bad one
    recs = [json.loads(l) for l in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("skipped") == 1 for r in recs)


def test_too_many_nonfinite_losses_stop_the_run(tiny, tmp_path, monkeypatch):
    run = tmp_path / "nan"
    nonfinite_at(monkeypatch, {5, 6, 7})
    cfg = apply_overrides(tiny, ["run.max_nonfinite=3"])
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite"):
        train(cfg, run, max_steps=20)
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000004"]
    load_model(run / "checkpoints" / "step_00000004")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tiny, folder, tmp_path):
    """torchrun with 2 CPU processes, each half of the global batch, ends with the parameters of 1 process (fp32).

    The gradients agree to float rounding. Some of them are zero but for rounding (a bias followed by a
    one-channel GroupNorm), and Adam divides them by their own size, so rounding noise of 1e-10 would move
    those weights by ~lr/100; a larger Adam ε (1e-3, far below the real gradients) keeps that noise tiny.
    """
    steps = 3
    config_file = tmp_path / "tiny.toml"
    config_file.write_text(tiny_toml(folder))
    # fp32: under bf16 autocast (the default where bf16 is native) half batches round differently from whole ones
    settings = ["model.dropout=0.0", "data.test_images=0", "optim.eps=1e-3", "data.augment=flip_rot90",
                "run.precision=fp32", "run.device=cpu"]
    overrides = [a for s in settings for a in ("--set", s)]
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--master_port={_free_port()}", "-m", "vdm", "train", "--config", str(config_file),
           "--out", str(two), "--max-steps", str(steps), *overrides]
    res = subprocess.run(cmd, env=sub_env(), capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = apply_overrides(tiny, settings)
    one = train(cfg, tmp_path / "one", max_steps=steps)
    ckpt_two = two / "checkpoints" / f"step_{steps:08d}"
    assert json.loads((ckpt_two / "state.json").read_text())["images_seen"] == steps * cfg.run.batch_size
    assert_same(weights(ckpt_two), weights(Path(one["checkpoint"])), atol=1e-6)
    # and the processes did not just train on the same data: 1 process with half the batch differs
    half = train(apply_overrides(cfg, ["run.batch_size=4"]), tmp_path / "half", max_steps=steps)
    with pytest.raises(AssertionError):
        assert_same(weights(ckpt_two), weights(Path(half["checkpoint"])), atol=1e-6)


def test_bad_limits_are_refused(tiny, tmp_path):
    from vdm.cli import main
    assert main(["train", "--preset", "quick", "--out", str(tmp_path / "r"), "--max-steps", "-1"]) == 2
    assert main(["train", "--preset", "quick", "--out", str(tmp_path / "r"), "--max-minutes", "-5"]) == 2
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="max_steps"):
        apply_overrides(tiny, ["run.max_steps=-3"])
    with pytest.raises(ConfigError, match="batch_size"):
        apply_overrides(tiny, ["run.batch_size=0"])
