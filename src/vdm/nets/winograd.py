"""3×3 convolutions by Winograd's minimal filtering (NNPACK), for fp32 training on CPUs without AVX-512.

A 3×3, stride-1, padding-1 convolution computed directly costs 2·9·C_in·C_out FLOPs per pixel; NNPACK's
Winograd transform (bundled with PyTorch's x86-64 and Arm CPU builds) needs about 2.25× fewer
multiplications. On an AVX2 CPU its forward pass runs about 1.4× faster than oneDNN's direct convolution.
The input gradient of such a convolution is itself one (the kernel flipped, in and out channels swapped), so it
goes through NNPACK too; the weight gradient stays with `aten.convolution_backward` (oneDNN).

Winograd rounds differently from a direct convolution (relative differences ~1e-5 in fp32), so it is used only
where asked: `use_winograd(True)` around a training step. Float64, bf16 autocast, CUDA and anything that
is not a 3×3/stride-1/padding-1 convolution always take the direct path.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import Tensor

_state = threading.local()


def available() -> bool:
    """Whether this PyTorch build ships NNPACK and it works on this CPU."""
    try:
        return bool(torch._nnpack_available())
    except (AttributeError, RuntimeError):
        return False


@contextlib.contextmanager
def use_winograd(enabled: bool = True):
    """Within the block, eligible 3×3 convolutions of `conv3x3` run through NNPACK's Winograd transform."""
    previous = getattr(_state, "enabled", False)
    _state.enabled = bool(enabled) and available()
    try:
        yield
    finally:
        _state.enabled = previous


def enabled() -> bool:
    return getattr(_state, "enabled", False)


class _WinogradConv3x3(torch.autograd.Function):
    """y = conv3x3(x, w) + b (padding 1) with NNPACK forward and input gradient; oneDNN weight gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch._nnpack_spatial_convolution(x.contiguous(), weight.contiguous(), bias, [1, 1])

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # ∂L/∂x = conv(∂L/∂y, w rotated by 180°, in/out channels swapped), padding 1
            w_t = weight.flip(2, 3).transpose(0, 1).contiguous()
            grad_x = torch._nnpack_spatial_convolution(grad_y, w_t, None, [1, 1])
        need_w, need_b = ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        if need_w or need_b:
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad_y, x, weight, [weight.shape[0]] if ctx.has_bias else None, [1, 1], [1, 1], [1, 1], False,
                [0, 0], 1, [False, need_w, need_b])
        return grad_x, grad_w, grad_b


MIN_CHANNELS = 32  # narrower layers (the network's input and output convolutions) stay direct


def conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A 3×3, stride-1, padding-1 convolution: Winograd (NNPACK) inside `use_winograd()` for fp32 CPU
    tensors with ≥ MIN_CHANNELS input and output channels, outside autocast and compilation; else `F.conv2d`."""
    if (enabled() and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and min(weight.shape[0], weight.shape[1]) >= MIN_CHANNELS and x.dim() == 4
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
        return _WinogradConv3x3.apply(x, weight, bias)
    return F.conv2d(x, weight, bias, padding=1)
