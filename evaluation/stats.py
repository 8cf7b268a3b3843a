"""Paired bootstrap over triples: how sure are the differences between two modes?

Every mode is run on the same triples with the same noise, so differences are paired: one
resample of triple indices is applied to both modes at once.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.stats import DegenerateDataWarning, bootstrap

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


STATISTICS = ("class_de2000_reduction", "controllability_difference", "miou_difference")


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
    differences a - b in controllability and in mIoU points, with 95% percentile intervals.

    ``scipy.stats.bootstrap(paired=True)`` draws the resamples of triple indices (one draw serves
    both modes) from ``default_rng(seed)``. Resamples where a value is undefined (no vehicle to
    control, no class pair) are left out of its interval, as before the switch to scipy.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"compare: need the same non-zero number of triples, got {len(a)} and {len(b)}")
    n = len(a)
    stacked_a, stacked_b = _stack(a), _stack(b)

    def differences(weights: np.ndarray) -> np.ndarray:
        """(3, B): the three compared values for each weighting (row) of the triples."""
        sa, sb = _statistics(weights, *stacked_a), _statistics(weights, *stacked_b)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.stack([1.0 - sa[:, 0] / sb[:, 0], sa[:, 1] - sb[:, 1], sa[:, 2] - sb[:, 2]])

    def resampled(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        # idx: (B, n) triple indices of B resamples -> how often each triple is drawn.
        idx = np.moveaxis(idx, axis, -1).reshape(-1, n)
        counts = np.zeros((len(idx), n))
        np.add.at(counts, (np.arange(len(idx))[:, None], idx), 1.0)
        return differences(counts)

    point = differences(np.ones((1, n)))[:, 0]
    if n == 1:  # every resample is the one triple: scipy needs two, the interval is the point
        boot = np.repeat(point[:, None], n_boot, axis=1)
    else:
        with warnings.catch_warnings():
            # A resample with an undefined value makes scipy's own interval NaN, and it warns;
            # those resamples are dropped below.
            warnings.simplefilter("ignore", DegenerateDataWarning)
            boot = bootstrap((np.arange(n),), resampled, n_resamples=n_boot, paired=True, vectorized=True,
                             method="percentile", confidence_level=0.95, rng=seed).bootstrap_distribution
    out = {}
    for name, p, v in zip(STATISTICS, point, boot):
        # scipy's own percentile interval is NaN once a resample is; the finite ones give this
        # (equal to scipy's interval when all are finite: tests/test_library_calls.py).
        finite = v[np.isfinite(v)]
        low, high = (np.percentile(finite, [2.5, 97.5]) if finite.size else (np.nan, np.nan))
        out[name] = Interval(float(p), float(low), float(high))
    return out
