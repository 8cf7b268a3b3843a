"""Exemplar retrieval: FAISS candidates -> exact label-map rerank -> constraints -> diverse top-k.

For each target layout:

1. **Candidates.** The layout embedding (stages/embed.py) asks the sharded index for
   ``candidates`` nearest exemplars, with the target itself excluded and metadata filters
   (e.g. ``{"domain": "night"}``) applied inside the index search.
2. **Exact rerank.** Target and candidate label maps are sampled to ``rerank_size`` (nearest,
   32x64 by default) and scored by **mean class IoU over the trainIds present in either map**
   (void pixels ignored). We chose it over per-pixel agreement because agreement is dominated
   by road, sky and building: two scenes can agree on 80 % of pixels while one has five cars
   and the other none. Mean class IoU gives every class present the same vote, and a class that
   is in one map but not the other scores 0, which is what a class-to-class appearance transfer
   needs (an exemplar with no cars cannot lend car appearance).
3. **Diverse top-k.** Greedy MMR over the reranked candidates:
   ``(1 - diversity) * iou - diversity * max cosine(embedding, picked embeddings)``, and a
   candidate whose embedding cosine to a picked one is >= ``duplicate_threshold`` is taken only
   when nothing else is left. So k results are not k near-copies.

Ties break on the exemplar id (ascending), so results are deterministic.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from amgen_core.labels import ID_TO_TRAIN_ID, IGNORE_TRAIN_ID, NUM_TRAIN_IDS, check_label_ids
from connectors.index_staging import IndexBuilder, staging_dir
from connectors.index_store import Filter, ShardedIndex
from connectors.storage import local_dir
from stages.embed import EMBED_DIM, EMBED_VERSION, embed_layouts
from amgen_core.records import Layout
from stages.read import batch_columns, batch_rows, cached_source, read_item

DEFAULT_RERANK_SIZE = (32, 64)
THUMB_BATCH = 256


@dataclass(frozen=True)
class Match:
    exemplar_id: str
    score: float                 # exact rerank score: mean class IoU at rerank_size, in [0, 1]
    embed_score: float           # cosine of the layout embeddings (the index score)
    meta: dict = field(default_factory=dict)


def resize_nearest(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Sample an HxW label map at ``size`` pixel centres (nearest; never mixes ids).

    PIL's NEAREST and cv2's INTER_NEAREST_EXACT sample the same centres, but where a centre falls
    exactly on a pixel boundary (every even whole-factor shrink, e.g. 128 -> 32) they do not
    always take the pixel after it as this does: 515 of the 3249 size pairs tested would change, and
    with them the rerank thumbnails and retrieval results (tests/test_library_calls.py).
    """
    arr = np.asarray(label)
    h, w = size
    if arr.shape == (h, w):
        return arr
    rows = ((np.arange(h) + 0.5) * arr.shape[0] / h).astype(np.int64)
    cols = ((np.arange(w) + 0.5) * arr.shape[1] / w).astype(np.int64)
    return arr[rows[:, None], cols[None, :]]


def class_iou(target: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Mean IoU over the trainIds present in either map, target (h, w) vs candidates (M, h, w).

    Inputs are label *ids* (mapped to trainIds here); void pixels count in neither map.
    A pair with no valid class at all scores 0.
    """
    t = ID_TO_TRAIN_ID[np.asarray(target, np.uint8)].ravel().astype(np.int64)
    c = ID_TO_TRAIN_ID[np.asarray(candidates, np.uint8)].reshape(len(candidates), -1).astype(np.int64)
    m, nc = len(c), NUM_TRAIN_IDS
    valid_t = t != IGNORE_TRAIN_ID
    area_t = np.bincount(t[valid_t], minlength=nc)[:nc].astype(np.float64)
    base = (np.arange(m, dtype=np.int64) * nc)[:, None]
    valid_c = c != IGNORE_TRAIN_ID
    area_c = np.bincount((base + c)[valid_c], minlength=m * nc).reshape(m, nc).astype(np.float64)
    same = (c == t[None]) & valid_c
    inter = np.bincount((base + c)[same], minlength=m * nc).reshape(m, nc).astype(np.float64)
    union = area_t[None] + area_c - inter
    present = union > 0
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=present)
    n_present = present.sum(axis=1)
    return np.divide(iou.sum(axis=1), n_present, out=np.zeros(m), where=n_present > 0)


class Retriever:
    """Find exemplars for target layouts in a :class:`ShardedIndex`.

    ``index``: a loaded ShardedIndex or its folder. ``label_lookup(id) -> HxW ids`` gives an
    exemplar's label map; when None the small label maps stored in the index are used.
    """

    def __init__(self, index: ShardedIndex | str | os.PathLike,
                 label_lookup: Callable[[str], np.ndarray] | None = None, k: int = 1,
                 candidates: int = 32, diversity: float = 0.3,
                 rerank_size: tuple[int, int] = DEFAULT_RERANK_SIZE, filters: Filter = None,
                 duplicate_threshold: float = 0.98, cache_size: int = 8192, device: str = "cpu"):
        if not isinstance(index, ShardedIndex):  # a folder or a URI: opened (mirrored) on this node
            index = ShardedIndex.load(local_dir(index), expected_dim=EMBED_DIM, embedding_version=EMBED_VERSION, device=device)
        if index.dim != EMBED_DIM:
            raise ValueError(f"{index.path}: index dim {index.dim} != layout embedding dim {EMBED_DIM}")
        if label_lookup is None and not index.has_labels:
            raise ValueError(f"{index.path}: index has no stored label maps; pass label_lookup= for the rerank")
        if k < 1 or candidates < k:
            raise ValueError(f"need 1 <= k <= candidates, got k={k}, candidates={candidates}")
        if not 0.0 <= diversity <= 1.0:
            raise ValueError(f"diversity must be in [0, 1], got {diversity}")
        self.index = index
        self.label_lookup = label_lookup
        self.k, self.candidates, self.diversity = int(k), int(candidates), float(diversity)
        self.rerank_size = (int(rerank_size[0]), int(rerank_size[1]))
        self.filters = filters
        self.duplicate_threshold = float(duplicate_threshold)
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_size = int(cache_size)

    # -- exemplar label maps at rerank size, with their embeddings (for the diversity term)
    def _exemplars(self, rows: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(small label map, embedding) per row; misses are loaded and embedded in one batch."""
        missing = list(dict.fromkeys(r for r in rows if r not in self._cache))
        if missing:
            smalls = []
            for row in missing:
                ex_id = str(self.index.ids[row])
                if self.label_lookup is not None:
                    label = check_label_ids(self.label_lookup(ex_id), where=f"exemplar {ex_id}")
                else:
                    label = self.index.label(row)
                smalls.append(resize_nearest(label, self.rerank_size))
            for row, small, emb in zip(missing, smalls, embed_layouts(np.stack(smalls))):
                self._cache[row] = (small, emb)
        out = []
        for row in rows:
            self._cache.move_to_end(row)
            out.append(self._cache[row])
        while len(self._cache) > max(self._cache_size, len(rows)):
            self._cache.popitem(last=False)
        return out

    def _diverse_top_k(self, ids: list[str], iou: np.ndarray, emb: np.ndarray, k: int) -> list[int]:
        """Greedy MMR; candidates within ``duplicate_threshold`` of a pick go last."""
        order = sorted(range(len(ids)), key=lambda i: (-iou[i], ids[i]))
        picked: list[int] = []
        redundancy = np.full(len(ids), -np.inf)
        while len(picked) < min(k, len(ids)):
            left = [i for i in order if i not in picked]
            red = np.maximum(redundancy[left], 0.0) if picked else np.zeros(len(left))
            dup = red >= self.duplicate_threshold
            gain = (1.0 - self.diversity) * iou[left] - self.diversity * red
            best = min(range(len(left)), key=lambda j: (bool(dup[j]), -gain[j], ids[left[j]]))
            choice = left[best]
            picked.append(choice)
            redundancy = np.maximum(redundancy, emb @ emb[choice])
        return picked

    def query_batch(self, labels: Sequence[np.ndarray], target_ids: Sequence[str | None] | None = None, *,
                    embeddings: np.ndarray | None = None, filters: Filter = None,
                    exclude_ids: Sequence[Any] | None = None, k: int | None = None) -> list[list[Match]]:
        """Top-k exemplars for each target label map (best first). ``target_ids`` are excluded
        from their own results; ``exclude_ids`` adds per-target exclusions; ``filters`` overrides
        the retriever's default filter."""
        k = int(k or self.k)
        n = len(labels)
        if target_ids is None:
            target_ids = [None] * n
        if len(target_ids) != n:
            raise ValueError(f"{len(target_ids)} target ids for {n} labels")
        labels = [check_label_ids(lab, where=f"target {tid or i}") for i, (lab, tid) in enumerate(zip(labels, target_ids))]
        if embeddings is None:
            embeddings = embed_layouts(labels)
        excl = []
        for i, tid in enumerate(target_ids):
            extra = [] if exclude_ids is None or exclude_ids[i] is None else (
                [exclude_ids[i]] if isinstance(exclude_ids[i], str) else list(exclude_ids[i]))
            excl.append(([tid] if tid is not None else []) + extra)
        hits = self.index.search(embeddings, max(self.candidates, k), exclude_ids=excl,
                                 filters=filters if filters is not None else self.filters)
        results = []
        for i in range(n):
            rows = [int(r) for r in hits.rows[i] if r >= 0]
            if not rows:
                results.append([])
                continue
            target_small = resize_nearest(labels[i], self.rerank_size)
            exemplars = self._exemplars(rows)
            iou = class_iou(target_small, np.stack([e[0] for e in exemplars]))
            emb = np.stack([e[1] for e in exemplars])
            ids = [str(self.index.ids[r]) for r in rows]
            picks = self._diverse_top_k(ids, iou, emb, k)
            results.append([Match(exemplar_id=ids[j], score=float(iou[j]), embed_score=float(hits.scores[i, j]),
                                  meta=self.index.meta(rows[j])) for j in picks])
        return results

    def query(self, label: np.ndarray, target_id: str | None = None, **kwargs: Any) -> list[Match]:
        return self.query_batch([label], [target_id], **kwargs)[0]


class RetrieveStage:
    """Batch stage for Ray Data ``map_batches`` (a callable class: the index loads once per actor).

    Reads ``label`` (and ``embedding`` if the embed stage ran) and ``layout_id``; adds
    ``exemplar_id`` (best match, "" when none: the caller quarantines it as a missing exemplar),
    ``exemplar_score`` (float32 mean class IoU) and ``exemplar_matches`` (JSON list of
    {"id", "score"} for the k picks, best first).
    """

    def __init__(self, index_dir: str, k: int = 1, candidates: int = 32, diversity: float = 0.3,
                 rerank_size: tuple[int, int] = DEFAULT_RERANK_SIZE, filters: Mapping[str, Any] | None = None,
                 label_column: str = "label", id_column: str = "layout_id",
                 embedding_column: str = "embedding", device: str = "cpu"):
        self.retriever = Retriever(index_dir, k=k, candidates=candidates, diversity=diversity,
                                   rerank_size=tuple(rerank_size), filters=filters, device=device)
        self.label_column, self.id_column, self.embedding_column = label_column, id_column, embedding_column

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        labels = list(batch[self.label_column])
        ids = [str(x) for x in batch[self.id_column]] if self.id_column in batch else None
        emb = batch.get(self.embedding_column)
        emb = None if emb is None else np.stack(list(emb)).astype(np.float32)
        matches = self.retriever.query_batch(labels, ids, embeddings=emb)
        out = dict(batch)
        out["exemplar_id"] = np.array([m[0].exemplar_id if m else "" for m in matches], dtype=object)
        out["exemplar_score"] = np.array([m[0].score if m else 0.0 for m in matches], dtype=np.float32)
        out["exemplar_matches"] = np.array(
            [json.dumps([{"id": x.exemplar_id, "score": round(x.score, 6)} for x in m]) for m in matches], dtype=object)
        return out


class PlanRetrieveStage:
    """Retrieve of the plan pass (a callable class: the index loads once per actor).

    Takes the columns of the read + augment and embed batches (``layout_id``, ``item``, ``augment``,
    ``error``, ``label``, ``embedding``); rows with an error skip the query. Returns the plan row
    columns with ``matches``: the k picks as JSON (best first), "" for a skipped row.
    ``exclude_self``: a target never gets itself as its exemplar.
    """

    PLAN_COLUMNS = ("layout_id", "item", "augment", "error")

    def __init__(self, index_dir: str, k: int, candidates: int, diversity: float, filters: Mapping[str, Any] | None,
                 exclude_self: bool):
        self.stage = RetrieveStage(index_dir, k=k, candidates=max(candidates, k), diversity=diversity,
                                   filters=filters or None, id_column="layout_id" if exclude_self else "__none__")

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list]:
        rows = batch_rows(batch)
        ok = [i for i, r in enumerate(rows) if not r["error"]]
        matches = [""] * len(rows)
        if ok:
            sub = {"layout_id": np.array([rows[i]["layout_id"] for i in ok], dtype=object),
                   "label": [rows[i]["label"] for i in ok],
                   "embedding": np.stack([rows[i]["embedding"] for i in ok])}
            res = self.stage(sub)
            for j, i in enumerate(ok):
                matches[i] = str(res["exemplar_matches"][j])
        out = batch_columns(rows, self.PLAN_COLUMNS)
        out["matches"] = matches
        return out


# ---------------------------------------------------------------- the exemplar index

def exemplar_meta(layout: Layout) -> dict[str, Any]:
    """What the index keeps about an exemplar for filtering: source, split and scalar meta (e.g. domain)."""
    meta: dict[str, Any] = {"source": layout.source, "split": layout.split}
    meta.update({k: v for k, v in layout.meta.items() if isinstance(v, (str, int, float, bool)) or v is None})
    return meta


def index_thumb(label: np.ndarray, size: tuple[int, int] = DEFAULT_RERANK_SIZE) -> np.ndarray:
    """The small label map the index stores for the exact rerank."""
    return resize_nearest(label, size).astype(np.uint8)


def write_exemplar_index(ids: Sequence[str], embeddings: np.ndarray, thumbs: Sequence[np.ndarray],
                         metas: Sequence[dict], out_dir: str | os.PathLike, num_shards: int = 1,
                         **index_kwargs: Any) -> ShardedIndex:
    """The one place an exemplar index is written: embeddings, ids, meta and small label maps."""
    if not len(ids):
        raise ValueError(f"index build {out_dir}: no layouts to index")
    return ShardedIndex.build(np.asarray(embeddings, np.float32), [str(x) for x in ids], list(metas), out_dir,
                              num_shards, labels=np.stack(thumbs).astype(np.uint8), embedding_version=EMBED_VERSION,
                              **index_kwargs)


INDEX_ROW_COLUMNS = ("layout_id", "error", "embedding", "thumb", "meta")


def index_rows_batch(batch: Mapping[str, Any], spec: str,
                     thumb_size: tuple[int, int] = DEFAULT_RERANK_SIZE) -> dict[str, list]:
    """Ray Data batch function (numpy format): exemplar item descriptors (JSON, column ``item``) ->
    read -> what the index keeps (embedding, small label map, meta as JSON).

    An unreadable item, or one without an image (it cannot lend appearance), gets its error row as
    JSON in ``error`` and placeholder values. ``spec`` is a ``stages.read.source_spec``.
    """
    src = cached_source(spec)
    rows, good = [], []
    for raw in batch["item"]:
        item = json.loads(raw)
        lay, err = read_item(src, item, stage="exemplar")
        if lay is not None and lay.image is None:
            lay, err = None, {"input_id": item["item_id"], "source": item.get("source"), "stage": "exemplar",
                              "reason": "exemplar has no image", "path": item.get("path")}
        row = {"layout_id": str(item["item_id"]), "error": "", "embedding": np.zeros(1, np.float32),
               "thumb": np.zeros((1, 1), np.uint8), "meta": json.dumps({}, sort_keys=True)}
        if lay is None:
            row["error"] = json.dumps(err)
        else:
            row["thumb"] = index_thumb(lay.label, thumb_size)
            row["meta"] = json.dumps(exemplar_meta(lay), sort_keys=True)
            good.append((row, lay.label))
        rows.append(row)
    if good:
        for (row, _), vec in zip(good, embed_layouts([lab for _, lab in good])):
            row["embedding"] = vec
    return batch_columns(rows, INDEX_ROW_COLUMNS)


@dataclass
class IndexBuildStats:
    count: int
    skipped: int
    shards: int
    kind: str
    seconds: float
    out_dir: str
    parts_resumed: int = 0


def build_exemplar_index(layouts: Iterable[Layout], out_dir: str | os.PathLike, num_shards: int = 1, *,
                         thumb_size: tuple[int, int] = DEFAULT_RERANK_SIZE, require_image: bool = False,
                         on_layout: Callable[[Layout], None] | None = None,
                         **index_kwargs: Any) -> tuple[ShardedIndex, IndexBuildStats]:
    """Embed ``layouts`` (in one process, streaming) and write their index; one part, not resumable.
    See :func:`build_exemplar_index_parts`."""
    return build_exemplar_index_parts([lambda: layouts], out_dir, num_shards, thumb_size=thumb_size,
                                      require_image=require_image, on_layout=on_layout, resume=False, **index_kwargs)


def build_exemplar_index_parts(parts: Sequence[Callable[[], Iterable[Layout]]], out_dir: str | os.PathLike,
                               num_shards: int = 1, *, thumb_size: tuple[int, int] = DEFAULT_RERANK_SIZE,
                               require_image: bool = False, on_layout: Callable[[Layout], None] | None = None,
                               resume: bool = False, fingerprint: Mapping[str, Any] | None = None,
                               on_part: Callable[[int, bool], None] | None = None,
                               **index_kwargs: Any) -> tuple[ShardedIndex, IndexBuildStats]:
    """Embed the layouts of each part (streaming to disk) and write their index.

    ``parts[i]()`` yields part i's layouts. Only one embedding batch of label maps is in memory
    at a time; vectors and small label maps go to the staging folder (connectors.index_staging).
    With ``resume``, parts sealed by an earlier, killed build of the same ``fingerprint`` are not
    read again, and its finished shards are kept. ``on_part(i, resumed)`` runs after each part.
    Meta per row: ``source``, ``split`` and the scalar entries of ``layout.meta`` (e.g. domain).
    ``require_image`` skips layouts without an image (they cannot serve as exemplars).
    ``on_layout`` is called once per layout read (progress bars).
    """
    t0 = time.perf_counter()
    fp = {"parts": len(parts), "thumb_size": list(thumb_size), "require_image": require_image,
          "embedding_version": EMBED_VERSION, **dict(fingerprint or {})}
    builder = IndexBuilder(out_dir, fingerprint=fp, resume=resume)
    try:
        return _build_parts(builder, parts, out_dir, num_shards, thumb_size, require_image, on_layout, on_part,
                            t0, index_kwargs)
    except BaseException:
        if not resume:   # nothing to continue from: leave no staging folder behind
            shutil.rmtree(staging_dir(out_dir), ignore_errors=True)
        raise


def _build_parts(builder: IndexBuilder, parts, out_dir, num_shards, thumb_size, require_image, on_layout, on_part,
                 t0: float, index_kwargs: dict) -> tuple[ShardedIndex, IndexBuildStats]:
    resumed = builder.parts_done
    skipped = sum(int(builder.part_info(i).get("skipped", 0)) for i in range(resumed))
    for i in range(resumed):
        if on_part:
            on_part(i, True)
    for i in range(resumed, len(parts)):
        part_skipped = 0
        ids: list[str] = []
        metas: list[dict] = []
        pending: list[np.ndarray] = []

        def flush() -> None:
            if pending:
                builder.add(embed_layouts(pending), ids, metas,
                            np.stack([index_thumb(lab, thumb_size) for lab in pending]))
                ids.clear(), metas.clear(), pending.clear()

        for layout in parts[i]():
            if on_layout:
                on_layout(layout)
            if require_image and layout.image is None:
                part_skipped += 1
                continue
            pending.append(check_label_ids(layout.label, where=f"layout {layout.layout_id}"))
            ids.append(str(layout.layout_id))
            metas.append(exemplar_meta(layout))
            if len(pending) >= THUMB_BATCH:
                flush()
        flush()
        builder.seal(skipped=part_skipped)
        skipped += part_skipped
        if on_part:
            on_part(i, False)
    if not builder.rows_done:
        raise ValueError(f"index build {out_dir}: no layouts to index" + (f" ({skipped} had no image)" if skipped else ""))
    index = builder.finish(num_shards, embedding_version=EMBED_VERSION, **index_kwargs)
    stats = IndexBuildStats(count=len(index), skipped=skipped, shards=index.num_shards, kind=index.kind,
                            seconds=time.perf_counter() - t0, out_dir=str(Path(out_dir)), parts_resumed=resumed)
    return index, stats
