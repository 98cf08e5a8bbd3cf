"""Peak memory and time of `vdm convert` on an official-size checkpoint.

Writes a checkpoint in the official file format (flax MessagePack: step, params, ema_params and the two Adam
moments) with random float32 arrays of the official CIFAR-10 model's shapes (read from the official
initialisation statistics, `official_vdm/init_stats.json`), then runs `vdm convert` on it in a fresh process
and reports that process's peak resident memory against a process that only imports vdm and builds the same
model. The difference is what conversion holds beyond the model itself; one parameter tree is the floor.

    python bench/convert_memory.py [--stats tests/fixtures/official_vdm/init_stats.json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np

from vdm.testing import nest, pack_array

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STATS = ROOT / "tests" / "fixtures" / "official_vdm" / "init_stats.json"


def write_checkpoint(path: Path, shapes: dict[str, list[int]], seed: int = 0) -> int:
    rng = np.random.default_rng(seed)

    def tree():
        return nest({k: rng.standard_normal(s, dtype=np.float32) * 0.02 for k, s in shapes.items()})

    with open(path, "wb") as fh:  # one tree at a time, as a map of four entries
        packer = msgpack.Packer(default=pack_array, use_bin_type=True)
        fh.write(packer.pack_map_header(4))
        fh.write(packer.pack("step") + packer.pack(10_000_000))
        for key in ("params", "ema_params"):
            fh.write(packer.pack(key) + packer.pack(tree()))
        fh.write(packer.pack("opt_state") + packer.pack({"0": {"count": np.array(1, np.int32), "mu": tree(),
                                                              "nu": tree()}, "1": {}, "2": {}}))
    return sum(int(np.prod(s)) * 4 for s in shapes.values())


def child_peak(code: str) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of `python -c code` in a fresh process."""
    t0 = time.perf_counter()
    # VmHWM (peak resident set of this process image); ru_maxrss would include the parent's at fork time
    proc = subprocess.run([sys.executable, "-c", code + "\nimport re, sys\nprint(re.search(r'VmHWM:\\s*(\\d+)', "
                           "open('/proc/self/status').read()).group(1), file=sys.stderr)"],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return int(proc.stderr.strip().splitlines()[-1]) / 1024, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stats", default=str(DEFAULT_STATS), help="init_stats.json of the official model")
    ap.add_argument("--config", default="cifar10", help="which entry of the statistics (default cifar10)")
    ap.add_argument("--keep", default=None, help="write the checkpoint here and keep it (default: a temp dir)")
    args = ap.parse_args()
    stats = json.loads(Path(args.stats).read_text())[args.config]
    shapes = {k: v["shape"] for k, v in stats["params"].items()}
    folder = Path(args.keep or tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / "checkpoints-0.flax"
    tree_bytes = write_checkpoint(ckpt, shapes)
    (folder / "config.json").write_text(json.dumps({"config": stats["config"]}))
    out = folder / "model.safetensors"
    if out.exists():
        out.unlink()
    base, _ = child_peak(f"import json, vdm.convert as c\nfrom vdm.model import VDM\n"
                         f"VDM(c.config_from_official(json.load(open({str(folder / 'config.json')!r}))['config'], 3))")
    peak, seconds = child_peak(f"from vdm.cli import main\nassert main(['convert', {str(ckpt)!r}, '--config', "
                               f"{str(folder / 'config.json')!r}, '--out', {str(out)!r}]) == 0")
    mib = 1024 ** 2
    print(f"checkpoint {ckpt.stat().st_size / mib:.0f} MiB (4 trees of {tree_bytes / mib:.0f} MiB: params, EMA, "
          f"Adam mu, nu), config {args.config}")
    print(f"peak RSS: vdm convert {peak:.0f} MiB; import + build the model {base:.0f} MiB; "
          f"difference {peak - base:.0f} MiB = {(peak - base) * mib / tree_bytes:.2f} parameter trees; "
          f"conversion took {seconds:.1f} s (process start included)")


if __name__ == "__main__":
    main()
