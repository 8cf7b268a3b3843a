"""The downstream test: does an amgen dataset help a segmenter learn?

Two segmenters with the same architecture, steps and seed: one trained on a small set of real
toy-town scenes, one on the same real scenes plus an amgen output dataset (Parquet shards with
``image`` and ``label``). Both are scored on held-out real toy-town scenes.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from evaluation.judge import per_class_table
from evaluation.segmenter_train import (
    SEGMENTER_HELDOUT_SEED_BASE,
    SEGMENTER_TRAIN_SEED_BASE,
    ConcatSource,
    SegmenterTrainConfig,
    ToyTownScenes,
    evaluate_segmenter,
    train_segmenter,
)


class DatasetShapeError(ValueError):
    pass


class ParquetSamples:
    """(image, label) pairs of an amgen output dataset, decoded once and kept in memory."""

    def __init__(self, path: str | Path, size_hw: tuple[int, int] | None = None):
        from connectors.parquet_source import ParquetSource

        self.path = Path(path)
        self._source = ParquetSource(self.path)
        self._items = self._source.list_items()
        if not self._items:
            raise DatasetShapeError(f"{self.path}: the dataset holds no rows")
        self.size = len(self._items)
        self.size_hw = size_hw
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self._cache:
            item = self._items[i]
            layout = self._source.read_item(item)
            where = f"{item['file']} row {item['row']}"
            if layout.image is None:
                raise DatasetShapeError(f"{where}: no image; the downstream test trains on images")
            if self.size_hw is not None and layout.label.shape != tuple(self.size_hw):
                raise DatasetShapeError(f"{where}: size {layout.label.shape} differs from the real scenes' {self.size_hw}")
            self._cache[i] = (layout.image, layout.label)
        return self._cache[i]


def run_downstream(
    dataset: str | Path,
    run_dir: str | Path,
    cfg: SegmenterTrainConfig,
    real_n: int = 200,
    heldout_n: int = 300,
    height: int = 64,
    width: int = 128,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    run_dir = Path(run_dir)
    real = ToyTownScenes(SEGMENTER_TRAIN_SEED_BASE, height, width, limit=real_n)
    synthetic = ParquetSamples(dataset, (height, width))
    heldout = ToyTownScenes(SEGMENTER_HELDOUT_SEED_BASE, height, width)
    result: dict[str, Any] = {
        "dataset": str(dataset), "n_real": real_n, "n_synthetic": synthetic.size, "heldout_n": heldout_n,
        "train_config": asdict(cfg),
        "real_scenes": f"default_rng({SEGMENTER_TRAIN_SEED_BASE} + i), i < {real_n}",
        "heldout_scenes": f"default_rng({SEGMENTER_HELDOUT_SEED_BASE} + i), i < {heldout_n}",
    }
    for name, source in (("real_only", ConcatSource(real)), ("real_plus_synthetic", ConcatSource(real, synthetic))):
        log(f"training {name} on {source.size} samples")
        t0 = time.time()
        model = train_segmenter(source, run_dir / name, cfg, log=log)
        acc = evaluate_segmenter(model, heldout, heldout_n)
        result[name] = {"miou": round(100 * acc.miou(), 2), "iou_per_class": per_class_table(acc.per_class()),
                        "seconds": round(time.time() - t0, 1)}
        log(f"{name}: held-out mIoU {result[name]['miou']:.2f}%")
    result["delta_miou"] = round(result["real_plus_synthetic"]["miou"] - result["real_only"]["miou"], 2)
    return result
