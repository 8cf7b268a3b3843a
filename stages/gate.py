"""Gate stage (optional, ``gate.enabled``): keep only samples whose rendering agrees with their label.

The agreement score is the judge's per-sample mIoU (``stages.score``: the judge segmenter's
prediction on the rendering against the label it was generated from, trainIds, classes present in
either). It is the measure the issue names and the one the quality benchmark reports, and its
mean over classes present gives a car or a bus the label says is there the same weight as the
road: a rendering that leaves the layout's objects out loses those classes whole and scores low,
which a pixel accuracy (dominated by road, building and sky) would hardly notice.

A sample under ``gate.threshold``, or one the judge cannot score, is marked with its reason; the
shard writer (stages/write.py) sends marked rows to ``filtered/`` instead of the shard. The stage
replaces the score stage when both are on (it adds ``score_miou`` too), so the judge runs once.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from stages.score import Scorer

GATE_ROW_COLUMNS = ("gate_score", "gate_metric", "gate_threshold", "gate_reason")


def gate_reason(score: float, threshold: float) -> str:
    """'' to keep the sample, else why it leaves (connectors.filtered_sink.REASONS)."""
    if not np.isfinite(score):
        return "unscored"
    return "below_threshold" if score < threshold else ""


class GateScorer(Scorer):
    """Ray Data batch function: the score stage's ``score_miou`` and the gate's decision per row
    (quarantined rows pass untouched: they go to errors/, not through the gate)."""

    def __init__(self, segmenter: str | None = None, torch_threads: int | None = None,
                 restart_on_device_error: bool = False, metric: str = "judge_miou", threshold: float = 0.3):
        super().__init__(segmenter, torch_threads, restart_on_device_error)
        if metric != "judge_miou":
            raise ValueError(f"gate.metric: unknown metric {metric!r}; expected judge_miou")
        self.metric, self.threshold = metric, float(threshold)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = super().__call__(batch)
        scores = np.asarray(out["score_miou"], np.float64)
        n = len(scores)
        out["gate_score"] = scores
        out["gate_metric"] = np.array([self.metric] * n, dtype=object)
        out["gate_threshold"] = np.full(n, self.threshold, np.float64)
        out["gate_reason"] = np.array(["" if batch["error"][i] else gate_reason(scores[i], self.threshold)
                                       for i in range(n)], dtype=object)
        return out
