"""The quality gate's table: samples a run made but kept out of the dataset, never lost.

    OUT/filtered/shard-{k:05d}.parquet   the samples shard k's gate filtered (schema: ``FILTERED_SCHEMA``)

A row is the sample as the shard would have held it (image, label, instance, ids, seed, augment,
model, config hash) plus why it left: ``gate_score`` (null when it could not be scored),
``gate_metric``, ``gate_threshold`` and ``reason``. The file is written atomically before its
shard (as errors/ is), so a finished shard always has its filtered rows on disk, and a remade
shard rewrites it whole. The images are HF Image columns: ``load_dataset("parquet",
data_dir="OUT/filtered")`` reads them like the dataset itself.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import Features, Value

from amgen_core.labels import NUM_IDS
from connectors.parquet_sink import (
    IMAGE_COLUMNS, MAX_ROW_GROUP, SinkError, _encode_row, _write_parquet_atomic, read_parquet,
    sample_features,
)
from connectors.storage import RemotePath, as_path

FILTERED_DIR = "filtered"
GATE_COLUMNS = ("gate_score", "gate_metric", "gate_threshold", "reason")
REASONS = ("below_threshold", "unscored")  # scored under the threshold; no score (a size the judge cannot take)


def filtered_features() -> Features:
    feats = dict(sample_features())
    feats.update(gate_score=Value("float64"), gate_metric=Value("string"), gate_threshold=Value("float64"),
                 reason=Value("string"))
    return Features(feats)


FILTERED_SCHEMA = filtered_features().arrow_schema


def filtered_name(shard: int) -> str:
    return f"shard-{shard:05d}.parquet"


def write_filtered(rows: Iterable[Mapping[str, Any]], out_dir: str | os.PathLike, shard: int) -> RemotePath | Any:
    """Write shard ``shard``'s filtered samples (sorted by sample_id, atomic); returns the path.
    A row has the sample columns (``write_shard``'s, no score columns) and ``GATE_COLUMNS``."""
    encoded = []
    pixels = np.zeros(NUM_IDS, np.int64)  # _encode_row counts label pixels; the filtered table keeps none
    for r in rows:
        sample = {k: v for k, v in r.items() if k not in GATE_COLUMNS}
        missing = [k for k in GATE_COLUMNS if k not in r]
        if missing:
            raise SinkError(f"filtered sample {r.get('sample_id')}: missing {missing}")
        if r["reason"] not in REASONS:
            raise SinkError(f"filtered sample {r.get('sample_id')}: reason {r['reason']!r} is not one of {REASONS}")
        row = _encode_row(sample, (), pixels)
        score = r["gate_score"]
        row.update(gate_score=None if score is None or not np.isfinite(score) else float(score),
                   gate_metric=str(r["gate_metric"]), gate_threshold=float(r["gate_threshold"]), reason=str(r["reason"]))
        encoded.append(row)
    encoded.sort(key=lambda r: r["sample_id"])
    table = pa.Table.from_pylist(encoded, schema=FILTERED_SCHEMA)
    path = as_path(out_dir) / FILTERED_DIR / filtered_name(shard)
    stats_cols = [n for n in FILTERED_SCHEMA.names if n not in IMAGE_COLUMNS]
    _write_parquet_atomic(table, path, MAX_ROW_GROUP, stats_cols)
    return path


def filtered_files(out_dir: str | os.PathLike) -> list:
    d = as_path(out_dir) / FILTERED_DIR
    return sorted(d.glob("shard-*.parquet"), key=str) if d.is_dir() else []


def filtered_counts(out_dir: str | os.PathLike) -> dict[str, int]:
    """Filtered samples on disk by reason (reads the reason column only)."""
    counts: dict[str, int] = {}
    for p in filtered_files(out_dir):
        for reason in read_parquet(p, columns=["reason"]).column("reason").to_pylist():
            counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items()))


def sync_filtered(rows: list[Mapping[str, Any]], out_dir: str | os.PathLike, shard: int) -> None:
    """Shard ``shard``'s filtered table as ``rows`` say: written when there are any; otherwise a
    file an earlier attempt at this shard left is removed, so filtered/ matches the shards."""
    if rows:
        write_filtered(rows, out_dir, shard)
        return
    stale = as_path(out_dir) / FILTERED_DIR / filtered_name(shard)
    if stale.exists():
        stale.unlink()
