"""Gate stage (optional, ``gate.enabled``): keep only samples whose rendering agrees with their label.

The agreement score is the judge's per-sample mIoU (``stages.score``: the judge segmenter's
prediction on the rendering against the label it was generated from, trainIds, classes present in
either). It is the measure the issue names and the one the quality benchmark reports, and its
mean over classes present gives a car or a bus the label says is there the same weight as the
road: a rendering that leaves the layout's objects out loses those classes whole and scores low,
which a pixel accuracy (dominated by road, building and sky) would hardly notice.

``judge_thing_miou`` is the same mean over the thing classes only (person, rider and the
vehicles: cityscapesscripts' ``hasInstances``) present in the label or the prediction, the whole
mIoU for a scene without any: the failure it targets is a rendering that draws the road and the
buildings but not the layout's objects, which the all-class mean dilutes with the easy classes.

A sample under ``gate.threshold``, or one the judge cannot score, is marked with its reason; the
shard writer (stages/write.py) sends marked rows to ``filtered/`` instead of the shard. The stage
replaces the score stage when both are on (it adds ``score_miou`` too), so the judge runs once.

``gate.label_trusted`` goes below the sample: a kept rendering usually draws most of its layout
and misses a few things (a bus drawn as road). ``label_trusted`` is the label with the pixels the
judge segments as another class set to 0 (unlabeled: trainId 255, which segmentation losses
ignore), so a segmenter trained on it never learns that a night bus looks like road. FreeMask
filters synthetic pixels the same way, by a segmenter's disagreement (docs/adaptation.md measures
it, with this judge and with one trained on the run's own real data only).
"""
from __future__ import annotations

import numpy as np

from amgen_core.image_io import encode_png
from amgen_core.labels import ID_TO_TRAIN_ID, IGNORE_TRAIN_ID, THING_IDS, to_train_ids
from connectors.parquet_sink import TRUSTED_LABEL
from stages.score import Scorer

GATE_ROW_COLUMNS = ("gate_score", "gate_metric", "gate_threshold", "gate_reason")
METRICS = ("judge_miou", "judge_thing_miou")


THING_TRAIN_IDS = np.array(sorted({int(ID_TO_TRAIN_ID[i]) for i in THING_IDS} - {IGNORE_TRAIN_ID}))


def thing_miou(cm: np.ndarray) -> float:
    """Mean IoU over the thing classes that occur; the all-class mean where none does."""
    from evaluation.metrics import iou_per_class, mean_iou

    iou = iou_per_class(cm)[THING_TRAIN_IDS]
    present = iou[np.isfinite(iou)]
    return float(present.mean()) if present.size else mean_iou(cm)


def trusted_label(label: np.ndarray, pred_train_ids: np.ndarray) -> np.ndarray:
    """``label`` (ids) with every pixel whose class the judge's prediction (trainIds) disagrees with
    set to 0 (unlabeled). Pixels already ignored stay as they are."""
    train = to_train_ids(label)
    out = label.copy()
    out[(pred_train_ids != train) & (train != IGNORE_TRAIN_ID)] = 0
    return out


def gate_reason(score: float, threshold: float) -> str:
    """'' to keep the sample, else why it leaves (connectors.filtered_sink.REASONS)."""
    if not np.isfinite(score):
        return "unscored"
    return "below_threshold" if score < threshold else ""


class GateScorer(Scorer):
    """Ray Data batch function: the score stage's ``score_miou`` and the gate's decision per row
    (quarantined rows pass untouched: they go to errors/, not through the gate)."""

    def __init__(self, segmenter: str | None = None, torch_threads: int | None = None,
                 restart_on_device_error: bool = False, metric: str = "judge_miou", threshold: float = 0.3,
                 label_trusted: bool = False):
        super().__init__(segmenter, torch_threads, restart_on_device_error)
        if metric not in METRICS:
            raise ValueError(f"gate.metric: unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
        self.metric, self.threshold, self.label_trusted = metric, float(threshold), bool(label_trusted)

    def _columns(self, cms: dict[int, np.ndarray], n: int, preds: dict[int, np.ndarray],
                 labels: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
        out = super()._columns(cms, n, preds, labels)
        if self.metric == "judge_miou":
            out["gate_score"] = out["score_miou"]
        else:
            out["gate_score"] = np.full(n, np.nan, np.float64)
            for i, cm in cms.items():
                out["gate_score"][i] = thing_miou(cm)
        out["gate_metric"] = np.array([self.metric] * n, dtype=object)
        out["gate_threshold"] = np.full(n, self.threshold, np.float64)
        # ``labels`` holds the rows that reached the judge: a quarantined one has none and passes untouched
        reasons = ["" if i not in labels else gate_reason(out["gate_score"][i], self.threshold) for i in range(n)]
        out["gate_reason"] = np.array(reasons, dtype=object)
        if self.label_trusted:  # PNG bytes for the rows the gate keeps; b"" for the rest (never in a shard)
            out[TRUSTED_LABEL] = np.array([encode_png(trusted_label(labels[i], preds[i]), "label_trusted")
                                           if i in labels and not reasons[i] else b"" for i in range(n)], dtype=object)
        return out
