"""Numbers and pictures for a model card, read back from the runs' loss logs.

``run_stats(out_dir)`` summarizes one run (steps, training wall time across resumed segments,
smoothed loss at start and end); ``plot_runs`` draws every run's loss curve in one figure.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from training.loop import read_loss_log


def training_seconds(rows: list[dict]) -> float:
    """Wall time of the loop, summed over segments (``time`` restarts at 0 after a resume)."""
    total, prev = 0.0, 0.0
    for r in rows:
        t = float(r.get("time", 0.0))
        total += t - prev if t >= prev else t
        prev = t
    return total


def run_stats(out_dir: str | Path, window: int = 50) -> dict:
    rows = read_loss_log(Path(out_dir) / "loss.jsonl")
    if not rows:
        raise FileNotFoundError(f"{out_dir}/loss.jsonl: no training log")
    losses = np.array([r["loss"] for r in rows], dtype=float)
    w = max(1, min(window, len(losses) // 4))
    return {
        "run": str(out_dir),
        "steps": int(rows[-1]["step"]) + 1,
        "train_seconds": round(training_seconds(rows), 1),
        "seconds_per_step": round(training_seconds(rows) / len(rows), 3),
        "loss_first": round(float(losses[:w].mean()), 4),
        "loss_last": round(float(losses[-w:].mean()), 4),
        "window": w,
    }


def plot_runs(runs: dict[str, str | Path], path: str | Path, keys: dict[str, tuple[str, ...]] | None = None) -> Path:
    """One panel per run (title = its name), raw loss faint and a running mean on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), squeeze=False)
    for ax, (name, out_dir) in zip(axes[0], runs.items()):
        rows = read_loss_log(Path(out_dir) / "loss.jsonl")
        steps = np.array([r["step"] for r in rows])
        for key in (keys or {}).get(name, ("loss",)):
            y = np.array([r.get(key, np.nan) for r in rows], dtype=float)
            line, = ax.plot(steps, y, alpha=0.2, lw=0.7)
            ax.plot(steps, _running_mean(y, 25), color=line.get_color(), lw=1.6, label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _running_mean(y: np.ndarray, n: int) -> np.ndarray:
    out = np.full_like(y, np.nan)
    for i in range(len(y)):
        seg = y[max(0, i - n + 1): i + 1]
        seg = seg[np.isfinite(seg)]
        if len(seg):
            out[i] = seg.mean()
    return out
