"""Training the committed judge segmenter (``amgen eval train-segmenter``) and scoring it.

The judge learns from the training scenes it is given and is scored on the held-out ones; the
committed judge: real toy-town renderings over all domains from one seed range, scored on a
disjoint range (the CLI passes both). Its held-out mIoU is stored in its config's ``meta``.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from evaluation.segmenter import DEFAULT_DIR, Segmenter, num_parameters
from evaluation.segmenter_train import SegmenterTrainConfig, evaluate_segmenter, train_segmenter
from amgen_core.labels import NAMES, TRAIN_ID_TO_ID


def per_class_table(iou) -> dict[str, float]:
    return {NAMES[int(TRAIN_ID_TO_ID[k])]: round(float(v), 4) for k, v in enumerate(iou) if v == v}


def train_judge(
    cfg: SegmenterTrainConfig,
    train,
    heldout,
    run_dir: str | Path,
    out_dir: str | Path = DEFAULT_DIR,
    heldout_n: int = 500,
    log: Callable[[str], None] = print,
    about: dict[str, Any] | None = None,
) -> Segmenter:
    """Train on ``train``, score on the first ``heldout_n`` of ``heldout`` (sample sources or
    datasets, see evaluation.segmenter_train.as_samples), save. ``about`` (what the data is,
    which scenes) goes into the saved meta ahead of the measured numbers."""
    t0 = time.time()
    model = train_segmenter(train, run_dir, cfg, log=log)
    train_s = time.time() - t0
    acc = evaluate_segmenter(model, heldout, heldout_n)
    model.config.meta = {
        **(about or {}),
        "train_config": asdict(cfg),
        "train_seconds_this_session": round(train_s, 1),
        "parameters": num_parameters(model),
        "heldout_miou": round(100 * acc.miou(), 2),
        "heldout_iou_per_class": per_class_table(acc.per_class()),
    }
    model.save_pretrained(out_dir)
    log(f"held-out mIoU {model.config.meta['heldout_miou']:.2f}% on {heldout_n} scenes; saved to {out_dir}")
    return model
