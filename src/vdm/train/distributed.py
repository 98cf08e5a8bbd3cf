"""Multi-process training from torchrun's environment; one process when it is absent.

Nothing happens at import time. `setup()` reads RANK / WORLD_SIZE / LOCAL_RANK (set by `torchrun`), starts the
process group when WORLD_SIZE > 1 (gloo on the CPU, nccl on CUDA) and picks the device; `teardown()` ends it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """Where this process stands: its rank among `world_size` processes and its torch device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on the process that writes checkpoints, logs and progress bars (rank 0)."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment, (0, 1, 0) without it."""
    def get(name: str, default: int) -> int:
        value = os.environ.get(name)
        try:
            return int(value) if value is not None else default
        except ValueError:
            raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None
    return get("RANK", 0), get("WORLD_SIZE", 1), get("LOCAL_RANK", 0)


def pick_device(request: str, local_rank: int) -> torch.device:
    """"auto" → cuda:LOCAL_RANK when CUDA is available, else cpu; anything else is taken as a torch device."""
    if request == "auto":
        request = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(request)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {request!r} asked for but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def setup(device_request: str = "auto") -> Dist:
    """Start the process group if torchrun launched several processes; return this process's `Dist`."""
    rank, world, local = env_ranks()
    device = pick_device(device_request, local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local, device)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_mean(d: Dist, x: torch.Tensor) -> torch.Tensor:
    """The mean of `x` over processes (x itself with one process)."""
    if not d.enabled:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / d.world_size


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def broadcast_flag(d: Dist, flag: bool) -> bool:
    """Rank 0's `flag` on every process (e.g. "the time budget is spent")."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.broadcast(t, 0)
    return bool(t.item())
