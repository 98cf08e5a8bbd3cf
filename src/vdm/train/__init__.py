"""Training: `train(config, out_dir, resume=False, max_steps=None, max_minutes=None)` (see `vdm.train.loop`)."""

from vdm.train.loop import NonFiniteLossError, TrainingError, train

__all__ = ["train", "TrainingError", "NonFiniteLossError"]
