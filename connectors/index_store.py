"""Sharded FAISS index of exemplar layout embeddings, on disk as one folder.

Layout of an index folder::

    manifest.json               dim, metric, kind, nlist/nprobe, embedding version, shard list
    shard-00000.faiss           one FAISS index per shard (IndexFlatIP or IndexIVFFlat, inner product)
    shard-00000.parquet         the shard's id table: ``id`` (str) and ``meta`` (JSON object)
    shard-00000.labels.npy      optional small label maps for the exact rerank (N, h, w) uint8
    shard-00000.vectors.npy     codec "pq...fs" only: the shard's full vectors (N, dim) float32

Rows are split into contiguous shards, so global row ``r`` lives in shard ``s`` at local
position ``r - offset[s]``; results merge on (score desc, global row asc), which makes a
sharded flat index return exactly what one flat index would.

Large shards are IVF: ONE coarse quantizer is trained on a sample of all vectors, and every
shard is a copy of that empty trained IVF with its own vectors added (the FAISS recipe for
building shards independently). Because the quantizer is shared, loading merges the shards'
inverted lists into one IVF for search (one scan of nprobe lists per query, not S).

IVF lists hold either the vectors themselves (codec ``flat``, IndexIVFFlat) or 4-bit product-
quantizer codes scanned with SIMD lookups (codec ``pq<M>x4fs``, IndexIVFPQFastScan: M codes of
4 bits per vector, M dividing the dimension), whose candidates (``rerank`` x k of them) are then
re-scored exactly against the full vectors kept beside the shard (IndexRefine over an
IndexFlatIP). The codec is recorded in the manifest; an index without one is ``flat``.

Builds go through :func:`write_index` over a :class:`RowSource` (arrays in memory, or the
on-disk parts of ``connectors.index_staging``); a killed build resumes with its finished shards.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from connectors.storage import file_sha256

MANIFEST = "manifest.json"
FORMAT = "amgen-sharded-index"
FORMAT_VERSION = 1
METRIC = "inner_product"
DEFAULT_IVF_THRESHOLD = 20_000   # rows per shard above which a shard is IVF instead of flat
# k-means for the shared quantizer: sample = nlist * TRAIN_POINTS_PER_LIST. On 100k layout
# embeddings, 16 points x 10 iterations gives the same recall as 32 x 12 at a quarter of the time
# (bench/retrieval.py); faiss's own advice of >= 39 points per list is for harder data.
KMEANS_ITERATIONS = 10
TRAIN_POINTS_PER_LIST = 16

GPU_MAX_K = 2048                 # faiss-gpu's largest k per search call
DEFAULT_CODEC = "flat"
PQ_TRAIN_POINTS = 4096          # pq codecs: the product quantizer's training sample, at least
DEFAULT_RERANK = 16              # pq codecs: candidates re-scored exactly per hit (16: recall@10 0.957 at 1M, docs)

Filter = Mapping[str, Any] | Callable[[dict], bool] | None


class IndexNotFoundError(FileNotFoundError):
    """The index folder or its manifest does not exist."""


class IndexFormatError(ValueError):
    """An index folder that exists but cannot be used: bad manifest, corrupt or mismatched shard."""


@dataclass
class SearchHits:
    """Results for ``nq`` queries, best first. Missing slots: score ``-inf``, row ``-1``."""

    scores: np.ndarray          # (nq, k) float32
    rows: np.ndarray            # (nq, k) int64, global row numbers
    ids: list[list[str]]        # per query, only the hits that exist


def default_nlist(n: int) -> int:
    """Coarse lists for ``n`` vectors: a power of two near 4*sqrt(n), >= 32 vectors per list on average."""
    nlist = 2 ** int(round(math.log2(max(4.0 * math.sqrt(max(n, 1)), 1.0))))
    return int(max(1, min(nlist, n // 32)))


def default_nprobe(nlist: int) -> int:
    """Lists probed by default, leaning toward recall (the exact rerank re-sorts the candidates).

    Up to 1024 lists: nlist/64, at least 8 (16 at 1024 lists = 100k vectors: recall@10 ~0.99).
    Beyond: sqrt(nlist)/2, i.e. 32 at 4096 lists (1M vectors): recall@10 0.989 at 33x brute
    force, where nlist/64 = 64 would scan twice the lists for 0.999 (docs/performance.md).
    """
    if nlist <= 1024:
        return int(min(nlist, max(8, nlist // 64)))
    return int(math.isqrt(nlist) // 2)


def pq_subquantizers(codec: str, dim: int | None = None) -> int | None:
    """M of an IVF codec "pq<M>x4fs" (None for "flat"); ValueError for anything else."""
    if codec == "flat":
        return None
    m = re.fullmatch(r"pq(\d+)x4fs", str(codec))
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"IVF codec must be 'flat' or 'pq<M>x4fs' (e.g. pq220x4fs), got {codec!r}")
    M = int(m.group(1))
    if dim is not None and dim % M:
        raise ValueError(f"IVF codec {codec}: M={M} must divide the dimension {dim}")
    return M


def _shard_names(i: int) -> dict[str, str]:
    stem = f"shard-{i:05d}"
    return {"index": f"{stem}.faiss", "table": f"{stem}.parquet", "labels": f"{stem}.labels.npy",
            "vectors": f"{stem}.vectors.npy"}


def _num_gpus() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


def meta_to_json(m: Mapping[str, Any] | None, row: int) -> str:
    try:
        return json.dumps(dict(m or {}), sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"meta[{row}] is not JSON-serialisable: {exc}") from exc


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished ``tmp`` folder to ``out``; an old index at ``out`` is replaced, other data never."""
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file()):
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{out}: exists and is not an amgen index; refusing to overwrite it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def check_finite(x: np.ndarray, where: str) -> None:
    if not np.isfinite(x).all():
        raise ValueError(f"{where}: vectors contain NaN or inf")


def check_unique_ids(ids: Sequence[str], where: str) -> None:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise ValueError(f"{where}: duplicate id {i!r}")
        seen.add(i)


class RowSource(Protocol):
    """Rows to index, read by contiguous range (so a source can live on disk)."""

    count: int
    dim: int
    label_size: tuple[int, int] | None

    def vectors(self, lo: int, hi: int) -> np.ndarray: ...          # (hi-lo, dim) float32
    def take(self, rows: np.ndarray) -> np.ndarray: ...             # vectors at sorted global rows
    def table(self, lo: int, hi: int) -> tuple[list[str], list[str]]: ...   # ids, meta JSON
    def labels(self, lo: int, hi: int) -> np.ndarray | None: ...   # (hi-lo, h, w) uint8


class ArrayRows:
    """A RowSource over arrays already in memory (``ShardedIndex.build``)."""

    def __init__(self, x: np.ndarray, ids: np.ndarray, meta_json: list[str], labels: np.ndarray | None):
        self._x, self._ids, self._meta, self._labels = x, ids, meta_json, labels
        self.count, self.dim = x.shape
        self.label_size = tuple(labels.shape[1:]) if labels is not None else None

    def vectors(self, lo: int, hi: int) -> np.ndarray:
        return self._x[lo:hi]

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self._x[rows]

    def table(self, lo: int, hi: int) -> tuple[list[str], list[str]]:
        return self._ids[lo:hi].tolist(), self._meta[lo:hi]

    def labels(self, lo: int, hi: int) -> np.ndarray | None:
        return None if self._labels is None else self._labels[lo:hi]


def train_ivf(rows: RowSource, nlist: int, seed: int, codec: str = DEFAULT_CODEC) -> faiss.Index:
    """An empty IVF whose coarse quantizer is spherical k-means on a seeded sample of the rows;
    for a pq codec, its product quantizer is trained on the same sample."""
    n, d = rows.count, rows.dim
    rng = np.random.default_rng(seed)
    size = min(n, nlist * TRAIN_POINTS_PER_LIST)
    sample = rows.take(np.sort(rng.choice(n, size=size, replace=False))) if size < n else rows.vectors(0, n)
    km = faiss.Kmeans(d, nlist, niter=KMEANS_ITERATIONS, seed=seed, spherical=True,
                      max_points_per_centroid=TRAIN_POINTS_PER_LIST, min_points_per_centroid=1, verbose=False)
    km.train(np.ascontiguousarray(sample, dtype=np.float32))
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(km.centroids)
    M = pq_subquantizers(codec, d)
    if M is None:
        ivf = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        ivf = faiss.IndexIVFPQFastScan(quantizer, d, nlist, M, 4, faiss.METRIC_INNER_PRODUCT)
        ivf.by_residual = False   # one lookup table per query, not per probed list
        ivf.pq.cp.seed = seed
        ivf.pq.cp.min_points_per_centroid = 1   # small indexes: no warning per sub-quantizer (as the coarse k-means)
        if len(sample) < PQ_TRAIN_POINTS and size < n:   # the 16 codes of each sub-quantizer want more than a few lists' worth
            take = min(n, PQ_TRAIN_POINTS)
            sample = rows.take(np.sort(rng.choice(n, size=take, replace=False))) if take < n else rows.vectors(0, n)
        ivf.train(np.ascontiguousarray(sample, dtype=np.float32))   # the quantizer is trained: only the PQ
    if not ivf.is_trained:
        raise RuntimeError("IVF quantizer was not trained")
    return faiss.clone_index(ivf)   # owns a copy of the quantizer (ours goes out of scope)


def _write_json(path: Path, obj: Any) -> None:
    """Atomic small JSON write: a killed build never leaves half a record."""
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(part, path)


SHARD_FILES = ("index", "table", "labels", "vectors")   # the files a manifest's shard entry may name
PLAN_FILE = "build-plan.json"          # work-folder bookkeeping, removed before the rename
TEMPLATE_FILE = "quantizer.faiss"


def write_index(rows: RowSource, out: Path, work: Path, num_shards: int, *, resume: bool = False,
                ivf_threshold: int = DEFAULT_IVF_THRESHOLD, nlist: int | None = None, nprobe: int | None = None,
                embedding_version: str = "", seed: int = 0, workers: int | None = None,
                progress: Callable[[int, int], None] | None = None, codec: str = DEFAULT_CODEC,
                rerank: int | None = None) -> None:
    """Train, write every shard of ``rows`` into ``work``, then rename ``work`` to ``out``.

    ``codec``: what IVF lists hold, "flat" or "pq<M>x4fs" (see the module docstring); ``rerank``:
    the pq codecs' default candidates per hit (``DEFAULT_RERANK``). Flat shards ignore both.

    With ``resume``, a ``work`` folder left by a killed build with the same plan keeps its trained
    quantizer and its finished shards (each shard is recorded only once its files are complete).
    """
    n, d = rows.count, rows.dim
    if num_shards < 1:
        raise ValueError(f"index build {out}: num_shards must be >= 1, got {num_shards}")
    bounds = np.linspace(0, n, num_shards + 1).round().astype(np.int64)
    kind = "ivf" if int(np.diff(bounds).max()) >= ivf_threshold else "flat"
    if kind == "ivf":
        nlist = int(nlist or default_nlist(n))
        if not 1 <= nlist <= n:
            raise ValueError(f"index build {out}: nlist={nlist} must be in 1..{n}")
        nprobe = int(min(nprobe or default_nprobe(nlist), nlist))
        pq_subquantizers(codec, d)
        if codec != "flat" and n < 16:
            raise ValueError(f"index build {out}: codec {codec} needs at least 16 rows (its 4-bit codes), got {n}")
        rerank = int(rerank or DEFAULT_RERANK) if codec != "flat" else None
    else:
        nlist, nprobe, codec, rerank = None, None, DEFAULT_CODEC, None
    has_labels = rows.label_size is not None
    has_vectors = codec != "flat"
    plan = {"count": n, "dim": d, "num_shards": num_shards, "kind": kind, "nlist": nlist, "nprobe": nprobe,
            "seed": seed, "embedding_version": embedding_version, "labels": has_labels,
            "kmeans": [KMEANS_ITERATIONS, TRAIN_POINTS_PER_LIST]}
    if codec != DEFAULT_CODEC:   # a flat plan stays as it was (a resumed build of today's kind keeps its shards)
        plan.update(codec=codec, rerank=rerank)
    plan_path = work / PLAN_FILE
    if not (resume and plan_path.is_file() and json.loads(plan_path.read_text()) == plan):
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    _write_json(plan_path, plan)

    template = None
    if kind == "ivf":
        tpath = work / TEMPLATE_FILE
        if tpath.is_file():
            template = faiss.read_index(str(tpath))
        else:
            template = train_ivf(rows, nlist, seed, codec)
            faiss.write_index(template, str(work / (TEMPLATE_FILE + ".part")))
            os.replace(work / (TEMPLATE_FILE + ".part"), tpath)

    def done_path(s: int) -> Path:
        return work / f"shard-{s:05d}.done.json"

    entries: dict[int, dict] = {s: json.loads(done_path(s).read_text()) for s in range(num_shards)
                                if done_path(s).is_file()}
    finished = [len(entries)]
    if progress and entries:
        progress(finished[0], num_shards)

    def write_shard(s: int) -> None:
        lo, hi = int(bounds[s]), int(bounds[s + 1])
        index = faiss.clone_index(template) if template is not None else faiss.IndexFlatIP(d)
        names = _shard_names(s)
        x = np.ascontiguousarray(rows.vectors(lo, hi), dtype=np.float32) if hi > lo else np.empty((0, d), np.float32)
        check_finite(x, f"index build {out}")
        if hi > lo:
            index.add(x)
        if has_vectors:   # the exact rerank's vectors
            np.save(work / names["vectors"], x)
        del x
        faiss.write_index(index, str(work / names["index"]))
        del index
        ids, metas = rows.table(lo, hi)
        pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "meta": pa.array(metas, pa.string())}),
                       work / names["table"])
        entry = {"index": names["index"], "table": names["table"], "count": hi - lo,
                 "labels": names["labels"] if has_labels else None}
        if has_vectors:
            entry["vectors"] = names["vectors"]
        if has_labels:
            np.save(work / names["labels"], np.asarray(rows.labels(lo, hi), np.uint8))
        entry["sha256"] = {key: file_sha256(work / entry[key]) for key in SHARD_FILES if entry.get(key)}
        _write_json(done_path(s), entry)
        entries[s] = entry
        finished[0] += 1
        if progress:
            progress(finished[0], num_shards)

    pending = [s for s in range(num_shards) if s not in entries]
    n_workers = max(1, min(len(pending) or 1, workers or os.cpu_count() or 1))
    pool = ThreadPoolExecutor(n_workers)   # faiss releases the GIL in add/write
    try:
        for future in [pool.submit(write_shard, s) for s in pending]:
            future.result()
    finally:   # on a failure, shards not yet started are not started (a rerun resumes them)
        pool.shutdown(wait=True, cancel_futures=True)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dim": d, "metric": METRIC,
        "kind": kind, "count": n, "num_shards": num_shards, "nlist": nlist, "nprobe": nprobe,
        "embedding_version": embedding_version, "seed": seed,
        "label_size": list(rows.label_size) if has_labels else None,
        "faiss_version": faiss.__version__, "shards": [entries[s] for s in range(num_shards)],
    }   # no timings: same input -> same bytes
    if codec != DEFAULT_CODEC:
        manifest.update(codec=codec, rerank=rerank)
    for s in range(num_shards):
        done_path(s).unlink()
    for name in (PLAN_FILE, TEMPLATE_FILE):
        (work / name).unlink(missing_ok=True)
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _replace_dir(work, out)


class ShardedIndex:
    """S FAISS shards + id tables behind one ``search``. Build with :meth:`build`, open with :meth:`load`."""

    def __init__(self, path: Path, manifest: dict, shards: list, ids: list[np.ndarray],
                 metas: list[list[str]], labels: list[np.ndarray | None], device: str = "cpu",
                 vectors: list[np.ndarray | None] | None = None):
        self.path = Path(path)
        self.manifest = manifest
        self.dim = int(manifest["dim"])
        self.kind = str(manifest["kind"])
        self.nlist = manifest.get("nlist")
        self.nprobe = int(manifest.get("nprobe") or 1)
        self.codec = str(manifest.get("codec", DEFAULT_CODEC))
        self.rerank = int(manifest.get("rerank") or DEFAULT_RERANK)   # pq codecs: candidates per hit
        self.embedding_version = str(manifest.get("embedding_version", ""))
        counts = [int(s["count"]) for s in manifest["shards"]]
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.ids = np.concatenate(ids) if ids else np.empty(0, object)
        self._meta_json = [m for shard in metas for m in shard]
        self._meta_cache: list[dict] | None = None
        self._labels = labels
        self._row_of = {s: i for i, s in enumerate(self.ids.tolist())}
        self._mask_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.device = device
        self._keep: list = []   # faiss objects a wrapper points at without owning them
        # What a query scans: (faiss index, first global row, row count). Shards are the unit of
        # building and storage; for search, CPU IVF shards are merged into one IVF (see _merge_ivf).
        self._parts = self._merge_ivf(shards, vectors) if self.kind == "ivf" else \
            [(sh, int(self._offsets[i]), int(counts[i])) for i, sh in enumerate(shards)]

    def _merge_ivf(self, shards: list, vectors: list[np.ndarray | None] | None = None) -> list[tuple[Any, int, int]]:
        """One IVF over all rows: the shards share the quantizer, so their inverted lists concatenate.

        Searching S shards costs S scans of nprobe short lists per query, and that per-list
        overhead dominated: 8 shards of 200k rows searched at ~1/3 the speed of one index
        (bench/retrieval.py). Ids in the merged lists are global rows (shard offset added).
        A pq codec's merged IVF is wrapped in an exact rerank (IndexRefine) over all the vectors.
        """
        merged = shards[0]
        for i, shard in enumerate(shards[1:], 1):
            merged.merge_from(shard, int(self._offsets[i]))   # moves the codes; the shard is left empty
        if self.codec == DEFAULT_CODEC:
            return [(merged, 0, int(self._offsets[-1]))]
        exact = faiss.IndexFlatIP(self.dim)
        for vec in vectors or []:
            for lo in range(0, len(vec), 65_536):   # from the memory map in slices: no second full copy
                exact.add(np.ascontiguousarray(vec[lo:lo + 65_536], dtype=np.float32))
        if exact.ntotal != merged.ntotal:
            raise IndexFormatError(f"{self.path}: {exact.ntotal} rerank vectors for {merged.ntotal} rows")
        refine = faiss.IndexRefine(merged, exact)   # does not own either: keep them alive with it
        self._keep += [merged, exact]
        return [(refine, 0, int(self._offsets[-1]))]

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, vectors: np.ndarray, ids: Sequence[str], meta: Sequence[Mapping[str, Any]] | None,
              out_dir: str | os.PathLike, num_shards: int = 1, *,
              ivf_threshold: int = DEFAULT_IVF_THRESHOLD, nlist: int | None = None, nprobe: int | None = None,
              labels: np.ndarray | None = None, embedding_version: str = "", seed: int = 0,
              workers: int | None = None, device: str = "cpu",
              progress: Callable[[int, int], None] | None = None, codec: str = DEFAULT_CODEC,
              rerank: int | None = None) -> "ShardedIndex":
        """Write an index of ``vectors`` (N, D) to ``out_dir`` and return it loaded.

        ``ids``: N unique strings. ``meta``: N JSON-able dicts (e.g. domain, source, split) or None.
        ``labels``: optional (N, h, w) uint8 small label maps kept for the exact rerank.
        Shards are IVF when a shard would hold >= ``ivf_threshold`` rows, flat otherwise; ``codec``
        and ``rerank``: what IVF lists hold (see the module docstring).
        The folder appears atomically (built under a temporary name, then renamed).
        For inputs that do not fit in memory, see ``connectors.index_staging.IndexBuilder``.
        """
        out = Path(out_dir)
        x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"index build {out}: vectors must be a non-empty (N, D) array, got shape {x.shape}")
        check_finite(x, f"index build {out}")
        n = x.shape[0]
        id_arr = np.array([str(i) for i in ids], dtype=object)
        if len(id_arr) != n:
            raise ValueError(f"index build {out}: {len(id_arr)} ids for {n} vectors")
        check_unique_ids(id_arr.tolist(), f"index build {out}")
        meta = list(meta) if meta is not None else [{}] * n
        if len(meta) != n:
            raise ValueError(f"index build {out}: {len(meta)} meta rows for {n} vectors")
        meta_json = [meta_to_json(m, i) for i, m in enumerate(meta)]
        if labels is not None:
            labels = np.asarray(labels)
            if labels.ndim != 3 or labels.shape[0] != n or labels.dtype != np.uint8:
                raise ValueError(f"index build {out}: labels must be (N, h, w) uint8, got {labels.shape} {labels.dtype}")
        rows = ArrayRows(x, id_arr, meta_json, labels)
        work = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)
        try:
            write_index(rows, out, work, num_shards, ivf_threshold=ivf_threshold, nlist=nlist, nprobe=nprobe,
                        embedding_version=embedding_version, seed=seed, workers=workers, progress=progress,
                        codec=codec, rerank=rerank)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return cls.load(out, device=device, verify=False)

    # ------------------------------------------------------------------ load
    @classmethod
    def load(cls, path: str | os.PathLike, *, expected_dim: int | None = None,
             embedding_version: str | None = None, device: str = "cpu", nprobe: int | None = None,
             verify: bool = True, rerank: int | None = None) -> "ShardedIndex":
        """Open an index folder. ``device``: "cpu", "cuda" (faiss-gpu required) or "auto".

        Raises IndexNotFoundError (no folder / no manifest) or IndexFormatError (bad manifest,
        dimension or embedding-version mismatch, missing or corrupt shard), naming the file.
        """
        root = Path(path)
        if not root.is_dir():
            raise IndexNotFoundError(f"{root}: index folder not found")
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise IndexNotFoundError(f"{mpath}: manifest not found; {root} is not an amgen index "
                                     "(build one with `amgen index build`)")
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IndexFormatError(f"{mpath}: unreadable manifest: {exc}") from exc
        cls._check_manifest(manifest, mpath, expected_dim, embedding_version)
        device = cls._resolve_device(device)
        dim = int(manifest["dim"])
        shards, ids, metas, labels, vectors = [], [], [], [], []
        for i, entry in enumerate(manifest["shards"]):
            shard, shard_ids, shard_meta, shard_labels, shard_vectors = cls._load_shard(root, i, entry, dim, manifest,
                                                                                        verify)
            shards.append(shard)
            ids.append(shard_ids)
            metas.append(shard_meta)
            labels.append(shard_labels)
            vectors.append(shard_vectors)
        if manifest["kind"] == "ivf":
            cls._check_shared_quantizer(root, shards, manifest)
        index = cls(root, manifest, shards, ids, metas, labels, device="cpu", vectors=vectors)
        del vectors   # copied into the rerank's flat index; the memory maps close
        if nprobe is not None:
            index.nprobe = int(nprobe)
        if rerank is not None:
            index.rerank = int(rerank)
        if device == "cuda":
            index._to_gpu()
        return index

    @staticmethod
    def _check_manifest(m: Any, mpath: Path, expected_dim: int | None, embedding_version: str | None) -> None:
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise IndexFormatError(f"{mpath}: not an {FORMAT} manifest")
        if m.get("format_version") != FORMAT_VERSION:
            raise IndexFormatError(f"{mpath}: format_version {m.get('format_version')} unsupported (want {FORMAT_VERSION})")
        for key in ("dim", "metric", "kind", "count", "shards"):
            if key not in m:
                raise IndexFormatError(f"{mpath}: manifest lacks {key!r}")
        if m["metric"] != METRIC or m["kind"] not in ("flat", "ivf"):
            raise IndexFormatError(f"{mpath}: unsupported metric/kind {m['metric']}/{m['kind']}")
        try:
            pq_subquantizers(m.get("codec", DEFAULT_CODEC), int(m["dim"]))
        except ValueError as exc:
            raise IndexFormatError(f"{mpath}: {exc}") from exc
        if m.get("codec", DEFAULT_CODEC) != DEFAULT_CODEC and any(not s.get("vectors") for s in m["shards"]):
            raise IndexFormatError(f"{mpath}: codec {m['codec']} needs every shard's 'vectors' (the exact rerank)")
        if not isinstance(m["shards"], list) or not m["shards"]:
            raise IndexFormatError(f"{mpath}: manifest lists no shards")
        if sum(int(s.get("count", -1)) for s in m["shards"]) != int(m["count"]):
            raise IndexFormatError(f"{mpath}: shard counts do not add up to count={m['count']}")
        if expected_dim is not None and int(m["dim"]) != int(expected_dim):
            raise IndexFormatError(f"{mpath}: dimension mismatch: index has dim={m['dim']}, expected {expected_dim}")
        if embedding_version is not None and m.get("embedding_version") != embedding_version:
            raise IndexFormatError(f"{mpath}: embedding version mismatch: index has "
                                   f"{m.get('embedding_version')!r}, expected {embedding_version!r}; rebuild the index")

    @staticmethod
    def _load_shard(root: Path, i: int, entry: dict, dim: int, manifest: dict, verify: bool):
        sums = entry.get("sha256", {})
        for key in SHARD_FILES:
            name = entry.get(key)
            if key in ("index", "table") and not name:
                raise IndexFormatError(f"{root / MANIFEST}: shard {i} lacks {key!r}")
            if name and not (root / name).is_file():
                raise IndexFormatError(f"{root / name}: shard file missing (listed in {root / MANIFEST})")
            if name and verify and key in sums and file_sha256(root / name) != sums[key]:
                raise IndexFormatError(f"{root / name}: corrupt shard (checksum does not match the manifest)")
        ipath = root / entry["index"]
        try:
            shard = faiss.read_index(str(ipath))
        except RuntimeError as exc:
            raise IndexFormatError(f"{ipath}: corrupt shard: faiss cannot read it ({str(exc).splitlines()[0]})") from exc
        count = int(entry["count"])
        if shard.d != dim:
            raise IndexFormatError(f"{ipath}: dimension mismatch: shard has d={shard.d}, manifest says {dim}")
        if shard.ntotal != count:
            raise IndexFormatError(f"{ipath}: shard holds {shard.ntotal} vectors, manifest says {count}")
        if manifest["kind"] == "ivf":
            # read_index already returns the concrete class (re-downcasting would drop ownership).
            if not isinstance(shard, faiss.IndexIVF):
                raise IndexFormatError(f"{ipath}: manifest says IVF but the shard is {type(shard).__name__}")
        tpath = root / entry["table"]
        try:
            table = pq.read_table(tpath, columns=["id", "meta"])
        except Exception as exc:  # pyarrow raises several types for damaged files
            raise IndexFormatError(f"{tpath}: unreadable id table: {exc}") from exc
        if table.num_rows != count:
            raise IndexFormatError(f"{tpath}: id table has {table.num_rows} rows, manifest says {count}")
        ids = np.array(table.column("id").to_pylist(), dtype=object)
        metas = table.column("meta").to_pylist()
        labels = _side_array(root, entry.get("labels"), "label maps", np.uint8, f"({count}, h, w)",
                             lambda a: a.shape[0] == count)
        vectors = _side_array(root, entry.get("vectors"), "vectors", np.float32, f"({count}, {dim})",
                              lambda a: a.shape == (count, dim))
        return shard, ids, metas, labels, vectors

    @staticmethod
    def _check_shared_quantizer(root: Path, shards: list, manifest: dict) -> None:
        nlist = int(manifest.get("nlist") or 0)
        ref = None
        for i, shard in enumerate(shards):
            if shard.nlist != nlist:
                raise IndexFormatError(f"{root / manifest['shards'][i]['index']}: nlist={shard.nlist}, manifest says {nlist}")
            cents = faiss.downcast_index(shard.quantizer).reconstruct_n(0, shard.nlist)
            if ref is None:
                ref = cents
            elif not np.array_equal(ref, cents):
                raise IndexFormatError(f"{root / manifest['shards'][i]['index']}: coarse quantizer differs from "
                                       "shard 0 (shards must share one trained quantizer)")

    @staticmethod
    def _resolve_device(device: str) -> str:
        if device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"index device must be 'cpu', 'cuda' or 'auto', got {device!r}")
        if device == "auto":
            return "cuda" if _num_gpus() > 0 else "cpu"
        if device == "cuda" and _num_gpus() == 0:
            raise RuntimeError("index device 'cuda' requested but faiss sees no GPU "
                               "(install faiss-gpu-cu12 on a GPU host, or use device='cpu')")
        return device

    def _to_gpu(self) -> None:
        """Same index parts on every visible GPU; searches then go through the plain ``search`` path.
        faiss-gpu has no 4-bit fast-scan lists: a pq codec's index stays on the CPU."""
        if self.codec != DEFAULT_CODEC:
            return
        gpu_parts = []
        for part, lo, count in self._parts:
            g = faiss.index_cpu_to_all_gpus(part)
            if self.kind == "ivf":
                faiss.GpuParameterSpace().set_index_parameter(g, "nprobe", self.nprobe)
            gpu_parts.append((g, lo, count))
        self._parts = gpu_parts
        self.device = "cuda"

    # ------------------------------------------------------------------ lookup
    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def has_labels(self) -> bool:
        return all(lab is not None for lab in self._labels)

    def row_of(self, id_: str) -> int | None:
        return self._row_of.get(str(id_))

    def _locate(self, row: int) -> tuple[int, int]:
        s = int(np.searchsorted(self._offsets, row, side="right") - 1)
        return s, int(row - self._offsets[s])

    def meta(self, row: int) -> dict:
        if self._meta_cache is not None:
            return self._meta_cache[row]
        return json.loads(self._meta_json[row])

    def metas(self) -> list[dict]:
        if self._meta_cache is None:
            self._meta_cache = [json.loads(m) for m in self._meta_json]
        return self._meta_cache

    def label(self, row: int) -> np.ndarray:
        """The stored small label map of ``row`` (needs an index built with ``labels=``)."""
        s, local = self._locate(row)
        if self._labels[s] is None:
            raise LookupError(f"{self.path}: index was built without label maps")
        return np.asarray(self._labels[s][local])

    # ------------------------------------------------------------------ search
    def filter_mask(self, filters: Filter) -> np.ndarray | None:
        """Bool mask over rows for ``filters``: {"key": value | [values]} (all must match) or a
        callable(meta) -> bool. None means no filter."""
        if filters is None:
            return None
        if callable(filters):
            return np.fromiter((bool(filters(m)) for m in self.metas()), bool, len(self))
        if not isinstance(filters, Mapping):
            raise TypeError(f"filters must be a mapping or a callable, got {type(filters).__name__}")
        key = json.dumps(filters, sort_keys=True, default=str)
        if key in self._mask_cache:
            self._mask_cache.move_to_end(key)
            return self._mask_cache[key]
        mask = np.ones(len(self), bool)
        for field, want in filters.items():
            allowed = set(want) if isinstance(want, (list, tuple, set, frozenset)) else {want}
            mask &= np.fromiter((m.get(field) in allowed for m in self.metas()), bool, len(self))
        self._mask_cache[key] = mask
        if len(self._mask_cache) > 16:
            self._mask_cache.popitem(last=False)
        return mask

    def _exclusions(self, exclude_ids: Any, nq: int) -> list[set[int]]:
        if exclude_ids is None:
            return [set() for _ in range(nq)]
        if isinstance(exclude_ids, str) or len(exclude_ids) != nq:
            raise ValueError(f"exclude_ids must hold one entry per query ({nq}), got {exclude_ids!r:.80}")
        out = []
        for ex in exclude_ids:
            items = [] if ex is None else [ex] if isinstance(ex, str) else list(ex)
            out.append({r for r in (self._row_of.get(str(i)) for i in items) if r is not None})
        return out

    def _search_part(self, p: int, q: np.ndarray, k: int, mask: np.ndarray | None,
                     nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` of one index part; rows are global, -1 where the part ran dry."""
        part, lo, count = self._parts[p]
        kk = min(k, count)
        if kk <= 0:
            return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
        sel = None
        if mask is not None and self.device == "cpu":
            # The one-argument wrapper takes the packed bytes and keeps them alive with the selector.
            sel = faiss.IDSelectorBitmap(np.packbits(mask[lo:lo + count], bitorder="little"))
        if self.kind == "ivf" and self.device == "cpu":
            params = faiss.SearchParametersIVF(nprobe=int(min(nprobe, self.nlist)))
            if sel is not None:
                params.sel = sel
            if self.codec != DEFAULT_CODEC:   # PQ candidates, re-scored exactly
                params = faiss.IndexRefineSearchParameters(k_factor=float(self.rerank), base_index_params=params)
            dist, idx = part.search(q, kk, params=params)
        elif sel is not None:
            dist, idx = part.search(q, kk, params=faiss.SearchParameters(sel=sel))
        else:
            dist, idx = part.search(q, kk)
        rows = np.where(idx >= 0, idx + lo, -1)
        return dist, rows

    def _fan_out(self, q: np.ndarray, k: int, mask: np.ndarray | None, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """Search every part for its top ``k``; return all hits sorted by (score desc, row asc)."""
        parts = [self._search_part(p, q, k, mask, nprobe) for p in range(len(self._parts))]
        dist = np.concatenate([p[0] for p in parts], axis=1)
        rows = np.concatenate([p[1] for p in parts], axis=1)
        missing = rows < 0
        dist = np.where(missing, -np.inf, dist).astype(np.float32)
        order = np.lexsort((np.where(missing, np.iinfo(np.int64).max, rows), -dist), axis=-1)
        return np.take_along_axis(dist, order, 1), np.take_along_axis(rows, order, 1)

    def search(self, queries: np.ndarray, k: int, *, exclude_ids: Sequence[Any] | None = None,
               filters: Filter = None, nprobe: int | None = None) -> SearchHits:
        """Top-``k`` rows by inner product for each query row.

        ``exclude_ids``: one entry per query (an id, a list of ids, or None), e.g. the target itself.
        ``filters``: {"domain": "night"}, {"domain": ["day", "dusk"]} or callable(meta) -> bool.
        Shards are asked for more than ``k`` so that exclusions and filters still leave ``k`` hits;
        a query that comes up short is asked again with a larger fetch.
        """
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"{self.path}: queries must be (nq, {self.dim}), got {q.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        nq, n = len(q), len(self)
        nprobe = int(nprobe or self.nprobe)
        excl = self._exclusions(exclude_ids, nq)
        mask = self.filter_mask(filters)
        fetch = k + max((len(e) for e in excl), default=0)
        if mask is not None and self.device != "cpu":   # GPU: no selector, filter after the search
            fetch = int(math.ceil(fetch * n / max(int(mask.sum()), 1)))
        cap = GPU_MAX_K if self.device != "cpu" else None
        scores = np.full((nq, k), -np.inf, np.float32)
        rows = np.full((nq, k), -1, np.int64)
        counts = np.array([c for _, _, c in self._parts], np.int64)
        todo = np.arange(nq)
        while len(todo):
            fetch = min(fetch, int(counts.max()), cap or fetch)
            expected = int(np.minimum(counts, fetch).sum())   # hits the shards can return at this fetch
            dist, cand = self._fan_out(q[todo], fetch, mask, nprobe)
            valid = cand >= 0
            keep = valid.copy()
            if mask is not None:
                keep &= mask[np.maximum(cand, 0)]
            for j, qi in enumerate(todo):
                if excl[qi]:
                    keep[j] &= np.fromiter((r not in excl[qi] for r in cand[j]), bool, cand.shape[1])
            # The first k kept hits of each query, in order (vectorized over the queries).
            rank = np.cumsum(keep, axis=1) - 1
            jj, cc = np.nonzero(keep & (rank < k))
            scores[todo[jj], rank[jj, cc]] = dist[jj, cc]
            rows[todo[jj], rank[jj, cc]] = cand[jj, cc]
            # Short, yet every shard returned all it was asked for: a larger fetch can help.
            # (A shard returning fewer means its probed lists or the filter ran dry.)
            got = np.minimum(keep.sum(axis=1), k)
            short = (got < k) & (valid.sum(axis=1) == expected)
            todo = todo[short] if (fetch < counts.max() and fetch != cap) else todo[:0]
            fetch *= 4
        ids = [[str(self.ids[r]) for r in row if r >= 0] for row in rows]
        return SearchHits(scores=scores, rows=rows, ids=ids)


def _side_array(root: Path, name: str | None, what: str, dtype, shape: str, fits) -> np.ndarray | None:
    """A shard's memory-mapped .npy beside its index (label maps, rerank vectors), or None where
    the manifest names none; a damaged or misshapen file is an IndexFormatError naming it."""
    if not name:
        return None
    path = root / name
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise IndexFormatError(f"{path}: unreadable {what}: {exc}") from exc
    if not fits(array) or array.dtype != dtype:
        raise IndexFormatError(f"{path}: expected {shape} {np.dtype(dtype).name}, got {array.shape} {array.dtype}")
    return array
