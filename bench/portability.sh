#!/usr/bin/env bash
# Cross-environment round trips of `.vdmc` files: encode with one Python (one torch version, this machine's best
# kernels, 2 threads), decode with another (another torch version, and again with generic kernels: torch's
# default CPU capability, oneDNN limited to SSE4.1, numpy without AVX2/FMA, 1 thread), both ways, and compare
# the pixels. The image is a 64×64 crop of a held-out test photo (never seen in training).
#
#   bash bench/portability.sh PYTHON_A PYTHON_B [STEPS]
#   e.g. bash bench/portability.sh .venv/bin/python /path/to/venv-torch-2.14/bin/python 20
#
# Both Pythons need this package installed (pip install -e .). Prints one line per round trip and whether the
# two encoders wrote the same bytes; exits 1 on any difference.
set -euo pipefail
A=$1; B=$2; STEPS=${3:-20}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
"$A" - "$work/crop.npy" <<'PY'
import sys, numpy as np
from vdm.data import embedded_photos
img = embedded_photos("test")["coffee"]
np.save(sys.argv[1], np.ascontiguousarray(img[200:264, 300:364]))
PY
generic=(env ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 OMP_NUM_THREADS=1 NPY_DISABLE_CPU_FEATURES="AVX2 FMA3")
version() { "$1" -c 'import torch, numpy; print(f"torch {torch.__version__}, numpy {numpy.__version__}")'; }
status=0
for pair in "A B" "B A"; do
  set -- $pair; enc=${!1}; dec=${!2}
  "$enc" -m vdm compress "$work/crop.npy" -o "$work/crop_$1.vdmc" --steps "$STEPS" --threads 2 -q
  for mode in native generic; do
    out="$work/out_$1_$2_$mode"
    if [ "$mode" = native ]; then "$dec" -m vdm decompress "$work/crop_$1.vdmc" -o "$out" --threads 1 -q
    else "${generic[@]}" "$dec" -m vdm decompress "$work/crop_$1.vdmc" -o "$out" --threads 1 -q; fi
    same=$("$A" -c "import numpy as np, sys; print(np.array_equal(np.load(sys.argv[1]), np.load(sys.argv[2])))" \
           "$work/crop.npy" "$out/crop.npy")
    echo "encoded with $(version "$enc") (2 threads) → decoded with $(version "$dec") ($mode kernels, 1 thread): exact = $same; $(stat -c %s "$work/crop_$1.vdmc") bytes"
    [ "$same" = True ] || status=1
  done
done
if cmp -s "$work/crop_A.vdmc" "$work/crop_B.vdmc"; then echo "the two encoders wrote byte-identical files"
else echo "the two encoders wrote different files"; status=1; fi
exit $status
