#!/usr/bin/env bash
# Every GPU check of the project in one bounded run (about 8 minutes on one H100/H200), for a machine that has
# torch with CUDA but no package registry. Each step has its own time limit and a failure does not stop the
# next; logs go to $OUT (default gpu_out/), one file per step, with the machine they ran on.
#
#   bash bench/gpu_session.sh                   # from the repository root
#   DEVICE=cpu BUDGET=0.2 bash bench/gpu_session.sh   # a dry run of the same steps on the CPU, limits ×0.2
#
# Packages the machine may lack (constriction, for the codec) are installed from wheels in .whl/ when that
# folder exists; fetch them beforehand where pip works, for that machine's Python, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .whl constriction==0.5.0
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-1}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
limit() { "$PY" -c "print(max(10, int($1 * $BUDGET)))"; }
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.txt, say how it ended
  local name=$1 secs; secs=$(limit "$2"); shift 2
  local start=$SECONDS
  timeout --kill-after=10 "$secs" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s (limit $secs s)" | tee -a "$OUT/summary.txt"
}

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile .whl/*.whl > "$OUT/install.txt" 2>&1 \
    || echo "install from .whl failed (see install.txt)" | tee -a "$OUT/summary.txt"
fi
{
  date -u; uname -a; nvidia-smi 2>&1 | head -15; nproc
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0); print(p.name, f'{p.total_memory / 2**30:.0f} GiB', 'cc', p.major, p.minor)"
} > "$OUT/machine.txt" 2>&1

# 1. The whole test suite; the tests that take a device run on $DEVICE (8 workers share the GPU).
XDIST=$("$PY" -c "import xdist; print('-n 8')" 2>/dev/null)
step tests 240 "$PY" -m pytest -q -p no:cacheprovider $XDIST -rs tests --device "$DEVICE"

# 2. Training and evaluation throughput of the CIFAR-10 network at batch 128, beside the matmul peak.
step throughput 150 "$PY" bench/throughput.py --device "$DEVICE" --networks cifar10 --passes train eval \
  --precisions bf16 fp32 --modes eager compile --batch 128 --iters 10 --warmup 3 --row-budget 30

# 3. Sampling throughput (ancestral, the CIFAR-10 network, bf16).
step sample 60 "$PY" bench/sample.py --device "$DEVICE" --network cifar10 --steps 50 --batch 256 \
  --precisions bf16 fp32

# 4. `vdm train --preset cifar10` end to end on synthetic 32×32 images (a folder dataset made here).
SYN=$(mktemp -d)
"$PY" - "$SYN" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
root, rng = Path(sys.argv[1]), np.random.default_rng(0)
for split, n in (("train", 1024), ("test", 256)):
    (root / split).mkdir(parents=True)
    for i in range(n):  # smooth random images: 4×4 colours upsampled
        img = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((32, 32), Image.BILINEAR)
        img.save(root / split / f"{i:05d}.png")
EOF
step train 120 "$PY" -m vdm train --preset cifar10 --out "$SYN/run" --set data.name=folder \
  --set "data.root=$SYN" --set "run.device=$DEVICE" --set data.test_images=256 --set run.eval_every=50 \
  --set run.checkpoint_every=50 --max-steps 100
cp "$SYN/run/metrics.jsonl" "$OUT/train_metrics.jsonl" 2>/dev/null
echo "done; logs in $OUT" | tee -a "$OUT/summary.txt"
