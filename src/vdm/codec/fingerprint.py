"""A fingerprint of a model: SHA-256 of its weights (safetensors bytes of the state dict) and its config."""

from __future__ import annotations

import hashlib
import json

from safetensors.torch import save


def model_fingerprint(model) -> bytes:
    """32-byte SHA-256 of the safetensors serialisation of `model.state_dict()` followed by its config JSON.

    Equal for the same weights and config however the model was loaded (file, checkpoint or run directory).
    """
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    h = hashlib.sha256(save(tensors))
    h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode("utf-8"))
    return h.digest()
