"""Write stage: sample rows -> whole shards (via connectors.parquet_sink), and the preview grid.

``ShardWriter`` buffers rows per shard and writes a shard the moment every sample planned for it
has come back, synthesized or quarantined. Shards therefore hold a fixed, planned set of samples
and finish in any order; each appears atomically, its quarantined samples first in
``errors/shard-KKKKK.parquet`` (so a finished shard always has its errors on disk), and the rows
the quality gate marked (stages/gate.py) in ``filtered/shard-KKKKK.parquet``.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from amgen_core.labels import colorize
from amgen_core.image_io import decode_png, encode_png
from connectors.filtered_sink import sync_filtered
from connectors.parquet_sink import TRUSTED_LABEL, ShardStats, read_parquet, write_errors, write_shard
from connectors.storage import RemotePath, as_path, write_bytes_atomic

ERROR_FIELDS = ("input_id", "source", "stage", "reason", "path")


class ModelMismatchError(RuntimeError):
    """A resumed run would mix samples of two different models in one dataset."""


def shard_errors_name(shard: int) -> str:
    return f"shard-{shard:05d}"


class ShardWriter:
    """Collects sample rows (as produced by stages.synthesize) and writes complete shards.

    ``num_shards``: the N of every ``train-K-of-N`` name, or a dict shard -> N (None: the stable
    ``train-K`` name of an increment's shard)."""

    def __init__(self, out_dir: str | os.PathLike, expected: dict[int, Sequence[str]], num_shards: int | dict,
                 config_hash: str, optional_columns: Sequence[str] = (), expected_model: str | None = None,
                 on_shard: Callable[[ShardStats, int], None] | None = None):
        self.out = as_path(out_dir)
        self.expected = {s: set(ids) for s, ids in expected.items()}
        self.num_shards, self.config_hash = num_shards, config_hash
        self.optional_columns = tuple(optional_columns)
        self.model = expected_model
        self.on_shard = on_shard
        self.rows: dict[int, list[dict]] = defaultdict(list)
        self.errors: dict[int, list[dict]] = defaultdict(list)
        self.filtered: dict[int, list[dict]] = defaultdict(list)  # rows the gate keeps out of the shard
        self.seen: dict[int, set[str]] = defaultdict(set)
        self.written: dict[int, ShardStats] = {}
        self.synthesized = self.quarantined = self.banks_new = 0
        self.model_seconds = 0.0  # time the actors spent inside the model, summed over samples
        self.model_cpu_seconds = 0.0  # and the CPU time of their processes meanwhile

    def add(self, row: dict[str, Any]) -> ShardStats | None:
        shard, sid = int(row["shard"]), str(row["sample_id"])
        if sid not in self.expected.get(shard, ()):
            raise RuntimeError(f"sample {sid} came back for shard {shard}, which did not plan it")
        if sid in self.seen[shard]:
            return None  # a retried task delivered it twice; the first copy counts
        self.seen[shard].add(sid)
        if row["error"]:
            err = json.loads(row["error"])
            self.errors[shard].append({k: err.get(k) for k in ERROR_FIELDS})
            self.quarantined += 1
        else:
            self._check_model(str(row["model"]))
            if row.get("gate_reason"):
                self.filtered[shard].append({**self._sink_row(row, optional=False), "gate_score": row["gate_score"],
                                             "gate_metric": row["gate_metric"], "gate_threshold": row["gate_threshold"],
                                             "reason": row["gate_reason"]})
            else:
                self.rows[shard].append(self._sink_row(row))
            self.synthesized += 1
            self.banks_new += int(bool(row.get("bank_new", False)))
            self.model_seconds += float(row.get("seconds", 0.0))
            self.model_cpu_seconds += float(row.get("cpu_seconds", 0.0))
        if self.seen[shard] == self.expected[shard]:
            return self._flush(shard)
        return None

    def _check_model(self, model: str) -> None:
        if self.model is None:
            self.model = model
        elif model != self.model:
            raise ModelMismatchError(
                f"{self.out}: samples of model {model} would join a dataset made with {self.model}; "
                "the model weights changed since this folder was started (use another --out or --overwrite)")

    def _sink_row(self, row: dict[str, Any], optional: bool = True) -> dict[str, Any]:
        out = {"sample_id": str(row["sample_id"]), "target_id": str(row["target_id"]),
               "exemplar_id": str(row["exemplar_id"]), "image": bytes(row["image"]), "label": bytes(row["label"]),
               "instance": bytes(row["instance"]) if len(row["instance"]) else None,
               "seed": int(row["seed"]), "augment": str(row["augment"]), "model": str(row["model"]),
               "config_hash": self.config_hash}
        for c in self.optional_columns if optional else ():
            v = row.get(c)
            if c == TRUSTED_LABEL:
                out[c] = bytes(v) if v is not None and len(v) else None
            else:
                out[c] = None if v is None or not np.isfinite(v) else float(v)
        return out

    def _flush(self, shard: int) -> ShardStats:
        if self.errors[shard]:
            write_errors(self.errors.pop(shard), self.out, shard_errors_name(shard))
        sync_filtered(self.filtered.pop(shard, []), self.out, shard)
        total = self.num_shards.get(shard) if isinstance(self.num_shards, dict) else self.num_shards
        stats = write_shard(self.rows.pop(shard, []), self.out, shard, total,
                            optional_columns=self.optional_columns)
        self.written[shard] = stats
        if self.on_shard is not None:
            self.on_shard(stats, shard)
        return stats

    def pending(self) -> list[int]:
        return sorted(s for s in self.expected if s not in self.written)


# ---------------------------------------------------------------- preview

def _upscale(img: np.ndarray, min_height: int = 128) -> np.ndarray:
    """Enlarge an RGB uint8 tile by the smallest whole factor that reaches ``min_height``.

    PIL's nearest filter at a whole factor repeats every pixel f x f times (no centre falls on a
    pixel boundary), the same bytes as ``repeat`` (tests/test_library_calls.py).
    """
    f = max(1, -(-min_height // img.shape[0]))
    if f == 1:
        return img
    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).resize((w * f, h * f), Image.NEAREST))


def _fit(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest-resize to ``hw`` (exemplars can differ in size from their targets).

    Source pixel floor(i * in / out) in exact integers. Not cv2's INTER_NEAREST: it computes the
    same rule in floating point and picks the pixel before an exact boundary for some sizes
    (e.g. 6 -> 34 rows), which would change preview bytes; PIL samples pixel centres instead.
    """
    if img.shape[:2] == hw:
        return img
    rows = (np.arange(hw[0]) * img.shape[0]) // hw[0]
    cols = (np.arange(hw[1]) * img.shape[1]) // hw[1]
    return img[rows[:, None], cols[None, :]]


def preview_samples(out_dir: str | os.PathLike, n: int) -> list[dict[str, Any]]:
    """The first ``n`` samples of the written dataset (shard order, then row order)."""
    rows: list[dict[str, Any]] = []
    for p in sorted((as_path(out_dir) / "data").glob("train-*.parquet"), key=lambda p: p.name):
        t = read_parquet(p, columns=["sample_id", "exemplar_id", "image", "label"])
        rows.extend(t.slice(0, n - len(rows)).to_pylist())
        if len(rows) >= n:
            break
    return rows


def make_preview(samples: Sequence[dict[str, Any]], exemplar_image: Callable[[str, str], np.ndarray | None],
                 pad: int = 2) -> np.ndarray | None:
    """Grid with one row per sample: exemplar | target layout (Cityscapes colours) | output."""
    tiles = []
    for s in samples:
        out = decode_png(s["image"]["bytes"], f"sample {s['sample_id']} image", "rgb")
        lab = decode_png(s["label"]["bytes"], f"sample {s['sample_id']} label", "label")
        hw = out.shape[:2]
        ex = exemplar_image(s["sample_id"], s["exemplar_id"])
        ex = np.zeros_like(out) if ex is None else _fit(ex, hw)
        sep = np.full((hw[0], pad, 3), 255, np.uint8)
        tiles.append(_upscale(np.concatenate([ex, sep, colorize(lab), sep, out], axis=1), min_height=96))
    if not tiles:
        return None
    width = max(t.shape[1] for t in tiles)
    rows = []
    for t in tiles:
        if t.shape[1] < width:
            t = np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0)), constant_values=255)
        rows.extend([t, np.full((pad, width, 3), 255, np.uint8)])
    return np.concatenate(rows[:-1], axis=0)


def write_preview(out_dir: str | os.PathLike, grid: np.ndarray, name: str = "preview.png") -> Path | RemotePath:
    return write_bytes_atomic(as_path(out_dir) / name, encode_png(grid, name))
