import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURES = Path(os.environ.get("VDM_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official_vdm"))


def load_case(case: str):
    """(params, inputs, outputs, meta) of one official fixture case; skips (or fails in CI) when absent."""
    npz, meta = FIXTURES / f"{case}.npz", FIXTURES / f"{case}.json"
    if not npz.exists():
        msg = f"official fixtures not found at {FIXTURES} (set VDM_FIXTURES to their folder)"
        if os.environ.get("VDM_REQUIRE_FIXTURES"):
            pytest.fail(msg + "; VDM_REQUIRE_FIXTURES is set, so this is a failure")
        pytest.skip(msg)
    d = np.load(npz)
    params = {k.removeprefix("param/"): d[k] for k in d.files if k.startswith("param/")}
    inputs = {k.removeprefix("input/"): d[k] for k in d.files if k.startswith("input/")}
    outputs = {k.removeprefix("output/"): d[k] for k in d.files if k.startswith("output/")}
    return params, inputs, outputs, json.loads(meta.read_text())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
