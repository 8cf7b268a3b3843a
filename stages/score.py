"""Score stage (optional): how well a judge segmenter recovers each sample's own label.

Per sample, ``score_miou`` is the mean IoU (trainIds, classes present) between the segmenter's
prediction on the synthesized image and the label the image was generated from. It is a cheap
controllability signal for filtering a dataset; the segmenter comes from evaluation. Failures of
the machine are not scores: an out-of-memory batch is split in halves once, then they leave the
stage (stages/failures.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from amgen_core.image_io import decode_png
from stages.failures import leave_stage, split_once_on_oom

SCORE_COLUMNS = ("score_miou",)


class ScoreUnavailableError(ValueError):
    """score.enabled is set but no usable segmenter exists."""


def segmenter_path(configured: str | None) -> Path:
    if configured:  # a folder or a URI (mirrored once per node)
        from connectors.storage import local_dir

        return Path(local_dir(configured))
    from evaluation.segmenter import DEFAULT_DIR

    return Path(DEFAULT_DIR)


def check_scorer(configured: str | None, where: str = "score.segmenter") -> Path:
    """Fail before any synthesis if scoring was asked for but cannot run."""
    try:
        from evaluation.segmenter import Segmenter
    except ImportError as e:
        raise ScoreUnavailableError(f"score.enabled: the judge segmenter (evaluation) is not installed ({e})") from e
    path = segmenter_path(configured)
    try:
        Segmenter.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ScoreUnavailableError(f"{where}: no usable segmenter at {path} ({e}); "
                                    "train one with `amgen eval segmenter` or set score.enabled: false") from e
    return path


def sample_confusion(pred_train_ids: np.ndarray, label_ids: np.ndarray) -> np.ndarray:
    from evaluation.metrics import confusion_matrix
    from amgen_core.labels import to_train_ids

    return confusion_matrix(pred_train_ids, to_train_ids(label_ids))


def sample_miou(pred_train_ids: np.ndarray, label_ids: np.ndarray) -> float:
    from evaluation.metrics import mean_iou

    return mean_iou(sample_confusion(pred_train_ids, label_ids))


class Scorer:
    """Ray Data batch function: adds ``score_miou`` (NaN for quarantined rows) to sample rows."""

    def __init__(self, segmenter: str | None = None, torch_threads: int | None = None,
                 restart_on_device_error: bool = False):
        import torch
        from evaluation.segmenter import Segmenter

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.model = Segmenter.from_pretrained(segmenter_path(segmenter))
        self.restart_on_device_error = restart_on_device_error  # only for an instance that is a Ray actor

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._scored(batch)
        except Exception as e:  # noqa: BLE001 - classified: bugs re-raised, machine failures for Ray
            leave_stage(e, "score", exit_process=self.restart_on_device_error)
            raise  # leave_stage always raises or exits

    def _scored(self, batch: dict[str, Any]) -> dict[str, Any]:
        n = len(batch["sample_id"])
        cms: dict[int, np.ndarray] = {}
        preds: dict[int, np.ndarray] = {}
        ok = [i for i in range(n) if not batch["error"][i]]
        by_shape: dict[tuple, list[int]] = {}
        images, labels = {}, {}
        for i in ok:
            images[i] = decode_png(bytes(batch["image"][i]), f"sample {batch['sample_id'][i]} image", "rgb")
            labels[i] = decode_png(bytes(batch["label"][i]), f"sample {batch['sample_id'][i]} label", "label")
            by_shape.setdefault(images[i].shape, []).append(i)
        for idx in by_shape.values():
            try:
                predicted = split_once_on_oom(lambda part: self.model.predict(np.stack([images[i] for i in part])), idx)
            except ValueError:  # a size the segmenter cannot take: leave those unscored
                continue
            for j, i in enumerate(idx):
                preds[i] = predicted[j]
                cms[i] = sample_confusion(predicted[j], labels[i])
        out = dict(batch)
        out.update(self._columns(cms, n, preds, labels))
        return out

    def _columns(self, cms: dict[int, np.ndarray], n: int, preds: dict[int, np.ndarray],
                 labels: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
        """The columns this stage adds, from each scored row's confusion matrix (NaN if unscored);
        ``preds`` (trainIds) and ``labels`` (ids) of the scored rows, for a subclass."""
        from evaluation.metrics import mean_iou

        scores = np.full(n, np.nan, np.float64)
        for i, cm in cms.items():
            scores[i] = mean_iou(cm)
        return {"score_miou": scores}
