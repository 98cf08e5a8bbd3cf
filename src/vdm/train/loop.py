"""The training loop: `train(config, out_dir)` minimises the negative VLB (bits per dimension) with AdamW.

Each optimiser step s uses global batch s of the deterministic data order and noise drawn from (seed, s)
(see `vdm.train.batches`), and reseeds dropout from (seed, rank, s); a resumed run therefore repeats exactly
what an uninterrupted run would have done. Under torchrun each process takes its slice of the global batch
and DistributedDataParallel averages the gradients; rank 0 alone writes checkpoints, metrics and the bar.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from vdm.config import TrainConfig, upgrade_legacy
from vdm.losses import bits_per_dim
from vdm.model import VDM
from vdm.nets.unet import dropout_generator
from vdm.nets.winograd import use_winograd
from vdm.precision import autocast, resolve_conv_algorithm, resolve_precision
from vdm.progress import progress_bar
from vdm.train import distributed, state
from vdm.train.augment import augment
from vdm.train.batches import (BatchOrder, augment_generator, dropout_seed, init_seed, part_dropout_seed,
                               step_noise)
from vdm.train.crops import CropSampler
from vdm.train.ema import EMA
from vdm.train.log import MetricsLog, truncate_metrics
from vdm.train.split import split_gradients
from vdm.train.optim import lr_at, make_optimizer, set_lr
from vdm.train.testset import TestSubset, fixed_subset

# run.* fields that may differ when a run is resumed (they do not change what a step computes)
RESUMABLE_RUN_FIELDS = {"max_steps", "log_every", "eval_every", "eval_batch_size", "checkpoint_every",
                        "keep_last", "max_nonfinite", "device", "progress", "tensorboard", "compile"}


class TrainingError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


class NonFiniteLossError(TrainingError):
    """Too many consecutive non-finite losses; the last good checkpoint is left as it was."""


class LossModule(nn.Module):
    """The per-example loss terms as a module's forward, so DistributedDataParallel and torch.compile see
    the whole computation: forward(x, t, eps, eps_0, conditioning) → (B, 3) nats (prior, recon, diff)."""

    def __init__(self, model: VDM):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, t: Tensor, eps: Tensor, eps_0: Tensor, conditioning: Tensor) -> Tensor:
        out = self.model.loss(x, t=t, eps=eps, eps_0=eps_0, conditioning=conditioning)
        return torch.stack([out["prior"], out["recon"], out["diff"]], dim=1)


@dataclass
class Counters:
    """What a checkpoint records besides the tensors (all saved in state.json)."""

    images_seen: int = 0  # training images processed (all processes)
    nonfinite_total: int = 0  # steps skipped because the loss or the gradient was not finite
    nonfinite_consecutive: int = 0  # the current run of such steps
    best_test_bpd: float | None = None  # lowest test bpd at a checkpoint so far
    best_checkpoint: str | None = None  # its checkpoint's name
    elapsed_s: float = 0.0  # training wall-clock time over all sessions

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Window:
    """Sums over the steps since the last metrics line."""

    terms: Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))
    grad_norm: float = 0.0
    good: int = 0
    skipped: int = 0
    images: int = 0
    pixels: int = 0
    start: float = field(default_factory=time.perf_counter)


def train(config: TrainConfig, out_dir: str | Path, resume: bool = False, max_steps: int | None = None,
          max_minutes: float | None = None) -> dict:
    """Train a VDM as `config` says, writing checkpoints and metrics under `out_dir`.

    `resume` continues from the newest checkpoint in `out_dir` (a fresh start when there is none);
    `max_steps` (total optimiser steps, counting from 0) overrides `config.run.max_steps`; `max_minutes`
    ends the run after that much wall-clock time of this session, with a checkpoint. Returns a summary:
    {"step", "checkpoint", "test_bpd" (EMA weights on the fixed subset of `test_images` images of
    data.test_split; `vdm eval` on the whole split gives the same estimator's value there), "test_images",
    "best_checkpoint", "nonfinite_total", "stopped"}.
    """
    if max_steps is not None and max_steps < 0:
        raise TrainingError(f"max_steps must not be negative, got {max_steps}")
    if max_minutes is not None and not max_minutes > 0:
        raise TrainingError(f"max_minutes must be positive, got {max_minutes}")
    d = distributed.setup(config.run.device)
    try:
        return _Trainer(config, Path(out_dir), d, resume).run(
            config.run.max_steps if max_steps is None else max_steps, max_minutes)
    finally:
        distributed.teardown(d)


class _Trainer:
    def __init__(self, config: TrainConfig, out_dir: Path, d: distributed.Dist, resume: bool):
        self.config, self.out_dir, self.d = config, out_dir, d
        run = config.run
        if run.batch_size % d.world_size:
            raise TrainingError(f"run.batch_size={run.batch_size} must be divisible by the number of "
                                f"processes ({d.world_size})")
        self.precision = resolve_precision(run.precision, d.device, warn=d.is_main)
        self.threads_before = torch.get_num_threads()
        self.pool = self._split_pool(run, d)
        try:
            self._setup(resume)
        except BaseException:
            self._release_pool()  # a constructor that fails leaves torch's thread count as it found it
            raise

    def _setup(self, resume: bool) -> None:
        config, out_dir, d, run = self.config, self.out_dir, self.d, self.config.run
        self.conv_algorithm = resolve_conv_algorithm(run.conv_algorithm, d.device, self.precision.precision)
        if d.is_main and run.progress:
            print(f"precision: {self.precision.precision} ({self.precision.reason}); 3×3 convolutions: "
                  f"{self.conv_algorithm}", flush=True)
        ckpt = self._checkpoint_to_resume(resume)
        self.train_x, test_x = _load_data(config, d.device)
        self.crops, self.order = None, None
        if config.data.crop_sizes:
            self.crops = CropSampler(self.train_x, config.data.crop_sizes, run.batch_size, config.model.image_size,
                                     run.seed, d.world_size)
        else:
            self.order = BatchOrder(len(self.train_x), run.batch_size, run.seed)
        torch.manual_seed(init_seed(run.seed))
        self.model = VDM(config.model).to(d.device)
        if run.init_from is not None and ckpt is None:
            _load_initial_weights(self.model, run.init_from)
        self.ema = EMA(self.model, run.ema_decay, run.ema_warmup)
        self.optimizer = make_optimizer(self.model, config.optim)
        self.counters, self.step = Counters(), 0
        self._last_test: float | None = None
        if ckpt is not None:
            self._restore(ckpt)
        self.forward = self._wrap(LossModule(self.model))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.test = None
        if d.is_main and len(test_x):
            self.test = TestSubset(test_x, run.seed, run.eval_batch_size)
            self.eval_model = VDM(config.model).to(d.device)
        self.log = None
        if d.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.json").write_text(config.to_json(), encoding="utf-8")
            if ckpt is not None:
                truncate_metrics(out_dir, self.step)  # records after the checkpoint are written again
            else:
                (out_dir / "metrics.jsonl").unlink(missing_ok=True)
            self.log = MetricsLog(out_dir, run.tensorboard)

    # --- setting up -------------------------------------------------------------------------------------------
    def _checkpoint_to_resume(self, resume: bool) -> Path | None:
        existing = state.list_checkpoints(self.out_dir)
        if not resume:
            if existing:
                raise TrainingError(f"{self.out_dir} already holds checkpoints ({existing[-1].name}); "
                                    "use --resume to continue it or choose another --out")
            return None
        if not existing:
            return None
        ckpt = existing[-1]
        saved = state.read_state(ckpt)["config"]
        _check_same_run(saved, self.config.to_dict(), ckpt)
        return ckpt

    def _restore(self, ckpt: Path) -> None:
        st = state.load_checkpoint(ckpt, self.model, self.ema, self.optimizer)
        self.step = st["step"]
        known = Counters().__dict__
        self.counters = Counters(**{k: st[k] for k in known if k in st})
        if self.d.is_main:
            print(f"resuming from {ckpt} (step {self.step})", flush=True)

    @staticmethod
    def _split_pool(run, d: distributed.Dist) -> ThreadPoolExecutor | None:
        """With run.split = K > 1: K worker threads for the parts of each step, and torch set to one CPU thread
        for the whole run (evaluation included; restored at its end); the convolution algorithm is then chosen
        for one thread."""
        if run.split == 1:
            return None
        if d.device.type != "cpu" or d.enabled or run.compile:
            raise TrainingError(f"run.split = {run.split} runs a step's parts on CPU threads: it needs the CPU, "
                                "one process and run.compile = false (set run.split = 1)")
        torch.set_num_threads(1)
        return ThreadPoolExecutor(run.split, thread_name_prefix="vdm-part")

    def _release_pool(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
            torch.set_num_threads(self.threads_before)

    def _wrap(self, module: nn.Module) -> nn.Module:
        if self.d.enabled:
            ids = [self.d.device.index] if self.d.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        if self.config.run.compile:
            module = torch.compile(module)
        return module

    # --- the loop ---------------------------------------------------------------------------------------------
    def run(self, max_steps: int, max_minutes: float | None) -> dict:
        run, d = self.config.run, self.d
        session_start, first_step = time.perf_counter(), self.step
        bar = progress_bar(d.is_main and run.progress, desc="training", unit="step", initial=self.step,
                           total=bar_total(self.step, 0, 0.0, max_steps, max_minutes), dynamic_ncols=True)
        window, stopped, last_ckpt = Window(), "max_steps", None
        try:
            while self.step < max_steps:
                self._one_step(window)
                self.step += 1
                bar.total = bar_total(self.step, self.step - first_step, time.perf_counter() - session_start,
                                      max_steps, max_minutes)
                bar.update(1)
                if self.step % run.log_every == 0 or self.step == max_steps:
                    self._log_window(window, bar)
                    window = Window()
                out_of_time = max_minutes is not None and time.perf_counter() - session_start > 60 * max_minutes
                if distributed.broadcast_flag(d, out_of_time):
                    stopped = "max_minutes"
                    break
                if self.step % run.checkpoint_every == 0 and self.step < max_steps:
                    last_ckpt = self._checkpoint()
                elif run.eval_every and self.step % run.eval_every == 0:
                    self._evaluate()
        finally:
            bar.close()
            self._release_pool()
        if window.good or window.skipped:
            self._log_window(window, None)
        last_ckpt = self._checkpoint() if (last_ckpt is None or last_ckpt.name != state.checkpoint_name(
            self.step)) else last_ckpt
        if self.log is not None:
            self.log.close()
        c = self.counters
        return {"step": self.step, "checkpoint": str(last_ckpt) if last_ckpt else None,
                "test_bpd": self._last_test, "test_images": len(self.test.x) if self.test else 0,
                "best_checkpoint": c.best_checkpoint,
                "nonfinite_total": c.nonfinite_total, "stopped": stopped}

    def _batch(self) -> tuple[int, tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
        """(global batch size, this process's slice of global batch `self.step`: (x, t, ε₀, ε, conditioning) on
        the device). With `data.augment`, x is augmented and the conditioning says which images were (else
        zeros); with `data.crop_sizes`, x holds random crops (vdm.train.crops)."""
        run, d = self.config.run, self.d
        if self.crops is not None:
            x = self.crops.batch(self.step).to(d.device, non_blocking=True)
        else:
            idx = self.order.indices(self.step)
            x = self.train_x[idx.to(self.train_x.device)].to(d.device, non_blocking=True)
        n = len(x)
        B = n // d.world_size
        rows = slice(d.rank * B, (d.rank + 1) * B)
        x, conditioning = augment(x, self.config.data.augment, augment_generator(run.seed, self.step, d.device))
        t, eps_0, eps = step_noise(run.seed, self.step, n, tuple(x.shape[1:]), self.config.model.antithetic,
                                   d.device)
        return n, (x[rows], t[rows], eps_0[rows], eps[rows], conditioning[rows])

    def _one_step(self, window: Window) -> None:
        """Optimiser step `self.step`, or a skipped one when the loss or the gradient is not finite."""
        run, d = self.config.run, self.d
        n, (x, t, eps_0, eps, conditioning) = self._batch()
        grads = None
        if self.pool is not None:
            terms, grads = self._split_gradients(x, t, eps, eps_0, conditioning)
        else:
            torch.manual_seed(dropout_seed(run.seed, d.rank, self.step))
            with autocast(self.precision.precision, d.device), use_winograd(self.conv_algorithm == "winograd"):
                nats = self.forward(x, t, eps, eps_0, conditioning)  # (B, 3)
            terms = bits_per_dim(nats.float(), self.model.num_dims(x)).mean(0)  # (3,) bpd
        loss = terms.sum()
        mean_terms = distributed.all_mean(d, torch.cat([terms.detach(), loss.detach()[None]]))
        grad_norm = math.nan
        if torch.isfinite(mean_terms).all():
            self.optimizer.zero_grad(set_to_none=True)
            if grads is None:
                loss.backward()
            else:
                for p, g in zip(self.params, grads):
                    p.grad = g
            grad_norm = self._clip_gradients()
        window.images += n
        window.pixels += n * x.shape[-2] * x.shape[-1]
        self.counters.images_seen += n
        if math.isfinite(grad_norm):
            set_lr(self.optimizer, lr_at(self.config.optim, self.step))
            self.optimizer.step()
            self.ema.update(self.model, self.step)
            self.counters.nonfinite_consecutive = 0
            window.terms += mean_terms[:3].double().cpu()
            window.grad_norm += grad_norm
            window.good += 1
        else:
            self._skip(window)

    def _split_gradients(self, x: Tensor, t: Tensor, eps: Tensor, eps_0: Tensor, conditioning: Tensor
                         ) -> tuple[Tensor, list[Tensor | None]]:
        """run.split > 1: the batch's mean loss terms (3,) in bpd and the gradient of their sum, the batch run as
        run.split equal parts side by side on the thread pool (torch runs one thread per part), part k's
        dropout masks from its own generator (`split_gradients`)."""
        run, d = self.config.run, self.d
        dims, n = self.model.num_dims(x), len(x)
        parts = list(zip(*(a.chunk(run.split) for a in (x, t, eps, eps_0, conditioning))))

        def part_terms(k: int) -> Tensor:
            g = torch.Generator().manual_seed(part_dropout_seed(run.seed, d.rank, self.step, k))
            with dropout_generator(g), autocast(self.precision.precision, d.device), \
                    use_winograd(self.conv_algorithm == "winograd"):
                nats = self.forward(*parts[k])
            return bits_per_dim(nats.float(), dims).sum(0) / n

        return split_gradients(self.pool, part_terms, len(parts), self.params)

    def _clip_gradients(self) -> float:
        """Clip the score network's gradient norm to optim.grad_clip (when > 0); return that norm, or NaN when
        any gradient (network or schedule) is not finite. The schedule is left out of the norm: under
        variance minimisation its shape gradients are scaled by 2·L (thousands of nats) and would swamp it."""
        clip = self.config.optim.grad_clip
        net = self.model.score_model.parameters()
        norm = nn.utils.clip_grad_norm_(net, clip if clip > 0 else math.inf)
        schedule = [p.grad for p in self.model.gamma.parameters() if p.grad is not None]
        if schedule and not all(bool(torch.isfinite(g).all()) for g in schedule):
            return math.nan
        return float(norm)

    def _skip(self, window: Window) -> None:
        c = self.counters
        c.nonfinite_total += 1
        c.nonfinite_consecutive += 1
        window.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        limit = self.config.run.max_nonfinite
        if c.nonfinite_consecutive >= limit:
            good = state.list_checkpoints(self.out_dir)
            where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written yet"
            if self.log is not None:
                self.log.write({"step": self.step + 1, "nonfinite_total": c.nonfinite_total,
                                "stopped": "nonfinite"})
                self.log.close()
            raise NonFiniteLossError(
                f"{c.nonfinite_consecutive} consecutive non-finite losses (limit run.max_nonfinite={limit}) "
                f"at step {self.step}; stopped without saving; {where}. Try a lower optim.lr, "
                "optim.grad_clip, or run.precision=fp32, then resume.")

    # --- logging, evaluation, checkpoints -----------------------------------------------------------------------
    def _log_window(self, w: Window, bar) -> None:
        seconds = time.perf_counter() - w.start
        self.counters.elapsed_s += seconds
        if self.log is None:
            return
        n = max(w.good, 1)
        prior, recon, diff = (w.terms / n).tolist() if w.good else (None, None, None)
        rec = {"step": self.step, "bpd": prior + recon + diff if w.good else None, "prior": prior,
               "recon": recon, "diff": diff, "lr": lr_at(self.config.optim, self.step - 1),
               "grad_norm": w.grad_norm / n if w.good else None, "images_per_s": w.images / max(seconds, 1e-9),
               "pixels_per_s": w.pixels / max(seconds, 1e-9),
               "epoch": self.order.epoch(self.step) if self.order is not None else None,  # None on random crops
               "nonfinite_total": self.counters.nonfinite_total, "skipped": w.skipped}
        self.log.write(rec)
        if bar is not None and w.good:
            bar.set_postfix(bpd=f"{rec['bpd']:.3f}", img_s=f"{rec['images_per_s']:.0f}", refresh=False)

    def _evaluate(self) -> dict | None:
        if self.test is None:
            return None
        self.eval_model.load_state_dict(self.ema.state_dict())
        result = self.test.evaluate(self.eval_model)  # float32 even when training in bf16
        self._last_test = result["test_bpd"]
        self.log.write({"step": self.step, **result})
        return result

    def _checkpoint(self) -> Path | None:
        """Evaluate, write checkpoint `self.step` (rank 0), update `best`, prune; all ranks wait for it."""
        path = None
        if self.d.is_main:
            result = self._evaluate()
            c = self.counters
            name = state.checkpoint_name(self.step)
            better = result is not None and (c.best_test_bpd is None or result["test_bpd"] < c.best_test_bpd)
            if better:
                c.best_test_bpd, c.best_checkpoint = result["test_bpd"], name
            path = state.save_checkpoint(self.out_dir, self.step, self.model, self.ema, self.optimizer,
                                         c.to_dict(), self.config)
            if better or state.read_best(self.out_dir) is None:
                state.write_best(self.out_dir, c.best_checkpoint or name)
            state.prune(self.out_dir, self.config.run.keep_last)
        distributed.barrier(self.d)
        return path if self.d.is_main else Path(self.out_dir) / "checkpoints" / state.checkpoint_name(self.step)


def bar_total(step: int, session_steps: int, elapsed_s: float, max_steps: int, max_minutes: float | None
              ) -> int | None:
    """The training bar's total at `step`: `max_steps`, or under a time limit the step the run is expected to
    stop at, `session_steps` in `elapsed_s` seconds extrapolated to `max_minutes` (at most `max_steps`; None
    before the first step has given a rate), so that the bar's remaining time is the run's."""
    if max_minutes is None:
        return max_steps
    if session_steps < 1 or elapsed_s <= 0:
        return None
    projected = step + session_steps / elapsed_s * max(0.0, 60 * max_minutes - elapsed_s)
    return min(max_steps, max(step, round(projected)))


def _check_same_run(saved: dict, current: dict, ckpt: Path) -> None:
    """Refuse to resume with settings that change what a step computes (model, optimiser, data, seed, batch)."""
    saved = upgrade_legacy(saved)  # compared in the current keys (see upgrade_legacy)
    diffs = []
    for section in ("model", "optim", "data", "run"):
        a, b = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(a) | set(b)):
            if section == "run" and key in RESUMABLE_RUN_FIELDS:
                continue
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: checkpoint {a.get(key)!r}, now {b.get(key)!r}")
    if diffs:
        raise TrainingError(f"cannot resume from {ckpt}: the config differs ({'; '.join(diffs)}). Resume "
                            "without --preset/--config to use the run's own config.json.")


def _load_initial_weights(model: VDM, path: str) -> None:
    """Copy the weights of the model file at `path` into `model`; TrainingError when it is not the same model."""
    from vdm.checkpoint import CheckpointError, load_model

    try:
        source = load_model(path)
    except (CheckpointError, OSError, ValueError) as e:
        raise TrainingError(f"run.init_from: {e}") from None
    have, want = source.config.to_dict(), model.config.to_dict()
    if have != want:
        diffs = [f"model.{k}: file {have.get(k)!r}, run {want.get(k)!r}" for k in sorted(set(have) | set(want))
                 if have.get(k) != want.get(k)]
        raise TrainingError(f"run.init_from: {path} holds a different model ({'; '.join(diffs)})")
    with torch.no_grad():
        model.load_state_dict(source.state_dict())


def _load_data(config: TrainConfig, device: torch.device) -> tuple[Tensor | dict, Tensor]:
    """(training images, fixed test subset) as uint8 tensors, the training set on `device` when small; with
    data.crop_sizes the training images are the whole photographs instead ({name: [H×W×3 uint8 per scale]})."""
    from vdm.data import DatasetError, load_dataset, photo_scales

    m, data = config.model, config.data
    kw = {"image_size": m.image_size, "channels": m.channels}
    try:
        if data.crop_sizes:
            if m.channels != 3:
                raise TrainingError(f"random crops come from colour photographs; model.channels is {m.channels}")
            train_x = photo_scales(data.name, "train")
        else:
            train_x = load_dataset(data.name, "train", root=data.root, **kw)
        test_x = (load_dataset(data.name, data.test_split, root=data.root, **kw) if data.test_images > 0
                  else np.zeros((0, m.channels, m.image_size, m.image_size), np.uint8))
    except (DatasetError, ValueError, OSError) as e:
        raise TrainingError(f"dataset {data.name!r}: {e}") from None
    for split, x in (("train", train_x), (data.test_split, test_x)):
        if not isinstance(x, dict) and len(x) and x.shape[1] != m.channels:
            raise TrainingError(f"dataset {data.name!r} ({split}) has {x.shape[1]} channels; "
                                f"model.channels is {m.channels}")
    if len(train_x) == 0:
        raise TrainingError(f"dataset {data.name!r} has no training images")
    test_x = torch.from_numpy(np.ascontiguousarray(test_x[fixed_subset(len(test_x), data.test_images)]))
    if isinstance(train_x, dict):
        return train_x, test_x
    train_t = torch.from_numpy(train_x)
    if device.type == "cuda" and train_x.nbytes < 2**31:
        train_t = train_t.to(device)
    return train_t, test_x
