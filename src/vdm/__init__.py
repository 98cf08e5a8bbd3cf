"""Variational Diffusion Models (Kingma, Salimans, Poole & Ho, 2021) in PyTorch."""

from vdm.model import VDM, VDMConfig

__all__ = ["VDM", "VDMConfig"]
__version__ = "0.1.0"
