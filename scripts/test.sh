#!/usr/bin/env bash
# The test suite from a fresh shell: creates .venv if needed, installs the pinned CPU build and the package with
# its test extras, then runs pytest. Extra arguments go to pytest (e.g. `bash scripts/test.sh -k convert`).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q -c constraints.txt -e '.[test,bench,plot]'
exec .venv/bin/python -m pytest -q tests "$@"
