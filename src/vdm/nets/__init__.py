"""Neural networks (they know nothing of the diffusion mathematics)."""

from vdm.nets.unet import ScoreUNet

__all__ = ["ScoreUNet"]
