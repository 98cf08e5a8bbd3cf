"""Which floating-point precision to compute in, chosen from the hardware.

`"auto"` (the default of `vdm train`, `vdm eval`, `vdm sample` and the benchmarks) uses bfloat16 autocast only
where bf16 arithmetic is native: a CPU with AVX-512 BF16 or AMX-BF16 (x86) or the BF16 extension (Arm), or a
CUDA GPU of compute capability ≥ 8.0 (Ampere and later); float32 everywhere else. Where bf16 is not native,
PyTorch emulates it in software (on an AVX2-only CPU a bf16 step is several times slower than fp32), so an
explicit `"bf16"` there still works but warns (`EmulatedBF16Warning`). Parameters, optimiser state and the
VLB's γ, prior and reconstruction terms stay float32 under autocast.

`choose_precision` is a pure function of the requested precision and the hardware's description (CPU flags,
CUDA capability); `resolve_precision` reads the hardware and warns; `autocast` gives the matching context.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass

import torch

from vdm.choices import PRECISIONS

# CPU feature flags (Linux /proc/cpuinfo names) that make bf16 matrix arithmetic native
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX-512 BF16, x86 AMX, Arm BF16
MIN_CUDA_CAPABILITY = (8, 0)


class EmulatedBF16Warning(UserWarning):
    """bf16 was asked for on hardware that only emulates it (slower than fp32)."""


@dataclass(frozen=True)
class Choice:
    """The precision to compute in and why."""

    precision: str  # "bf16" or "fp32"
    reason: str  # one line for logs, e.g. "auto: CPU without native bf16 (AVX2)"
    emulated: bool = False  # True when bf16 was asked for explicitly but is emulated in software


def choose_precision(requested: str, device_type: str, *, cpu_flags: frozenset[str] | set[str] = frozenset(),
                     cuda_capability: tuple[int, int] | None = None, cpu_name: str = "") -> Choice:
    """The precision for `requested` ("auto", "bf16" or "fp32") on a device of type `device_type` ("cpu",
    "cuda", ...), given the CPU's feature flags and the GPU's compute capability. Pure: reads no hardware."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if device_type == "cpu":
        native = bool(NATIVE_BF16_CPU_FLAGS & set(cpu_flags))
        where = f"CPU {'with' if native else 'without'} native bf16" + (f" ({cpu_name})" if cpu_name else "")
    elif device_type == "cuda":
        native = cuda_capability is not None and tuple(cuda_capability) >= MIN_CUDA_CAPABILITY
        cap = "unknown" if cuda_capability is None else f"{cuda_capability[0]}.{cuda_capability[1]}"
        where = f"CUDA compute capability {cap}"
    else:
        native, where = False, f"{device_type} (bf16 support not known)"
    if requested == "fp32":
        return Choice("fp32", "fp32 as asked")
    if requested == "bf16":
        emulated = device_type in ("cpu", "cuda") and not native
        return Choice("bf16", f"bf16 as asked; {where}", emulated=emulated)
    return Choice("bf16" if native else "fp32", f"auto: {where}")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags: /proc/cpuinfo's `flags` (x86) or `Features` (Arm) line, else what torch
    reports (AVX-512 BF16, AMX)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    flags.update(value.split())
                    break
    except OSError:
        pass
    cpu = getattr(torch, "cpu", None)
    for flag, probe in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_bf16", "_is_amx_tile_supported")):
        try:
            if getattr(cpu, probe)():
                flags.add(flag)
        except (AttributeError, RuntimeError):
            pass
    return frozenset(flags)


def cpu_summary() -> str:
    """A short description of the CPU's vector features, e.g. "AVX2 FMA" or "AVX-512 AVX512_BF16 AMX"."""
    f = cpu_flags()
    names = [("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512_BF16"),
             ("amx_bf16", "AMX-BF16"), ("asimd", "NEON"), ("bf16", "BF16")]
    return " ".join(n for k, n in names if k in f) or "no vector extensions reported"


def _cuda_capability(device: torch.device) -> tuple[int, int] | None:
    try:
        return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]
    except (RuntimeError, AssertionError, AttributeError):
        return None


def resolve_precision(requested: str, device: torch.device | str, *, warn: bool = True) -> Choice:
    """`choose_precision` for this machine's `device`; warns (EmulatedBF16Warning) when bf16 is asked for
    where it would be emulated."""
    device = torch.device(device)
    choice = choose_precision(requested, device.type, cpu_flags=cpu_flags() if device.type == "cpu" else frozenset(),
                              cuda_capability=_cuda_capability(device) if device.type == "cuda" else None,
                              cpu_name=cpu_summary() if device.type == "cpu" else "")
    if warn and choice.emulated:
        warnings.warn(f"bf16 autocast on {device.type} without native bf16 arithmetic is emulated in software "
                      f"and slower than fp32 ({choice.reason}); use precision 'auto' or 'fp32'",
                      EmulatedBF16Warning, stacklevel=2)
    return choice


CONV_ALGORITHMS = ("auto", "winograd", "direct")


def choose_conv_algorithm(requested: str, device_type: str, precision: str, *,
                          cpu_flags: frozenset[str] | set[str] = frozenset(), nnpack: bool = True,
                          threads: int = 1) -> str:
    """"winograd" or "direct" for the 3×3 convolutions of a training step (see `vdm.nets.winograd`). "auto"
    takes Winograd (NNPACK) for fp32 on one thread of a CPU with AVX2 but no AVX-512 — there it beats oneDNN's
    direct convolution (0.55 against 0.42 images/s for the CIFAR-10 step on a quiet AVX2 core) — and direct
    convolution everywhere else, including several threads (on 2 AVX2 cores: 0.72 against 0.81 images/s,
    NNPACK scaling worse than oneDNN; bench/README.md). Pure: reads no hardware."""
    if requested not in CONV_ALGORITHMS:
        raise ValueError(f"conv algorithm must be one of {', '.join(CONV_ALGORITHMS)}, got {requested!r}")
    eligible = device_type == "cpu" and precision == "fp32" and nnpack
    if requested == "auto":
        flags = set(cpu_flags)
        avx2_only = "avx2" in flags and "avx512f" not in flags
        return "winograd" if eligible and avx2_only and threads == 1 else "direct"
    return "winograd" if requested == "winograd" and eligible else "direct"


def resolve_conv_algorithm(requested: str, device: torch.device | str, precision: str) -> str:
    """`choose_conv_algorithm` for this machine's `device` and torch's current CPU thread count."""
    from vdm.nets import winograd

    device = torch.device(device)
    return choose_conv_algorithm(requested, device.type, precision, nnpack=winograd.available(),
                                 cpu_flags=cpu_flags() if device.type == "cpu" else frozenset(),
                                 threads=torch.get_num_threads())


def autocast(precision: str, device: torch.device | str):
    """torch.autocast with bfloat16 for precision "bf16"; a null context for "fp32"."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"resolve the precision first ('bf16' or 'fp32'), got {precision!r}")
