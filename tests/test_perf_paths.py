"""The fast paths compute the same thing as the plain ones: channels-last memory format, bfloat16 autocast,
torch.compile (whole loss traced without graph breaks, variance minimisation included), one network evaluation
per loss call. Correctness only; speed is measured by bench/throughput.py and bench/sample.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vdm import VDM


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these tiny networks gain nothing from more, and on a machine shared with other jobs
    every parallel region would wait for all its threads to be scheduled."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**kw) -> VDM:
    """A small VDM whose zero-initialised layers get small random weights, so that ε̂ is not just z."""
    torch.manual_seed(0)
    model = VDM(**{**dict(n_embd=32, n_layer=2, image_size=16, dropout=0.0), **kw})
    with torch.no_grad():
        for p in model.score_model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.05)
    return model


def batch(b: int = 4, size: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def fixed_noise(x: torch.Tensor) -> dict:
    g = torch.Generator().manual_seed(2)
    return dict(t=torch.rand(x.shape[0], generator=g), eps=torch.randn(x.shape, generator=g),
                eps_0=torch.randn(x.shape, generator=g))


def on(device, noise: dict) -> dict:
    return {k: v.to(device) for k, v in noise.items()}


def total(out: dict) -> torch.Tensor:
    return (out["prior"] + out["recon"] + out["diff"]).mean()


def test_channels_last_matches_contiguous():
    """Same network output and same gradients in channels-last memory format (float64, so differences are
    only from summation order)."""
    x = batch()
    a = tiny().double()
    b = tiny().double().to(memory_format=torch.channels_last)
    assert b.score_model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    noise = {k: v.double() for k, v in fixed_noise(x).items()}
    la, lb = total(a.loss(x, **noise)), total(b.loss(x, **noise))
    torch.testing.assert_close(lb, la, rtol=1e-12, atol=0)
    la.backward()
    lb.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_bf16_autocast_keeps_the_vlb_terms_in_fp32(device):
    """Under bfloat16 autocast the network runs in bf16, but the prior and reconstruction terms (and γ) stay
    float32 and are bit-identical; the diffusion term and bpd move by less than 0.1 % (relative)."""
    model = tiny().eval().to(device)
    x = batch(8)
    noise = on(device, fixed_noise(x))
    x = x.to(device)
    with torch.no_grad():
        ref = model.loss(x, **noise)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            low = model.loss(x, **noise)
    for k in ("prior", "recon", "diff", "bpd"):
        assert low[k].dtype == torch.float32, k
    torch.testing.assert_close(low["prior"], ref["prior"], rtol=0, atol=0)
    torch.testing.assert_close(low["recon"], ref["recon"], rtol=0, atol=0)
    rel = ((low["diff"] - ref["diff"]).abs() / ref["diff"]).max()
    assert 0 < rel < 1e-3  # bf16 does change ε̂ (so the test can fail), but only slightly
    assert (low["bpd"] - ref["bpd"]).abs().max() < 1e-3 * ref["bpd"].mean()


def test_bf16_autocast_training_step_gives_finite_fp32_gradients(device):
    model = tiny(dropout=0.1).to(device)
    x = batch().to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = total(model.loss(x, generator=torch.Generator(device).manual_seed(0)))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def test_one_network_evaluation_per_loss():
    """γ'(t) is analytic: the continuous-time loss evaluates the network once, forward and backward."""
    model = tiny(gamma_type="learned_nnet")
    calls = []
    model.score_model.register_forward_hook(lambda *a: calls.append(1))
    total(model.loss(batch())).backward()
    assert len(calls) == 1


def _compile_fullgraph_loss(model: VDM):
    """The loss as one graph: `fullgraph=True` raises on any graph break (e.g. a host synchronisation such as
    int(tensor), or a hook dynamo cannot trace). The "eager" backend checks tracing only; no C++ compiler."""
    return torch.compile(lambda x, n: total(model.loss(x, **n)), backend="eager", fullgraph=True)


@pytest.mark.parametrize("kw", [dict(), dict(gamma_type="learned_nnet", variance_minimisation=True),
                                dict(timesteps=10)], ids=["continuous", "variance-min", "discrete"])
def test_loss_traces_without_graph_breaks_and_same_gradients(kw, device):
    """On a GPU this also checks that the loss makes no host synchronisation (one would break the graph)."""
    torch._dynamo.reset()
    model = tiny(**kw).to(device)
    x = batch()
    noise = on(device, fixed_noise(x))
    x = x.to(device)
    ref = total(model.loss(x, **noise))
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = _compile_fullgraph_loss(model)(x, noise)
    got.backward()
    torch.testing.assert_close(got, ref)
    for (name, p), g in zip(model.named_parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, msg=name)
    if kw.get("variance_minimisation"):  # the hook did act: the shape gradient is not the VLB gradient
        model.config.variance_minimisation = False
        model.zero_grad()
        total(model.loss(x, **noise)).backward()
        assert not torch.allclose(model.gamma.l2_weight.grad, ref_grads[[n for n, _ in model.named_parameters()]
                                                                       .index("gamma.l2_weight")])


def test_sample_step_traces_without_graph_breaks():
    torch._dynamo.reset()
    model = tiny().eval()
    z, noise = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    step = torch.compile(model.sample_step, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(step(z, 3, 10, noise), model.sample_step(z, 3, 10, noise))


_INDUCTOR_CHECK = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_perf_paths import batch, fixed_noise, on, tiny, total
torch.set_num_threads(1)
device = torch.device({device!r})
model = tiny(n_layer=1).to(device)
x = batch(2)
noise = on(device, fixed_noise(x))
x = x.to(device)
ref = total(model.loss(x, **noise))
ref.backward()
ref_grads = [p.grad.clone() for p in model.parameters()]
model.zero_grad()
model.score_model.compile()
got = total(model.loss(x, **noise))
got.backward()
torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
# all gradients as one vector: some are zero up to roundoff (a bias followed by GroupNorm), so compare norms
g_ref = torch.cat([g.flatten() for g in ref_grads])
g_got = torch.cat([p.grad.flatten() for p in model.parameters()])
rel = float((g_got - g_ref).norm() / g_ref.norm())
assert rel < 1e-4, rel
print("ok")
"""


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None,
                    reason="torch.compile's inductor backend needs a C++ compiler on CPU")
def test_inductor_compiled_network_matches_eager(device):
    """The score network compiled with inductor (as `vdm train` with compile on, and bench/throughput.py
    --modes compile, do) gives the loss and gradients of eager mode on the device under test. Runs in a
    subprocess so that it can be abandoned (skipped) when compilation takes too long (over 45 s on a CPU, as on
    a busy 2-core machine; 180 s with Triton on a GPU)."""
    code = _INDUCTOR_CHECK.format(tests=str(Path(__file__).resolve().parent), device=str(device))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    limit = 45 if device.type == "cpu" else 180
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=limit, env=env)
    except subprocess.TimeoutExpired:
        pytest.skip(f"inductor compilation of a tiny network took over {limit} s on this machine (busy?)")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
