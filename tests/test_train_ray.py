"""The same config under Ray Train's TorchTrainer with 2 CPU workers (DDP).

Starting Ray and two torch workers takes 40-100 s on the shared 2-core box, over the suite's
budget, so this runs only with AMGEN_SLOW_TESTS=1 (`AMGEN_SLOW_TESTS=1 pytest tests/test_train_ray.py`).
"""
from __future__ import annotations

import os

import pytest

from training.loop import latest_checkpoint, read_loss_log, run_training
from training.registry import load_train_config
from training.sources import training_data

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("AMGEN_SLOW_TESTS") != "1", reason="starts Ray: set AMGEN_SLOW_TESTS=1"),
]


def test_two_cpu_workers_train_and_checkpoint(tmp_path):
    import ray

    cfg = load_train_config("vae", None, [
        "steps=3", "batch_size=2", "data.height=32", "data.width=64", "scale_images=8", "torch_threads=1",
        "num_workers=2", "checkpoint_every=2", f"out_dir={tmp_path / 'ray'}"])
    try:
        summary = run_training(cfg, training_data(cfg.data))  # each worker gets a pickled copy
    finally:
        ray.shutdown()
    assert summary.steps_run == 3 and summary.end_step == 3
    assert latest_checkpoint(tmp_path / "ray").name == "step-0000003"
    rows = read_loss_log(tmp_path / "ray" / "loss.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]  # rank 0 logs, once per step
    assert (tmp_path / "ray" / "vae" / "config.json").is_file()
