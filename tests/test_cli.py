"""The `vdm` front door: help without torch, the version, the exit-code convention."""

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def test_help_builds_every_subcommand_without_importing_torch():
    code = "import vdm.cli, sys; vdm.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(SRC), "PATH": ""}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_version_and_usage_errors():
    from vdm import __version__
    from vdm.cli import main

    out = subprocess.run([sys.executable, "-m", "vdm", "--version"], capture_output=True, text=True,
                         env={"PYTHONPATH": str(SRC), "PATH": ""}, timeout=60)
    assert out.stdout.strip() == f"vdm {__version__}"
    assert main([]) == 2  # no subcommand: help, exit code 2
