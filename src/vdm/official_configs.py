"""The official implementation's model configurations (google-research/vdm `configs/*.py`, `config.model`).

`official_config(name_or_path)` gives the official `config.model` fields and the image size of a named
configuration, or reads them from a JSON file (the fields at the top level or under "config").
"""

from __future__ import annotations

import json
from pathlib import Path

_COMMON = dict(vocab_size=256, sample_softmax=False, antithetic_time_sampling=True, with_fourier_features=True,
               gamma_min=-13.3, gamma_max=5.0, sm_n_timesteps=0)

# name: (config.model fields, image size); every official model is RGB
OFFICIAL_CONFIGS: dict[str, tuple[dict, int]] = {
    "cifar10": (dict(_COMMON, with_attention=False, gamma_type="learnable_scalar", sm_n_embd=128, sm_n_layer=32,
                     sm_pdrop=0.1), 32),
    "cifar10_aug": (dict(_COMMON, with_attention=False, gamma_type="learnable_nnet", sm_n_embd=256, sm_n_layer=32,
                         sm_pdrop=0.05), 32),
    "cifar10_aug_paper": (dict(_COMMON, with_attention=True, gamma_type="learnable_nnet", sm_n_embd=256,
                               sm_n_layer=32, sm_pdrop=0.05), 32),
    "imagenet32": (dict(_COMMON, with_attention=False, gamma_type="learnable_scalar", sm_n_embd=256,
                        sm_n_layer=32, sm_pdrop=0.1), 32),
    "imagenet64": (dict(_COMMON, with_attention=False, gamma_type="learnable_scalar", sm_n_embd=256,
                        sm_n_layer=64, sm_pdrop=0.1), 64),
}
REQUIRED = ("gamma_type", "gamma_min", "gamma_max", "sm_n_embd", "sm_n_layer")


class OfficialConfigError(ValueError):
    """An unknown configuration name or an unusable configuration file; the message says which."""


def official_config(name_or_path: str) -> tuple[dict, int | None]:
    """(official `config.model` fields, image size or None) for a configuration name or a JSON file.

    A JSON file may hold the fields at the top level or under "config" (as the official fixtures do); its
    image size is read from "image_size" or "height" when present."""
    if name_or_path in OFFICIAL_CONFIGS:
        fields, size = OFFICIAL_CONFIGS[name_or_path]
        return dict(fields), size
    path = Path(name_or_path)
    if not path.suffix == ".json" and not path.is_file():
        raise OfficialConfigError(f"unknown official configuration {name_or_path!r}; expected one of "
                                  f"{', '.join(OFFICIAL_CONFIGS)} or a JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise OfficialConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OfficialConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise OfficialConfigError(f"{path}: expected a JSON object with the official config.model fields")
    fields = data.get("config", data)
    if isinstance(fields, dict) and isinstance(fields.get("model"), dict):
        fields = fields["model"]  # a whole official config dump: {"model": {...}, "data": ..., ...}
    if not isinstance(fields, dict):
        raise OfficialConfigError(f"{path}: \"config\" must be an object of official config.model fields")
    missing = [k for k in REQUIRED if k not in fields]
    if missing:
        raise OfficialConfigError(f"{path}: missing official config.model field(s) {', '.join(missing)}")
    size = data.get("image_size", data.get("height", fields.get("image_size")))
    if size is not None and not (isinstance(size, int) and size > 0):
        raise OfficialConfigError(f"{path}: image size must be a positive integer, got {size!r}")
    return {k: v for k, v in fields.items() if k != "image_size"}, size
