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


# --- the device of the tests that take one ---------------------------------------------------------------
def pytest_addoption(parser):
    parser.addoption("--device", default=os.environ.get("VDM_TEST_DEVICE", "cpu"),
                     help="torch device for the tests that take the `device` fixture, e.g. cuda (default: cpu, "
                          "or $VDM_TEST_DEVICE); every other test runs on the CPU")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device under test (`pytest --device cuda`): the model, sampling, training, compile and codec paths
    that run on an accelerator take it; on the default CPU they check the same code paths there."""
    d = torch.device(request.config.getoption("--device"))
    if d.type == "cuda" and not torch.cuda.is_available():
        pytest.exit(f"--device {d}: torch {torch.__version__} sees no CUDA device", returncode=4)
    if d.type not in ("cpu", "cuda"):
        pytest.exit(f"--device {d}: the tests know cpu and cuda only", returncode=4)
    return d
