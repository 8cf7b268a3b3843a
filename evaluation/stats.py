"""Paired bootstrap over triples: how sure are the differences between two modes?

Every mode is run on the same triples with the same noise, so differences are paired: one
resample of triple indices is applied to both modes at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evaluation.metrics import mean_iou


@dataclass
class TripleRecord:
    """What one output contributed to its mode's row (enough to recompute the pooled metrics)."""

    confusion: np.ndarray  # (C, C)
    class_error_sum: float
    class_count: int
    hits: int
    total: int


@dataclass
class Interval:
    point: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.point:+.3f} [95% CI {self.low:+.3f}, {self.high:+.3f}]"


def _stack(records: list[TripleRecord]):
    return (np.stack([r.confusion for r in records]).astype(np.float64),
            np.array([[r.class_error_sum, r.class_count, r.hits, r.total] for r in records], np.float64))


def _statistics(weights: np.ndarray, cms: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """(B, 3): class ΔE00, controllability, mIoU (%) for each weighting of the triples."""
    agg = weights @ sums  # (B, 4)
    with np.errstate(invalid="ignore", divide="ignore"):
        class_de = agg[:, 0] / agg[:, 1]
        control = agg[:, 2] / agg[:, 3]
    pooled = np.tensordot(weights, cms, axes=(1, 0))  # (B, C, C)
    miou = np.array([100.0 * mean_iou(cm) for cm in pooled])
    return np.stack([class_de, control, miou], 1)


def compare(a: list[TripleRecord], b: list[TripleRecord], n_boot: int = 1000, seed: int = 0) -> dict[str, Interval]:
    """Mode a against mode b on the same triples: relative class-ΔE00 reduction of a, and the
    differences a - b in controllability and in mIoU points, with percentile intervals."""
    if len(a) != len(b) or not a:
        raise ValueError(f"compare: need the same non-zero number of triples, got {len(a)} and {len(b)}")
    n = len(a)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, (n_boot, n))
    weights = np.stack([np.bincount(d, minlength=n) for d in draws]).astype(np.float64)
    weights = np.concatenate([np.ones((1, n)), weights])  # row 0: the point estimate
    sa, sb = _statistics(weights, *_stack(a)), _statistics(weights, *_stack(b))
    values = {
        "class_de2000_reduction": 1.0 - sa[:, 0] / sb[:, 0],
        "controllability_difference": sa[:, 1] - sb[:, 1],
        "miou_difference": sa[:, 2] - sb[:, 2],
    }
    out = {}
    for name, v in values.items():
        boot = v[1:][np.isfinite(v[1:])]
        low, high = (np.percentile(boot, [2.5, 97.5]) if boot.size else (np.nan, np.nan))
        out[name] = Interval(float(v[0]), float(low), float(high))
    return out
