"""Images per second of the official JAX implementation's training step, for the side-by-side in bench/README.md.

Runs the official code itself — nothing of it is copied here: point `--official` at a checkout of
https://github.com/google-research/vdm and run this script with a Python that has jax, flax, optax, chex and
ml_collections installed (this package and torch are not needed; TensorFlow, TensorFlow Datasets and clu,
which the official code imports for its data pipeline and logging only, are replaced by empty stand-ins).

What is timed is the official `Experiment.train_step` exactly as `Experiment.__init__` builds it — jitted
through `jax.pmap(functools.partial(jax.lax.scan, train_step))`, fp32 — on the official CIFAR-10 config
(`configs/cifar10.py`: C = 128, L = 32, dropout 0.1, learned linear γ, AdamW, EMA) at a batch of `--batch`
random uint8 images, one step per call. Compare it with

    python bench/throughput.py --networks cifar10 --passes train --precisions fp32 --modes eager --batch 8 --threads 1 --clock cpu

    /path/to/jax-python bench/official_jax.py --official ~/src/google-research-vdm --batch 8 --threads 1 --clock cpu

`--threads 1` pins the process to one CPU (sched_setaffinity) and asks XLA for one intra-op thread;
`--clock cpu` times process CPU time per thread instead of wall time, like bench/throughput.py.
"""

from __future__ import annotations

import argparse
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from unittest import mock

STUBBED = ("tensorflow", "tensorflow_datasets", "tensorflow_probability", "tensorboard", "clu")


class _Stubs(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of the official code's data/logging dependencies (never used by a training step) get mocks."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in STUBBED or name == "vdm.dataset":
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = mock.MagicMock(name=spec.name)
        module.__path__ = []
        module.__spec__ = spec
        return module

    def exec_module(self, module):
        pass


def load_official(checkout: Path):
    """The official modules, imported from `checkout` under their own package name `vdm`."""
    import jax

    for old, new in (("tree_map", jax.tree_util.tree_map), ("tree_multimap", jax.tree_util.tree_map)):
        if not hasattr(jax, old):  # removed from newer JAX; the official code (2022) still calls them
            setattr(jax, old, new)
    sys.meta_path.insert(0, _Stubs())
    package = types.ModuleType("vdm")
    package.__path__ = [str(checkout)]
    sys.modules["vdm"] = package
    spec = importlib.util.spec_from_file_location("vdm_official_cifar10_config", checkout / "configs" / "cifar10.py")
    config_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config_module)
    import vdm.experiment_vdm as experiment_vdm
    import vdm.train_state as train_state
    return experiment_vdm, train_state, config_module.get_config()


def build_step(checkout: Path, batch: int, seed: int):
    """(jitted official training step, replicated state, batch) as `Experiment.__init__` would build them."""
    import flax
    import flax.jax_utils
    import jax
    import numpy as np

    experiment_vdm, train_state, config = load_official(checkout)
    exp = experiment_vdm.Experiment_VDM.__new__(experiment_vdm.Experiment_VDM)  # no dataset, no writers
    exp.config = config
    rng = jax.random.PRNGKey(config.training.seed)
    rng, model_rng, train_rng = jax.random.split(rng, 3)
    exp.model, params = exp.get_model_and_params(model_rng)
    params = flax.core.freeze(params)  # flax of 2022 returned FrozenDicts, which the official AdamW mask expects
    exp.state = train_state.TrainState.create(apply_fn=exp.model.apply, variables=params,
                                              optax_optimizer=exp.get_optimizer)
    exp.lr_schedule = exp.get_lr_schedule()
    step = jax.pmap(functools.partial(jax.lax.scan, functools.partial(exp.train_step, train_rng)), "batch")
    state = flax.jax_utils.replicate(exp.state)
    images = np.random.default_rng(seed).integers(0, 256, (1, 1, batch, 32, 32, 3), dtype=np.uint8)
    data = {"images": images, "conditioning": np.zeros((1, 1, batch), np.uint8)}
    return step, state, data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", required=True, type=Path, help="checkout of github.com/google-research/vdm")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (compiling) call")
    p.add_argument("--threads", type=int, default=None,
                   help="1: pin to one CPU and one XLA intra-op thread (default: XLA's choice, all CPUs)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not (args.official / "model_vdm.py").is_file():
        print(f"error: {args.official} is not a checkout of google-research/vdm (no model_vdm.py)", file=sys.stderr)
        return 2
    if args.threads:
        cpus = sorted(os.sched_getaffinity(0))[-args.threads:]
        os.sched_setaffinity(0, cpus)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                                   f" intra_op_parallelism_threads={args.threads}").strip()
    import jax

    step, state, data = build_step(args.official.resolve(), args.batch, seed=0)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    per_thread = args.threads if (args.clock == "cpu" and args.threads) else 1
    t0 = time.perf_counter()
    state, _ = jax.block_until_ready(step(state, data))
    first = time.perf_counter() - t0
    print(f"first call (compilation and one step): {first:.1f} s wall", file=sys.stderr, flush=True)
    for _ in range(args.warmup):
        state, _ = jax.block_until_ready(step(state, data))
    times = []
    for _ in range(args.iters):
        t0 = clock()
        state, _ = jax.block_until_ready(step(state, data))
        times.append((clock() - t0) / per_thread)
    sec = statistics.median(times)
    commit = None
    if (args.official / ".git").exists():
        commit = subprocess.run(["git", "-C", str(args.official), "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or None
    row = dict(implementation="official JAX (google-research/vdm)", commit=commit, network="cifar10",
               batch=args.batch, precision="fp32", images_per_s=args.batch / sec, seconds_per_step=sec,
               step_times=times, first_call_s=first, clock=args.clock, threads=args.threads,
               jax=jax.__version__, platform=platform.platform(), load_avg=list(os.getloadavg()))
    if args.json:
        print(json.dumps(row, indent=1))
    else:
        print(f"official JAX  cifar10 train fp32 B={args.batch}  {row['images_per_s']:.3f} img/s  "
              f"({sec:.2f} s/step, first call {first:.1f} s, clock {args.clock}, threads {args.threads or 'all'}, "
              f"load {row['load_avg'][0]:.2f}, jax {jax.__version__})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
