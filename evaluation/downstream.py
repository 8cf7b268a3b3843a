"""The downstream test: does a synthetic dataset help a segmenter learn?

Two segmenters with the same architecture, training rule (fixed steps, or until the loss
plateaus: evaluation/plateau.py) and seed: one trained on the real samples, one on the same real
samples plus the synthetic ones. Both are scored on the same held-out real
samples. The caller chooses all three sets (``amgen eval segmenter``: real and held-out toy-town
scenes, an amgen output dataset read through ``connectors.parquet_source``); any layout source
becomes samples through :class:`LayoutSamples`.

The result says what each arm saw: its training set sizes, how many of its draws came from the
real and from the synthetic part, and the held-out ground-truth pixels per class it was scored on.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from amgen_core.labels import NAMES, TRAIN_ID_TO_ID
from evaluation.judge import per_class_table
from evaluation.segmenter_train import (
    ConcatSource,
    SegmenterTrainConfig,
    as_samples,
    batch_indices,
    evaluate_segmenter,
    train_segmenter,
)


class DatasetShapeError(ValueError):
    pass


class LayoutSamples:
    """(image, label) pairs of a layout source (``list_items()`` + ``read_item(item)``, e.g. an amgen
    output dataset opened with ``connectors.parquet_source.ParquetSource``), decoded once and kept
    in memory. ``size_hw`` checks every sample against the real samples' frame."""

    def __init__(self, source, size_hw: tuple[int, int] | None = None, name: str = "synthetic data"):
        self.name = name
        self._source = source
        self._items = source.list_items()
        if not self._items:
            raise DatasetShapeError(f"{name}: the dataset holds no rows")
        self.size = len(self._items)
        self.size_hw = size_hw
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _where(self, i: int) -> str:
        item = self._items[i]
        if not isinstance(item, dict):
            return f"{self.name} item {i}"
        where = str(item.get("path", item.get("item_id", f"{self.name} item {i}")))
        return f"{where} row {item['row']}" if "row" in item else where

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self._cache:
            layout = self._source.read_item(self._items[i])
            if layout.image is None:
                raise DatasetShapeError(f"{self._where(i)}: no image; the downstream test trains on images")
            if self.size_hw is not None and layout.label.shape != tuple(self.size_hw):
                raise DatasetShapeError(f"{self._where(i)}: size {layout.label.shape} differs from the real scenes' "
                                        f"{tuple(self.size_hw)}")
            self._cache[i] = (layout.image, layout.label)
        return self._cache[i]


def pixels_per_class(cm: np.ndarray) -> dict[str, int]:
    """Ground-truth pixels per class of a confusion matrix (rows = ground truth), classes present only."""
    return {NAMES[int(TRAIN_ID_TO_ID[k])]: int(n) for k, n in enumerate(cm.sum(1)) if n}


def draws(size: int, n_real: int, cfg: SegmenterTrainConfig, steps: int | None = None) -> dict[str, int]:
    """How many of a run's training draws (every step, resumed ones too; ``steps`` of them, by
    default ``cfg.steps``) hit the real part (indices below ``n_real``) and the synthetic part."""
    idx = np.concatenate([batch_indices(size, cfg, step) for step in range(cfg.steps if steps is None else steps)])
    return {"real": int((idx < n_real).sum()), "synthetic": int((idx >= n_real).sum())}


def run_downstream(
    real,
    synthetic,
    heldout,
    run_dir: str | Path,
    cfg: SegmenterTrainConfig,
    heldout_n: int = 300,
    log: Callable[[str], None] = print,
    about: dict[str, Any] | None = None,
    save_real_only: str | Path | None = None,
) -> dict[str, Any]:
    """Train both arms and score them. ``real`` and ``synthetic`` are finite, ``heldout`` may be
    endless (its first ``heldout_n`` samples are scored); each is a sample source, a map-style
    dataset or an iterable of (image, label) pairs. ``about`` (how the sets were made) heads the result.
    ``save_real_only``: also save the real-only segmenter there (a ``score.segmenter`` folder: a
    judge that has seen only the real data, for the gate's ``label_trusted``)."""
    run_dir = Path(run_dir)
    real, synthetic, heldout = as_samples(real), as_samples(synthetic), as_samples(heldout)
    for name, part in (("real", real), ("synthetic", synthetic)):
        if not part.size:
            raise ValueError(f"downstream test: the {name} training data must be finite and non-empty (size {part.size})")
    result: dict[str, Any] = dict(about or {})
    result.update({"n_real": real.size, "n_synthetic": synthetic.size, "heldout_n": heldout_n,
                   "train_config": asdict(cfg)})
    arms = (("real_only", ConcatSource(real), 0), ("real_plus_synthetic", ConcatSource(real, synthetic), synthetic.size))
    for name, source, n_synthetic in arms:
        log(f"training {name} on {source.size} samples")
        t0 = time.time()
        model = train_segmenter(source, run_dir / name, cfg, log=log)
        acc = evaluate_segmenter(model, heldout, heldout_n)
        if name == "real_only" and save_real_only is not None:
            model.save_pretrained(save_real_only)
            log(f"real_only segmenter saved to {save_real_only}")
        result[name] = {"miou": round(100 * acc.miou(), 2), "iou_per_class": per_class_table(acc.per_class()),
                        "train_samples": {"real": real.size, "synthetic": n_synthetic},
                        "draws": draws(source.size, real.size, cfg, model.training_record["steps"]),
                        "training": model.training_record,
                        "heldout_pixels_per_class": pixels_per_class(acc.cm),
                        "seconds": round(time.time() - t0, 1)}
        log(f"{name}: held-out mIoU {result[name]['miou']:.2f}%")
    result["delta_miou"] = round(result["real_plus_synthetic"]["miou"] - result["real_only"]["miou"], 2)
    return result
