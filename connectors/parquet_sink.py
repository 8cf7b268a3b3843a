"""The output dataset writer: HF-datasets-loadable Parquet shards, errors, dataset card, manifest.

    OUT/data/train-{k:05d}-of-{N:05d}.parquet   samples (schema: ``sample_schema``) of a run's first plan
    OUT/data/train-{k:05d}.parquet              samples added by a later increment (a stable name: it
                                                does not depend on how many shards there are)
    OUT/errors/{name}.parquet                   quarantined inputs (schema: ``ERROR_SCHEMA``)
    OUT/README.md                               dataset card, YAML header read by ``load_dataset(OUT)``
    OUT/manifest.json                           run record; ``shards`` is a list of ``ShardStats.to_dict()``

Every file appears atomically (hidden temp name in the same folder, then published by rename; on
object storage by a server-side copy, see connectors/storage.py), so a killed run leaves either a
whole shard or none. ``out_dir`` is a local path or a URI (``s3://bucket/out``). A shard's bytes depend only on its rows: rows are
sorted by ``sample_id``, PNGs are encoded deterministically and Parquet carries no timestamps.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features, Image, Value
from datasets.info import DatasetInfo, DatasetInfosDict
from huggingface_hub import DatasetCardData

from amgen_core.labels import NUM_IDS, NAMES, check_label_ids
from cityscapesscripts.helpers.labels import id2label
from amgen_core.image_io import (
    SizeMismatchError, decode_image_bytes, encode_png, image_size, write_bytes_atomic,
)
from amgen_core.quarantine import quarantine_row
from connectors.storage import RemotePath, arrow_target, as_path, publish_atomic
from connectors.storage import file_sha256  # noqa: F401  (re-exported: verify, resume and tests read it here)
from connectors.storage import write_bytes_atomic as _write_bytes_atomic

DATA_DIR, ERRORS_DIR = "data", "errors"
CARD_NAME, MANIFEST_NAME = "README.md", "manifest.json"
SHARD_RE = re.compile(r"^train-(\d{5})(?:-of-(\d{5}))?\.parquet$")  # [1] index, [2] total (or None)
SCORE_PREFIX = "score_"
MAX_ROW_GROUP = 100  # HF guidance for image datasets: small row groups keep random access cheap
IMAGE_COLUMNS = ("image", "label", "instance")
# Optional: ``label`` with the pixels the quality gate's judge reads as another class set to 0
# (unlabeled, trainId 255: ignored in training); written with gate.label_trusted (stages/gate.py).
TRUSTED_LABEL = "label_trusted"
REQUIRED_COLUMNS = ("sample_id", "target_id", "exemplar_id", "image", "label", "seed", "augment",
                    "model", "config_hash")
_PARQUET_OPTIONS = dict(compression="zstd", compression_level=3, version="2.6",
                        data_page_version="1.0", write_page_index=False)


class SinkError(ValueError):
    """A row or an argument the sink cannot write."""


# ---------------------------------------------------------------- schema

def sample_features(optional_columns: Sequence[str] = ()) -> Features:
    """The HF features of a sample row. Optional columns: scores (float64, named ``score_*``) and
    ``label_trusted`` (an Image, after the required columns)."""
    feats = {
        "sample_id": Value("string"), "target_id": Value("string"), "exemplar_id": Value("string"),
        "image": Image(), "label": Image(), "instance": Image(),
        "seed": Value("int64"), "augment": Value("string"), "model": Value("string"),
        "config_hash": Value("string"),
    }
    for name in optional_columns:
        if name == TRUSTED_LABEL:
            feats[name] = Image()
        elif not name.startswith(SCORE_PREFIX) or name in feats:
            raise SinkError(f"optional column {name!r}: expected {TRUSTED_LABEL!r} or a score named {SCORE_PREFIX}*")
        else:
            feats[name] = Value("float64")
    return Features(feats)


def sample_schema(optional_columns: Sequence[str] = ()) -> pa.Schema:
    """Arrow schema with the b"huggingface" metadata that makes ``datasets`` decode Image columns."""
    return sample_features(optional_columns).arrow_schema


SAMPLE_SCHEMA = sample_schema()

ERROR_SCHEMA = pa.schema([
    pa.field("input_id", pa.string(), nullable=False), pa.field("source", pa.string()),
    pa.field("stage", pa.string(), nullable=False), pa.field("reason", pa.string(), nullable=False),
    pa.field("path", pa.string()),
])


def shard_name(index: int, total: int | None) -> str:
    """``total`` None: the stable name of an increment's shard."""
    return f"train-{index:05d}.parquet" if total is None else f"train-{index:05d}-of-{total:05d}.parquet"


def shard_path(out_dir: str | os.PathLike, index: int, total: int | None) -> Path | RemotePath:
    return as_path(out_dir) / DATA_DIR / shard_name(index, total)


# ---------------------------------------------------------------- shard stats

@dataclass
class ShardStats:
    name: str                 # relative to OUT, e.g. "data/train-00000-of-00004.parquet"
    index: int
    total: int                # 0 for a stable name (an increment's shard)
    rows: int
    bytes: int
    sha256: str
    row_groups: int
    label_pixels: list[int] = field(default_factory=list)  # pixel count per Cityscapes id 0..33
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ShardStats":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _label_pixels(label: np.ndarray) -> np.ndarray:
    return np.bincount(label.ravel(), minlength=256)[:NUM_IDS].astype(np.int64)


def shard_stats_from_file(path: str | os.PathLike) -> ShardStats:
    """Recompute a finished shard's stats from the file (resume after a crash lost the manifest)."""
    p = as_path(path)
    m = SHARD_RE.match(p.name)
    if not m:
        raise SinkError(f"{p}: not a shard name (expected train-KKKKK-of-NNNNN.parquet)")
    pf = pq.ParquetFile(p.open_input() if isinstance(p, RemotePath) else p)
    pixels = np.zeros(NUM_IDS, np.int64)
    for batch in pf.iter_batches(columns=["label"]):
        for cell in batch.column(0).to_pylist():
            pixels += _label_pixels(decode_image_bytes(cell["bytes"], f"{p} label", "label"))
    return ShardStats(name=f"{DATA_DIR}/{p.name}", index=int(m[1]), total=int(m[2] or 0),
                      rows=pf.metadata.num_rows, bytes=p.stat().st_size, sha256=file_sha256(p),
                      row_groups=pf.metadata.num_row_groups, label_pixels=pixels.tolist())


# ---------------------------------------------------------------- rows -> arrow

def _image_cell(value, where: str, kind: str) -> tuple[dict | None, np.ndarray | None, tuple[int, int] | None]:
    """A row's image-like value -> (HF Image struct, decoded array if we had/needed one, (h, w))."""
    if value is None:
        return None, None, None
    if isinstance(value, Mapping):  # an HF Image struct already
        value = value.get("bytes")
        if value is None:
            raise SinkError(f"{where}: Image struct without bytes")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        arr = decode_image_bytes(data, where, "label") if kind == "label" else None
        return {"bytes": data}, arr, (arr.shape[:2] if arr is not None else image_size(data, where))
    arr = np.asarray(value)
    if kind == "label":
        arr = check_label_ids(arr, where)
    elif kind == "instance":
        if arr.ndim != 2:
            raise SinkError(f"{where}: instance map must be HxW, got shape {arr.shape}")
        arr = arr.astype(np.int32)  # always a 16-bit PNG, whatever the values
    elif arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise SinkError(f"{where}: image must be HxWx3 uint8, got {arr.shape} {arr.dtype}")
    return {"bytes": encode_png(arr, where)}, arr, arr.shape[:2]


def _augment_json(value, where: str) -> str:
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError as e:
            raise SinkError(f"{where}: augment is not valid JSON ({e})") from e
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _encode_row(row: Mapping[str, Any], optional_columns: Sequence[str], pixels: np.ndarray) -> dict[str, Any]:
    sid = row.get("sample_id")
    where = f"sample {sid}"
    missing = [k for k in REQUIRED_COLUMNS if k not in row]
    unknown = [k for k in row if k not in REQUIRED_COLUMNS and k != "instance" and k not in optional_columns]
    if missing or unknown:
        raise SinkError(f"{where}: missing columns {missing}, unexpected columns {unknown}"
                        f" (optional columns of this run: {list(optional_columns)})")
    out: dict[str, Any] = {k: str(row[k]) for k in ("sample_id", "target_id", "exemplar_id", "model", "config_hash")}
    for col in ("image", "label"):
        if row[col] is None:
            raise SinkError(f"{where}: {col} is None")
    sizes = {}
    for col in (*IMAGE_COLUMNS, *(c for c in optional_columns if c == TRUSTED_LABEL)):
        cell, arr, size = _image_cell(row.get(col), f"{where} {col}", "label" if col == TRUSTED_LABEL else col)
        out[col] = None if cell is None else {"bytes": cell["bytes"], "path": f"{sid}_{col}.png"}
        if size is not None:
            sizes[col] = tuple(size)
        if col == "label":
            pixels += _label_pixels(arr)
    if len(set(sizes.values())) > 1:
        raise SizeMismatchError(f"{where}: image/label/instance/{TRUSTED_LABEL} sizes differ {sizes}")
    out["seed"] = int(row["seed"])
    out["augment"] = _augment_json(row["augment"], where)
    for name in optional_columns:
        if name != TRUSTED_LABEL:
            v = row.get(name)
            out[name] = None if v is None else float(v)
    return out


class _HashingStream:
    """A write-only file object that hashes and counts what passes through, so a shard's sha256
    and size need no second read (which, on object storage, would be a second download)."""

    def __init__(self, raw):
        self.raw, self.sha, self.size, self.closed = raw, hashlib.sha256(), 0, False

    def write(self, data) -> int:
        self.raw.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _write_parquet_atomic(table: pa.Table, path: Path | RemotePath, row_group_size: int,
                          stats_columns: list[str]) -> tuple[int, str]:
    """Write ``table`` under a hidden temp name (the data/train-* glob skips it), publish it as
    ``path``; returns (bytes, sha256) of the published file."""
    digest: dict[str, Any] = {}

    def write(tmp) -> None:
        target, fs = arrow_target(tmp)
        raw = fs.open_output_stream(target) if fs is not None else open(target, "wb")
        with raw:
            stream = _HashingStream(raw)
            with pq.ParquetWriter(stream, table.schema, write_statistics=stats_columns, **_PARQUET_OPTIONS) as w:
                # An empty shard gets no row group at all: datasets fails on a 0-row row group.
                if table.num_rows:
                    w.write_table(table, row_group_size=row_group_size)
        digest.update(size=stream.size, sha256=stream.sha.hexdigest())

    publish_atomic(path, write)
    return digest["size"], digest["sha256"]


def write_shard(rows: Iterable[Mapping[str, Any]], out_dir: str | os.PathLike, index: int, total: int | None,
                row_group_size: int = MAX_ROW_GROUP, optional_columns: Sequence[str] = ()) -> ShardStats:
    """Write ``rows`` as shard ``index`` of ``total``; returns its stats. Rows are sorted by sample_id.

    A row holds the columns of ``sample_schema(optional_columns)``; image/label/instance may be arrays
    (HxWx3 uint8, HxW uint8 ids, HxW int instance ids), PNG bytes or HF Image structs; ``augment``
    a dict or a JSON string; ``instance``, ``label_trusted`` and scores may be missing or None. Every run must pass the
    same ``optional_columns`` to every shard so all shards share one schema.
    """
    t0 = time.perf_counter()
    if index < 0 or (total is not None and index >= total):
        raise SinkError(f"shard index {index} outside 0..{(total or 0) - 1}")
    if not 1 <= row_group_size <= MAX_ROW_GROUP:
        raise SinkError(f"row_group_size must be in 1..{MAX_ROW_GROUP}, got {row_group_size}")
    schema = sample_schema(optional_columns)
    pixels = np.zeros(NUM_IDS, np.int64)
    encoded = sorted((_encode_row(r, optional_columns, pixels) for r in rows), key=lambda r: r["sample_id"])
    ids = [r["sample_id"] for r in encoded]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise SinkError(f"shard {index}: duplicate sample_id(s) {dup[:5]}")
    table = pa.Table.from_pylist(encoded, schema=schema)
    path = shard_path(out_dir, index, total)
    stats_cols = [n for n in schema.names if n not in (*IMAGE_COLUMNS, TRUSTED_LABEL)]
    size, sha = _write_parquet_atomic(table, path, row_group_size, stats_cols)
    row_groups = -(-len(encoded) // row_group_size)  # what the writer cut: full groups, then the rest
    return ShardStats(name=f"{DATA_DIR}/{path.name}", index=index, total=total or 0, rows=len(encoded),
                      bytes=size, sha256=sha, row_groups=row_groups,
                      label_pixels=pixels.tolist(), seconds=round(time.perf_counter() - t0, 4))


# ---------------------------------------------------------------- errors

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


error_row = quarantine_row  # the one builder lives in amgen_core.quarantine


def write_errors(rows: Iterable[Mapping[str, Any]], out_dir: str | os.PathLike, name: str) -> Path | RemotePath:
    """Write quarantined inputs to ``errors/{name}.parquet`` (sorted, atomic); returns the path."""
    if not _NAME_RE.match(name):
        raise SinkError(f"error file name {name!r} must be letters, digits, '.', '_' or '-'")
    cols = ERROR_SCHEMA.names
    clean = []
    for r in rows:
        extra = set(r) - set(cols)
        missing = [k for k in ("input_id", "stage", "reason") if r.get(k) is None]
        if extra or missing:
            raise SinkError(f"error row {r.get('input_id')!r}: missing {missing}, unexpected {sorted(extra)}")
        clean.append({k: (None if r.get(k) is None else str(r[k])) for k in cols})
    clean.sort(key=lambda r: (r["input_id"], r["stage"], r["reason"]))
    table = pa.Table.from_pylist(clean, schema=ERROR_SCHEMA)
    path = as_path(out_dir) / ERRORS_DIR / f"{name}.parquet"
    _write_parquet_atomic(table, path, MAX_ROW_GROUP * 10, list(cols))
    return path


def read_parquet(path: Path | RemotePath, columns: Sequence[str] | None = None) -> pa.Table:
    """A whole Parquet file, local or remote."""
    target, fs = arrow_target(path)
    return pq.read_table(target, columns=columns, filesystem=fs)


def read_errors(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for p in sorted((as_path(out_dir) / ERRORS_DIR).glob("*.parquet"), key=str):
        rows.extend(read_parquet(p).to_pylist())
    return rows


# ---------------------------------------------------------------- dataset card

DEFAULT_LICENSE_NOTE = (
    "Synthetic images generated by AM-Adapter on a Stable Diffusion 1.5 backbone (or the bundled toy "
    "model). The images inherit the terms of the generating model's licence (CreativeML OpenRAIL-M for "
    "SD 1.5) and the label layouts inherit the licence of the source dataset they came from (Cityscapes "
    "and BDD100K are research-only). Check both before any use beyond research."
)


@dataclass
class DatasetCardInfo:
    num_samples: int
    num_shards: int
    num_errors: int = 0
    optional_columns: Sequence[str] = ()
    model: str = ""
    config_hash: str = ""
    sources: Sequence[str] = ()
    label_pixels: Sequence[int] | None = None   # per Cityscapes id, e.g. summed ShardStats.label_pixels
    pretty_name: str = "amgen synthetic semantic segmentation data"
    license: str = "other"
    license_note: str = DEFAULT_LICENSE_NOTE
    extra: Mapping[str, Any] = field(default_factory=dict)  # more "key: value" lines for the human section


def _size_category(n: int) -> str:
    for limit, cat in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                       (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return cat
    return "n>10M"


def _card_yaml(info: DatasetCardInfo) -> str:
    card = DatasetCardData(
        pretty_name=info.pretty_name, license=info.license, task_categories=["image-segmentation"],
        size_categories=[_size_category(info.num_samples)],
        tags=["synthetic", "semantic-segmentation", "cityscapes", "am-adapter", "amgen"],
        configs=[{"config_name": "default",
                  "data_files": [{"split": "train", "path": f"{DATA_DIR}/train-*"}]}],
    )
    infos = DatasetInfosDict({"default": DatasetInfo(features=sample_features(info.optional_columns))})
    infos.to_dataset_card_data(card)
    return card.to_yaml()


def _label_table_md(label_pixels: Sequence[int] | None) -> list[str]:
    total = float(sum(label_pixels)) if label_pixels else 0.0
    head = "| id | name | trainId | category |" + (" pixel share |" if total else "")
    lines = [head, "|---|---|---|---|" + ("---|" if total else "")]
    for i in sorted(NAMES):
        lab = id2label[i]
        row = f"| {i} | {lab.name} | {lab.trainId} | {lab.category} |"
        if total:
            row += f" {label_pixels[i] / total:.4%} |"
        lines.append(row)
    return lines


def write_dataset_card(out_dir: str | os.PathLike, info: DatasetCardInfo | Mapping[str, Any]) -> Path | RemotePath:
    """README.md: YAML header (configs, features, task, licence) + counts, label table, how to load."""
    if isinstance(info, Mapping):
        unknown = sorted(set(info) - set(DatasetCardInfo.__dataclass_fields__))
        if unknown:
            raise SinkError(f"dataset card info: unknown keys {unknown} (see DatasetCardInfo)")
        info = DatasetCardInfo(**info)
    scores = ", ".join(f"`{s}`" for s in info.optional_columns if s != TRUSTED_LABEL) or "none"
    trusted = ([f"- `{TRUSTED_LABEL}`: `label` with the pixels the quality gate's judge segments as another class set "
                "to 0 (unlabeled: trainId 255, ignored in training). Train on it rather than on `label` to leave out "
                "what the rendering failed to draw."] if TRUSTED_LABEL in info.optional_columns else [])
    body = [
        f"# {info.pretty_name}", "",
        "Semantic segmentation pairs synthesized by amgen with AM-Adapter: each "
        "image is generated from a target label layout and the appearance of a retrieved exemplar, "
        "so `label` is pixel-aligned with `image` by construction.", "",
        "## Contents", "",
        f"- samples: {info.num_samples} in {info.num_shards} Parquet shard(s) under `{DATA_DIR}/`",
        f"- quarantined inputs: {info.num_errors} (see `{ERRORS_DIR}/`)",
        f"- model: `{info.model or 'unknown'}`", f"- config hash: `{info.config_hash or 'unknown'}`",
        f"- sources: {', '.join(info.sources) or 'unknown'}", f"- score columns: {scores}",
        *[f"- {k}: {v}" for k, v in sorted(info.extra.items())], "",
        "## Columns", "",
        "- `image`: the synthesized RGB image (PNG).",
        "- `label`: uint8 PNG of Cityscapes label *ids* (0..33, not trainIds), the target layout after augmentation.",
        *trusted,
        "- `instance`: uint16 PNG, `id*1000+k` for things and the plain id for stuff, or null.",
        "- `sample_id`, `target_id`, `exemplar_id`, `seed`: provenance; `sample_id` hashes the other three and `augment`.",
        "- `augment`: the applied augmentation as JSON; `model`, `config_hash`: what produced the sample.", "",
        "## How to load", "", "```python", "from datasets import load_dataset",
        'ds = load_dataset("path/to/this/folder", split="train")  # or: load_dataset("parquet", data_dir=".../data")',
        'image, label = ds[0]["image"], ds[0]["label"]            # PIL images; np.array(label) gives ids', "```", "",
        "## Label table (Cityscapes ids)", "", *_label_table_md(info.label_pixels), "",
        "## Licence", "", info.license_note, "",
    ]
    text = f"---\n{_card_yaml(info)}\n---\n\n" + "\n".join(body)
    return _write_bytes_atomic(as_path(out_dir) / CARD_NAME, text.encode())


# ---------------------------------------------------------------- manifest

def _jsonable(o):
    if isinstance(o, ShardStats):
        return o.to_dict()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"manifest value of type {type(o).__name__} is not JSON serializable")


def write_manifest(out_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> Path | RemotePath:
    """Atomic manifest.json. Required: ``shards``, a list of ShardStats (or their dicts) that verify checks."""
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise SinkError("manifest needs 'shards': a list of ShardStats")
    for s in shards:
        d = s.to_dict() if isinstance(s, ShardStats) else s
        missing = [k for k in ("name", "rows", "sha256") if k not in d]
        if missing:
            raise SinkError(f"manifest shard entry {d.get('name')!r} lacks {missing}")
    text = json.dumps(manifest, indent=2, sort_keys=True, default=_jsonable)
    return _write_bytes_atomic(as_path(out_dir) / MANIFEST_NAME, (text + "\n").encode())


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    p = as_path(out_dir) / MANIFEST_NAME
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no manifest")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SinkError(f"{p}: manifest is not valid JSON ({e})") from e
