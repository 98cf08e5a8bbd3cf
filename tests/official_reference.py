"""An independent NumPy (float64, NHWC, flax-layout) reference of the official VDM score network and schedules.

Written from the official model description (`docs/maths.md`, `tests/fixtures/README.md`), not from our PyTorch code:
it reads the flax parameter tree directly. The tests check it against the official fixtures, then use it to check
the converter on configurations the fixtures do not cover (depth, width, attention, the monotone network).
"""

from __future__ import annotations

import math

import numpy as np


def swish(x):
    return x / (1 + np.exp(-x))


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def group_norm(x, scale, bias, groups=32, eps=1e-6):
    B, H, W, C = x.shape
    g = x.reshape(B, H, W, groups, C // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(B, H, W, C) * scale + bias


def conv3x3(x, kernel, bias):
    B, H, W, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((B, H, W, kernel.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += xp[:, i:i + H, j:j + W, :] @ kernel[i, j]
    return out + bias


def gamma(p, config, t):
    """The official schedules: fixed, learnable_scalar (b + |w|t), learnable_nnet."""
    t = np.asarray(t, dtype=np.float64)
    kind = config["gamma_type"]
    if kind == "fixed":
        return config["gamma_min"] + (config["gamma_max"] - config["gamma_min"]) * t
    if kind == "learnable_scalar":
        return p["params/gamma/b"][0] + abs(p["params/gamma/w"][0]) * t
    tt = t.reshape(-1, 1)
    h = tt @ np.abs(p["params/gamma/l1/kernel"]) + p["params/gamma/l1/bias"]
    n = p["params/gamma/l2/kernel"].shape[1]
    h2 = (2 * (tt - 0.5)) @ np.abs(p["params/gamma/l2/kernel"]) + p["params/gamma/l2/bias"]
    h2 = 2 * (sigmoid(h2) - 0.5)
    h = h + (h2 @ np.abs(p["params/gamma/l3/kernel"])) / n
    return h[:, 0].reshape(t.shape)


def score_net(p, config, z, g_t):
    """ε̂ for z (B, H, W, C) float64 and γ_t (B,)."""
    P = {k.removeprefix("params/score_model/"): np.asarray(v, np.float64) for k, v in p.items()
         if k.startswith("params/score_model/")}
    n_embd = config["sm_n_embd"]
    t = (g_t - config["gamma_min"]) / (config["gamma_max"] - config["gamma_min"])
    half = n_embd // 2
    # the official code rounds 1000·t to float32 (`timesteps.astype(float32)`); its frequencies
    # (float32 arange times a float64 NumPy scalar) and sines are float64 when JAX runs in float64
    freqs = np.exp(np.arange(half, dtype=np.float32) * np.float64(-math.log(10000) / (half - 1)))
    arg = (t * 1000.0).astype(np.float32).astype(np.float64)[:, None] * freqs[None]
    temb = np.concatenate([np.sin(arg), np.cos(arg)], 1)
    cond = np.concatenate([temb, np.zeros((z.shape[0], 1))], 1)
    cond = swish(cond @ P["dense0/kernel"] + P["dense0/bias"])
    cond = swish(cond @ P["dense1/kernel"] + P["dense1/bias"])

    h = z
    if config.get("with_fourier_features", True):
        w = np.tile(2.0 ** np.arange(6, 8) * 2 * np.pi, z.shape[-1])
        zz = np.repeat(z, 2, axis=-1) * w
        h = np.concatenate([z, np.sin(zz), np.cos(zz)], -1)

    def block(name, x):
        hh = conv3x3(swish(group_norm(x, P[f"{name}/GroupNorm_0/scale"], P[f"{name}/GroupNorm_0/bias"])),
                     P[f"{name}/conv1/kernel"], P[f"{name}/conv1/bias"])
        hh = hh + (cond @ P[f"{name}/cond_proj/kernel"])[:, None, None, :]
        hh = swish(group_norm(hh, P[f"{name}/GroupNorm_1/scale"], P[f"{name}/GroupNorm_1/bias"]))
        hh = conv3x3(hh, P[f"{name}/conv2/kernel"], P[f"{name}/conv2/bias"])
        if f"{name}/nin_shortcut/kernel" in P:
            x = x @ P[f"{name}/nin_shortcut/kernel"] + P[f"{name}/nin_shortcut/bias"]
        return x + hh

    def attn(name, x):
        B, H, W, C = x.shape
        hh = group_norm(x, P[f"{name}/GroupNorm_0/scale"], P[f"{name}/GroupNorm_0/bias"]).reshape(B, H * W, C)
        q, k, v = (hh @ P[f"{name}/{n}/kernel"] + P[f"{name}/{n}/bias"] for n in "qkv")
        logits = q @ k.transpose(0, 2, 1) / math.sqrt(C)
        a = np.exp(logits - logits.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        out = (a @ v) @ P[f"{name}/proj_out/kernel"] + P[f"{name}/proj_out/bias"]
        return x + out.reshape(B, H, W, C)

    h = conv3x3(h, P["conv_in/kernel"], P["conv_in/bias"])
    hs = [h]
    for i in range(config["sm_n_layer"]):
        h = block(f"down.block_{i}", hs[-1])
        if config["with_attention"]:
            h = attn(f"down.attn_{i}", h)
        hs.append(h)
    h = block("mid.block_2", attn("mid.attn_1", block("mid.block_1", hs[-1])))
    for i in range(config["sm_n_layer"] + 1):
        h = block(f"up.block_{i}", np.concatenate([h, hs.pop()], -1))
        if config["with_attention"]:
            h = attn(f"up.attn_{i}", h)
    h = swish(group_norm(h, P["GroupNorm_0/scale"], P["GroupNorm_0/bias"]))
    return conv3x3(h, P["conv_out/kernel"], P["conv_out/bias"]) + z


def random_official_params(config, channels, rng):
    """A random parameter tree with the official flax names and shapes for `config` (Dense (in, out),
    Conv (kh, kw, in, out), GroupNorm scale/bias), for testing the converter beyond the fixtures."""
    C, L = config["sm_n_embd"], config["sm_n_layer"]
    p = {}

    def add(name, *shape, scale=0.1):
        p[name] = rng.normal(0, scale, size=shape).astype(np.float32)

    sm = "params/score_model"
    add(f"{sm}/dense0/kernel", C + 1, 4 * C); add(f"{sm}/dense0/bias", 4 * C)
    add(f"{sm}/dense1/kernel", 4 * C, 4 * C); add(f"{sm}/dense1/bias", 4 * C)
    cin = channels * (5 if config.get("with_fourier_features", True) else 1)
    add(f"{sm}/conv_in/kernel", 3, 3, cin, C); add(f"{sm}/conv_in/bias", C)

    def block(name, cin):
        add(f"{name}/GroupNorm_0/scale", cin); add(f"{name}/GroupNorm_0/bias", cin)
        add(f"{name}/conv1/kernel", 3, 3, cin, C); add(f"{name}/conv1/bias", C)
        add(f"{name}/cond_proj/kernel", 4 * C, C)
        add(f"{name}/GroupNorm_1/scale", C); add(f"{name}/GroupNorm_1/bias", C)
        add(f"{name}/conv2/kernel", 3, 3, C, C); add(f"{name}/conv2/bias", C)
        if cin != C:
            add(f"{name}/nin_shortcut/kernel", cin, C); add(f"{name}/nin_shortcut/bias", C)

    def attn(name):
        add(f"{name}/GroupNorm_0/scale", C); add(f"{name}/GroupNorm_0/bias", C)
        for n in ("q", "k", "v", "proj_out"):
            add(f"{name}/{n}/kernel", C, C); add(f"{name}/{n}/bias", C)

    for i in range(L):
        block(f"{sm}/down.block_{i}", C)
        if config["with_attention"]:
            attn(f"{sm}/down.attn_{i}")
    block(f"{sm}/mid.block_1", C); attn(f"{sm}/mid.attn_1"); block(f"{sm}/mid.block_2", C)
    for i in range(L + 1):
        block(f"{sm}/up.block_{i}", 2 * C)
        if config["with_attention"]:
            attn(f"{sm}/up.attn_{i}")
    add(f"{sm}/GroupNorm_0/scale", C); add(f"{sm}/GroupNorm_0/bias", C)
    add(f"{sm}/conv_out/kernel", 3, 3, C, channels); add(f"{sm}/conv_out/bias", channels)

    if config["gamma_type"] == "learnable_scalar":
        p["params/gamma/w"] = np.array([config["gamma_max"] - config["gamma_min"] + 0.7], np.float32)
        p["params/gamma/b"] = np.array([config["gamma_min"] - 0.3], np.float32)
    elif config["gamma_type"] == "learnable_nnet":
        n = 1024
        p["params/gamma/l1/kernel"] = np.array([[-(config["gamma_max"] - config["gamma_min"])]], np.float32)
        p["params/gamma/l1/bias"] = np.array([config["gamma_min"]], np.float32)
        p["params/gamma/l2/kernel"] = rng.normal(size=(1, n)).astype(np.float32) * 3
        p["params/gamma/l2/bias"] = rng.normal(size=(n,)).astype(np.float32)
        p["params/gamma/l3/kernel"] = rng.normal(size=(n, 1)).astype(np.float32) * 5
    return p
