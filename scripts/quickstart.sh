#!/usr/bin/env bash
# Set everything up and run the main job on the embedded photos: install, train a small model for a few
# minutes, evaluate its test bits per dimension, and draw a grid of samples. Output goes to runs/quick/.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d .venv ]; then python3 -m venv .venv; fi
. .venv/bin/activate
pip install -q -c constraints.txt -e '.[test,bench,plot]'
RUN=${RUN:-runs/quick}
if [ -e "$RUN" ]; then  # never train over, or overwrite the samples of, an earlier run
  echo "quickstart: $RUN exists: remove it, or run RUN=runs/another bash scripts/quickstart.sh" >&2
  exit 2
fi
vdm train --preset quick --out "$RUN" --max-minutes "${MINUTES:-5}"
vdm eval "$RUN"
vdm sample "$RUN" -n 16 --sampler dpmpp-2m --steps 20 --seed 0 --out "$RUN/samples.png"
echo "model, metrics and samples are in $RUN/"
