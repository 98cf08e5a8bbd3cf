"""Figures of a run as PNG files (matplotlib, Agg backend): the training curve, the learned noise schedule and
the diffusion-loss integrand. matplotlib is an optional extra: `pip install 'vdm[plot]'`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from vdm.files import atomic_write
from vdm.model import VDM

INSTALL_HINT = "plotting needs matplotlib: pip install 'vdm[plot]' (or pip install 'matplotlib>=3.7')"


class MetricsError(ValueError):
    """A metrics.jsonl file that cannot be read; the message names the file and line."""


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend; ImportError with the install hint if missing."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file: one JSON object a line, blank lines skipped.

    Raises MetricsError naming the file and line for text that is not a JSON object.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MetricsError(f"{path}: cannot read metrics ({e})") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise MetricsError(f"{path}, line {n}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise MetricsError(f"{path}, line {n}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records holding a finite number under both "step" and `key`, by step."""
    pts = []
    for r in records:
        s, v = r.get("step"), r.get(key)
        if _is_number(s) and _is_number(v) and math.isfinite(v):
            pts.append((float(s), float(v)))
    pts.sort()
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def plot_training_curve(records: list[dict], path: str | os.PathLike) -> Path:
    """Train bits per dimension ("bpd") and, where logged, test bpd ("test_bpd") against the step."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, style in (("bpd", "train", ".-"), ("test_bpd", "test", "o-")):
        x, y = series(records, key)
        if len(x):
            ax.plot(x, y, style, label=label, markersize=3)
    if not ax.lines:
        raise MetricsError("no record holds a step with a 'bpd' or 'test_bpd' number")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per dimension (negative VLB)")
    ax.set_title("training curve")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


@torch.no_grad()
def schedule_curve(model: VDM, points: int = 201) -> tuple[np.ndarray, np.ndarray]:
    """(t, γ(t)) on a uniform grid of `points` times in [0, 1]."""
    t = torch.linspace(0, 1, points, dtype=model.dtype, device=model.device)
    return t.double().cpu().numpy(), model.gamma(t).double().cpu().numpy()


def plot_schedule(model: VDM, path: str | os.PathLike) -> Path:
    """γ(t) (log noise-to-signal ratio) and log-SNR = −γ(t) against t, side by side."""
    plt = pyplot()
    t, gamma = schedule_curve(model)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(t, gamma)
    a.set_ylabel("γ(t) = log σ²/α²")
    a.set_title(f"schedule ({model.config.gamma_type}): γ(0) = {gamma[0]:.2f}, γ(1) = {gamma[-1]:.2f}")
    b.plot(t, -gamma, color="C1")
    b.set_ylabel("log SNR(t) = −γ(t)")
    b.set_title("log signal-to-noise ratio")
    for ax in (a, b):
        ax.set_xlabel("t")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_integrand(times: np.ndarray, values: np.ndarray, path: str | os.PathLike, *, images: int) -> Path:
    """The diffusion-loss integrand ½·γ'(t)·E‖ε − ε̂‖²/D (bits per dimension per unit t) against t, log scale."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(times, values, "o-", markersize=3)
    if np.all(np.asarray(values) > 0):
        ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("½ γ'(t) E‖ε − ε̂‖² / D   [bits/dim per unit t]")
    ax.set_title(f"diffusion-loss integrand on {images} test images (mean over t ≈ {np.mean(values):.4f} bpd)")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def _save(fig, path: str | os.PathLike) -> Path:
    """Write `fig` as a PNG atomically (an overwritten figure is never left half-written), then close it."""
    path = Path(path)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        pyplot().close(fig)
    return path


def plot_run(model: VDM, out_dir: str | os.PathLike, *, metrics: str | os.PathLike | None = None,
             data: np.ndarray | None = None, points: int = 32, seed: int = 0, progress: bool = True) -> list[Path]:
    """Write the run's figures into `out_dir` and return their paths.

    training_curve.png (when a metrics file is given), schedule.png, and diffusion_integrand.png (when test
    images `data` are given: the integrand at the `points` midpoints t_k = (k + ½)/P).
    """
    from vdm.evaluate import diffusion_integrand

    out = Path(out_dir)
    written = []
    if metrics is not None:
        written.append(plot_training_curve(read_metrics(metrics), out / "training_curve.png"))
    written.append(plot_schedule(model, out / "schedule.png"))
    if data is not None and len(data):
        times = (np.arange(points) + 0.5) / points
        values = diffusion_integrand(model, data, times, seed=seed, progress=progress)
        written.append(plot_integrand(times, values, out / "diffusion_integrand.png", images=len(data)))
    return written
