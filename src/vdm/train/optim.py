"""AdamW with weight decay on weight matrices and kernels only; the learning rate: warm-up, optional cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn

from vdm.config import OptimConfig


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW parameter groups: weights with ≥ 2 dimensions get `weight_decay`; biases, norm scales and
    the noise schedule γ (`gamma.*`) get none."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and not name.startswith("gamma.") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `decay_groups`; the fused implementation (one kernel for all parameters: 37 ms against 107–154
    ms per step for the CIFAR-10 network on one AVX2 core) where the parameters' device has one."""
    groups = decay_groups(model, cfg.weight_decay)
    kw = dict(lr=lr_at(cfg, 0), betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, ValueError):  # a device without a fused AdamW
        return torch.optim.AdamW(decay_groups(model, cfg.weight_decay), **kw)


def lr_at(cfg: OptimConfig, step: int) -> float:
    """Learning rate of optimiser step `step` (0-based): lr·(step + 1)/warmup_steps during warm-up, then lr, or
    with `decay_steps` = D > 0, lr·½(1 + cos(π·(step − warmup_steps)/(D − warmup_steps))) until D and 0 after it."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay_steps:
        done = min(1.0, (step - cfg.warmup_steps) / (cfg.decay_steps - cfg.warmup_steps))
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * done))
    return cfg.lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
