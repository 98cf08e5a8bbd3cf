"""Exponential moving average of the model's weights (what evaluation and shipped models use)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA:
    """θ_ema ← d·θ_ema + (1 − d)·θ after every optimiser step; buffers are copied.

    With `warmup`, the decay at step s is min(d, (1 + s)/(10 + s)), so short runs are not dominated by the
    initial weights. Holds float32 copies on the model's device.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.shadow: dict[str, Tensor] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def decay_at(self, step: int) -> float:
        """The decay used for the update after optimiser step `step` (0-based)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """θ_ema ← θ_ema + (1 − d)·(θ − θ_ema) for the floating-point parameters, in one `torch._foreach_lerp_`
        call per device and dtype; buffers (and non-float parameters) are copied."""
        d = self.decay_at(step)
        ema, new, copies = [], [], []
        params = dict(model.named_parameters())
        for k, v in model.state_dict().items():
            if k in params and v.is_floating_point():
                ema.append(self.shadow[k])
                new.append(v.detach())
            else:
                copies.append((self.shadow[k], v))
        if ema:
            torch._foreach_lerp_(ema, new, 1.0 - d)
        for dst, src in copies:
            dst.copy_(src)

    def state_dict(self) -> dict[str, Tensor]:
        return self.shadow

    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        missing, unexpected = set(self.shadow) - set(sd), set(sd) - set(self.shadow)
        if missing or unexpected:
            raise KeyError(f"EMA weights do not fit the model (missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]})")
        for k, v in sd.items():
            self.shadow[k].copy_(v)
