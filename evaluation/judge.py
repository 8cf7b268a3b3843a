"""Training the committed judge segmenter (``amgen eval train-segmenter``) and scoring it.

The judge learns from real toy-town renderings over all domains, drawn from one seed range,
and is scored on a disjoint range; its held-out mIoU is stored in its config's ``meta``.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from evaluation.segmenter import DEFAULT_DIR, Segmenter, num_parameters
from evaluation.segmenter_train import (
    SEGMENTER_HELDOUT_SEED_BASE,
    SEGMENTER_TRAIN_SEED_BASE,
    SegmenterTrainConfig,
    ToyTownScenes,
    evaluate_segmenter,
    train_segmenter,
)
from amgen_core.labels import NAMES, TRAIN_ID_TO_ID


def per_class_table(iou) -> dict[str, float]:
    return {NAMES[int(TRAIN_ID_TO_ID[k])]: round(float(v), 4) for k, v in enumerate(iou) if v == v}


def train_judge(
    cfg: SegmenterTrainConfig,
    run_dir: str | Path,
    out_dir: str | Path = DEFAULT_DIR,
    heldout_n: int = 500,
    log: Callable[[str], None] = print,
) -> Segmenter:
    """Train on ToyTownScenes(SEGMENTER_TRAIN_SEED_BASE), score on the held-out range, save."""
    t0 = time.time()
    model = train_segmenter(ToyTownScenes(SEGMENTER_TRAIN_SEED_BASE), run_dir, cfg, log=log)
    train_s = time.time() - t0
    acc = evaluate_segmenter(model, ToyTownScenes(SEGMENTER_HELDOUT_SEED_BASE), heldout_n)
    model.config.meta = {
        "data": "toy-town real renderings, layouts and appearances over all domains, made on the fly",
        "train_scenes": f"np.random.default_rng({SEGMENTER_TRAIN_SEED_BASE} + i), i in [0, {cfg.steps * cfg.batch_size})",
        "heldout_scenes": f"np.random.default_rng({SEGMENTER_HELDOUT_SEED_BASE} + i), i in [0, {heldout_n})",
        "train_config": asdict(cfg),
        "train_seconds_this_session": round(train_s, 1),
        "parameters": num_parameters(model),
        "heldout_miou": round(100 * acc.miou(), 2),
        "heldout_iou_per_class": per_class_table(acc.per_class()),
    }
    model.save_pretrained(out_dir)
    log(f"held-out mIoU {model.config.meta['heldout_miou']:.2f}% on {heldout_n} scenes; saved to {out_dir}")
    return model
