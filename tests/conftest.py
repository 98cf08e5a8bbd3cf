import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

# The official implementation's parameters and outputs (tests/fixtures/README.md); VDM_FIXTURES may point elsewhere.
FIXTURES = Path(os.environ.get("VDM_FIXTURES", Path(__file__).resolve().parent / "fixtures" / "official_vdm"))
CHECKPOINT_FIXTURES = FIXTURES.parent / "official_checkpoint"


def load_case(case: str):
    """(params, inputs, outputs, meta) of one official fixture case."""
    npz, meta = FIXTURES / f"{case}.npz", FIXTURES / f"{case}.json"
    d = np.load(npz)
    params = {k.removeprefix("param/"): d[k] for k in d.files if k.startswith("param/")}
    inputs = {k.removeprefix("input/"): d[k] for k in d.files if k.startswith("input/")}
    outputs = {k.removeprefix("output/"): d[k] for k in d.files if k.startswith("output/")}
    return params, inputs, outputs, json.loads(meta.read_text())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
