"""Augmentation with conditioning: the official `cifar10_aug` pipelines, applied to a batch on its device.

The network is told whether an image was augmented (the scalar conditioning input of the score network), so
the augmented images widen the training set without changing the model of un-augmented images: evaluation,
sampling and compression condition on 0. Per image, as in the official `dataset.py`:
  1. a left-right flip with probability ½;
  2. with probability ½ a rotation by k·90°, k uniform in {1, 2, 3} (counter-clockwise, as tf.image.rot90);
  3. (`flip_rot90_channels` only) with probability ½ a uniformly random permutation of the colour channels;
conditioning 1 if any step was applied, else 0. The paper's CIFAR-10 result with augmentation (2.49 bpd) uses
`flip_rot90`.
"""

from __future__ import annotations

import torch
from torch import Tensor

AUGMENTATIONS = ("none", "flip_rot90", "flip_rot90_channels")


def check_augmentation(kind: str) -> None:
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; expected one of {', '.join(AUGMENTATIONS)}")


def augment(x: Tensor, kind: str, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(augmented x, conditioning (B,) float32 of 0/1) for integer images x (B, C, H, W) with H = W.

    Every random draw comes from `generator` (on x's device) in a fixed order, so a seeded generator gives
    the same batch whatever else has used the global random state."""
    check_augmentation(kind)
    B, C, H, W = x.shape
    if kind == "none":
        return x, torch.zeros(B, device=x.device)
    if H != W:
        raise ValueError(f"rotations by 90° need square images, got {H}×{W}")
    dev = x.device
    flip = torch.rand(B, generator=generator, device=dev) < 0.5
    k = torch.ceil(3 * torch.rand(B, generator=generator, device=dev)).long().clamp(1, 3)
    rotate = torch.rand(B, generator=generator, device=dev) < 0.5
    out = torch.where(flip[:, None, None, None], x.flip(-1), x)
    rotated = out.clone()
    for quarter in (1, 2, 3):
        sel = rotate & (k == quarter)
        rotated[sel] = torch.rot90(out[sel], quarter, dims=(-2, -1))
    out = rotated
    applied = flip | rotate
    if kind == "flip_rot90_channels":
        perm = torch.argsort(torch.rand(B, C, generator=generator, device=dev), dim=1)  # uniform permutations
        permute = torch.rand(B, generator=generator, device=dev) < 0.5
        shuffled = torch.gather(out, 1, perm[:, :, None, None].expand(B, C, H, W))
        out = torch.where(permute[:, None, None, None], shuffled, out)
        applied = applied | permute
    return out, applied.float()
