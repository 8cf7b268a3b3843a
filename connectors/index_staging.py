"""Streaming, resumable index builds: rows go to disk in sealed parts, shards are written from them.

A build of ``out`` keeps its work in ``.{out.name}.build/`` next to it::

    build.json                  the build's fingerprint (a rerun with another one starts over)
    part-00000.vectors.f32      raw float32 rows, appended batch by batch
    part-00000.labels.u8        raw uint8 small label maps, appended likewise (optional)
    part-00000.parquet          the part's ids and meta JSON, written when the part is sealed
    part-00000.json             the seal: row count and caller info; written last, atomically
    index/                      ``index_store.write_index``'s work folder (finished shards)

Nothing but the open part's ids and meta stays in memory, so the input can be far larger
than RAM. A killed build, rerun with ``resume=True`` and the same fingerprint, keeps every
sealed part (the caller skips their inputs) and every finished shard.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from connectors.index_store import (DEFAULT_IVF_THRESHOLD, ShardedIndex, _write_json, check_finite,
                                    check_unique_ids, meta_to_json, write_index)

STATE = "build.json"
STATE_FORMAT = "amgen-index-staging"


def staging_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    return out.with_name(f".{out.name}.build")


class StagedRows:
    """The sealed parts as one RowSource; vectors and label maps are read through memory maps."""

    def __init__(self, root: Path, parts: list[dict]):
        self.root, self.parts = root, parts
        self.count = sum(int(p["rows"]) for p in parts)
        self.dim = int(parts[0]["dim"])
        sizes = {tuple(p["label_size"]) if p["label_size"] else None for p in parts if p["rows"]}
        if len(sizes) > 1:
            raise ValueError(f"{root}: parts hold label maps of different sizes {sorted(map(str, sizes))}")
        self.label_size = sizes.pop() if sizes else None
        self._starts = np.concatenate([[0], np.cumsum([int(p["rows"]) for p in parts])]).astype(np.int64)

    def _map(self, i: int, what: str) -> np.ndarray:
        p = self.parts[i]
        if what == "vectors":
            return np.memmap(self.root / p["vectors"], np.float32, "r", shape=(int(p["rows"]), self.dim))
        return np.memmap(self.root / p["labels"], np.uint8, "r", shape=(int(p["rows"]), *self.label_size))

    def _spans(self, lo: int, hi: int):
        for i in range(len(self.parts)):
            a, b = max(lo, int(self._starts[i])), min(hi, int(self._starts[i + 1]))
            if a < b:
                yield i, a - int(self._starts[i]), b - int(self._starts[i])

    def vectors(self, lo: int, hi: int) -> np.ndarray:
        return np.concatenate([np.array(self._map(i, "vectors")[a:b]) for i, a, b in self._spans(lo, hi)])

    def take(self, rows: np.ndarray) -> np.ndarray:
        part = np.searchsorted(self._starts, rows, side="right") - 1
        out = np.empty((len(rows), self.dim), np.float32)
        for i in np.unique(part):
            sel = part == i
            out[sel] = self._map(int(i), "vectors")[rows[sel] - self._starts[i]]
        return out

    def table(self, lo: int, hi: int) -> tuple[list[str], list[str]]:
        ids: list[str] = []
        metas: list[str] = []
        for i, a, b in self._spans(lo, hi):
            t = pq.read_table(self.root / self.parts[i]["table"]).slice(a, b - a)
            ids += t.column("id").to_pylist()
            metas += t.column("meta").to_pylist()
        return ids, metas

    def labels(self, lo: int, hi: int) -> np.ndarray | None:
        if self.label_size is None:
            return None
        return np.concatenate([np.array(self._map(i, "labels")[a:b]) for i, a, b in self._spans(lo, hi)])

    def all_ids(self) -> list[str]:
        return [i for p in self.parts for i in pq.read_table(self.root / p["table"], columns=["id"]).column("id").to_pylist()]


class IndexBuilder:
    """Write an index of rows that arrive in batches: ``add`` ... ``seal`` per part, then ``finish``.

    ``fingerprint``: what identifies the input (source, options, part size...). With
    ``resume=True`` a staging folder of the same fingerprint is continued: ``parts_done`` parts
    are already on disk and ``part_info(i)`` returns what the caller sealed them with.
    """

    def __init__(self, out_dir: str | Path, *, fingerprint: Mapping[str, Any] | None = None, resume: bool = False):
        self.out = Path(out_dir)
        self.root = staging_dir(self.out)
        state = {"format": STATE_FORMAT, "fingerprint": json.loads(json.dumps(dict(fingerprint or {}), default=str))}
        kept = resume and (self.root / STATE).is_file() and _read_json(self.root / STATE) == state
        if not kept:
            shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        _write_json(self.root / STATE, state)
        self.parts: list[dict] = []
        while (self.root / f"part-{len(self.parts):05d}.json").is_file():
            self.parts.append(_read_json(self.root / f"part-{len(self.parts):05d}.json"))
        self._open: dict[str, Any] | None = None

    @property
    def parts_done(self) -> int:
        return len(self.parts)

    @property
    def rows_done(self) -> int:
        return sum(int(p["rows"]) for p in self.parts)

    def part_info(self, i: int) -> dict:
        return dict(self.parts[i]["info"])

    def _start_part(self, dim: int, label_size: tuple[int, int] | None) -> dict[str, Any]:
        stem = f"part-{len(self.parts):05d}"
        names = {"vectors": f"{stem}.vectors.f32", "labels": f"{stem}.labels.u8" if label_size else None,
                 "table": f"{stem}.parquet"}
        for name in names.values():   # leftovers of a part that a kill left unsealed
            if name:
                (self.root / name).unlink(missing_ok=True)
        return {"names": names, "dim": dim, "label_size": label_size, "rows": 0, "ids": [], "metas": [],
                "vectors": open(self.root / names["vectors"], "ab"),
                "labels": open(self.root / names["labels"], "ab") if label_size else None}

    def add(self, vectors: np.ndarray, ids: Sequence[str], metas: Sequence[Mapping[str, Any]] | None = None,
            labels: np.ndarray | None = None) -> None:
        """Append rows to the open part: vectors (n, D) float32, n ids, n meta dicts, (n, h, w) uint8 maps."""
        where = f"index build {self.out}"
        x = np.ascontiguousarray(np.asarray(vectors, np.float32))
        n = len(ids)
        if x.ndim != 2 or x.shape[0] != n or x.shape[1] == 0:
            raise ValueError(f"{where}: vectors must be ({n}, D), got {x.shape}")
        check_finite(x, where)
        metas = list(metas) if metas is not None else [{}] * n
        if len(metas) != n:
            raise ValueError(f"{where}: {len(metas)} meta rows for {n} vectors")
        size = None
        if labels is not None:
            labels = np.ascontiguousarray(labels)
            if labels.ndim != 3 or labels.shape[0] != n or labels.dtype != np.uint8:
                raise ValueError(f"{where}: labels must be (N, h, w) uint8, got {labels.shape} {labels.dtype}")
            size = tuple(int(v) for v in labels.shape[1:])
        dims = [p["dim"] for p in self.parts if p["rows"]] + ([self._open["dim"]] if self._open else [])
        dim = dims[0] if dims else x.shape[1]
        if x.shape[1] != dim:
            raise ValueError(f"{where}: vectors of dim {x.shape[1]} after dim {dim}")
        if self._open is None:
            self._open = self._start_part(x.shape[1], size)
        part = self._open
        if (size is None) != (part["label_size"] is None) or (size and size != part["label_size"]):
            raise ValueError(f"{where}: label maps {size} after {part['label_size']} in one part")
        start = self.rows_done + part["rows"]
        part["ids"] += [str(i) for i in ids]
        part["metas"] += [meta_to_json(m, start + j) for j, m in enumerate(metas)]
        part["vectors"].write(x.tobytes())
        if labels is not None:
            part["labels"].write(labels.tobytes())
        part["rows"] += n

    def seal(self, **info: Any) -> None:
        """Close the open part (an empty one is fine: a part whose inputs all failed)."""
        if self._open is None:
            dim = self.parts[0]["dim"] if self.parts else 0
            self._open = self._start_part(dim, None)
        part, self._open = self._open, None
        for key in ("vectors", "labels"):
            if part[key] is not None:
                part[key].flush()
                part[key].close()
        names = part["names"]
        pq.write_table(pa.table({"id": pa.array(part["ids"], pa.string()), "meta": pa.array(part["metas"], pa.string())}),
                       self.root / names["table"])
        record = {**names, "rows": part["rows"], "dim": part["dim"],
                  "label_size": list(part["label_size"]) if part["label_size"] else None,
                  "info": json.loads(json.dumps(info, default=str))}
        _write_json(self.root / f"part-{len(self.parts):05d}.json", record)
        self.parts.append(record)

    def finish(self, num_shards: int = 1, *, ivf_threshold: int = DEFAULT_IVF_THRESHOLD, nlist: int | None = None,
               nprobe: int | None = None, embedding_version: str = "", seed: int = 0, workers: int | None = None,
               device: str = "cpu", progress: Callable[[int, int], None] | None = None, codec: str = "flat",
               rerank: int | None = None) -> ShardedIndex:
        """Write the shards (keeping any a killed run finished), rename into place, drop the staging."""
        if self._open is not None:
            self.seal()
        parts = [p for p in self.parts if p["rows"]]
        where = f"index build {self.out}"
        if not parts:
            raise ValueError(f"{where}: no layouts to index")
        rows = StagedRows(self.root, parts)
        check_unique_ids(rows.all_ids(), where)
        write_index(rows, self.out, self.root / "index", num_shards, resume=True, ivf_threshold=ivf_threshold,
                    nlist=nlist, nprobe=nprobe, embedding_version=embedding_version, seed=seed, workers=workers,
                    progress=progress, codec=codec, rerank=rerank)
        shutil.rmtree(self.root, ignore_errors=True)
        return ShardedIndex.load(self.out, device=device, verify=False)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable build record: {exc}") from exc
