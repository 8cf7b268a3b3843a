"""The sample rows of pass 2 (what the model actors return), and their PNG encoding.

Apart from stages/synthesize.py so that the tasks around the model (the load task that encodes the
PNGs, the writers) never import torch: Ray starts such tasks in fresh worker processes, and each
start would pay for importing it.
"""
from __future__ import annotations

import numpy as np

from amgen_core.image_io import encode_png

SAMPLE_COLUMNS = ("sample_id", "shard", "position", "target_id", "exemplar_id", "image", "label", "instance",
                  "seed", "augment", "model", "error", "bank_new", "seconds", "cpu_seconds")


def png_or_empty(array: np.ndarray | None) -> bytes:
    """PNG bytes, or b"" where there is no array (a quarantined sample, no instance map)."""
    return b"" if array is None else encode_png(array)


def encode_pngs(rows: dict[str, list]) -> dict[str, list]:
    """Sample rows (columns) with image, label and instance arrays -> the same with PNG bytes."""
    for col in ("image", "label", "instance"):
        rows[col] = [png_or_empty(a) for a in rows[col]]
    return rows
