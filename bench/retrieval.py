"""Exemplar index benchmark: sharded IVF vs exact brute force on >= 100k layout embeddings.

Synthetic street layouts (32x64 label maps, Cityscapes ids) are drawn cheaply in numpy
batches: each scene picks one of a few archetypes (urban canyon, suburb, highway, park,
plaza, overpass) and jitters its horizon, road, side structures, cars, people and poles, so
the embeddings cluster the way real driving scenes do. They go through the real embedding
(stages/embed.py) and the real index (connectors/index_store.py).

Measured in one run on the same queries (held-out layouts, not in the index):
  * recall@10 of the sharded index vs exact top-10 (``faiss.knn`` over all vectors),
  * queries/s of both, and their ratio ``speedup`` (best of ``--repeats`` wall timings each; the
    ratio of process CPU time per query too, which other jobs on a shared box disturb less).
    Beyond 200k vectors brute force is timed on the first ``--brute-queries`` (200) queries,
    while the exact top-10 for recall is computed for all of them,
  * build time and peak RSS of the sharded index (k-means + parallel shard build + write + load),
  * embedding throughput, and how often the best layout by exact class IoU is among the
    32 embedding candidates the rerank sees (ours vs a histogram-only embedding).

Layouts are generated and embedded 10k at a time, so 1M runs in ~7 GiB (vectors 2.6 GB, the
index another 2.6 GB). Last line: one JSON object.
Usage: python bench/retrieval.py [--n 100000] [--shards 8] [--nlist N] [--nprobe P]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

import faiss  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from connectors.index_store import (KMEANS_ITERATIONS, TRAIN_POINTS_PER_LIST, ShardedIndex,  # noqa: E402
                                    default_nlist)
from stages.embed import EMBED_DIM, EMBED_VERSION, NUM_CHANNELS, embed_layouts  # noqa: E402
from stages.retrieve import Retriever, class_iou  # noqa: E402

ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN = 7, 8, 11, 12, 13, 17, 19, 20
VEGETATION, TERRAIN, SKY, PERSON, CAR, TRUCK, BUS = 21, 22, 23, 24, 26, 27, 28

# Archetypes: horizon (fraction of H), road half-width growth, skyline height (fraction of H),
# side classes above / below the horizon, cars and people expected.
ARCHETYPES = [
    dict(horizon=0.45, road=0.9, sky=0.40, side=(BUILDING, BUILDING), ground=(SIDEWALK, SIDEWALK), cars=3, people=2),
    dict(horizon=0.50, road=0.7, sky=0.20, side=(VEGETATION, BUILDING), ground=(TERRAIN, SIDEWALK), cars=2, people=1),
    dict(horizon=0.40, road=1.6, sky=0.08, side=(VEGETATION, VEGETATION), ground=(TERRAIN, TERRAIN), cars=4, people=0),
    dict(horizon=0.55, road=0.4, sky=0.25, side=(VEGETATION, VEGETATION), ground=(TERRAIN, VEGETATION), cars=0, people=2),
    dict(horizon=0.50, road=1.2, sky=0.15, side=(BUILDING, WALL), ground=(SIDEWALK, TERRAIN), cars=3, people=3),
    dict(horizon=0.35, road=1.0, sky=0.30, side=(WALL, FENCE), ground=(SIDEWALK, SIDEWALK), cars=2, people=0),
]


def synthetic_layouts(n: int, seed: int, height: int = 32, width: int = 64) -> np.ndarray:
    """(n, height, width) uint8 street layouts, vectorised over the batch."""
    rng = np.random.default_rng(seed)
    H, W = height, width
    yy = np.arange(H, dtype=np.float32)[None, :, None] + 0.5
    xx = np.arange(W, dtype=np.float32)[None, None, :] + 0.5
    arch = rng.integers(0, len(ARCHETYPES), n)
    A = {key: np.array([ARCHETYPES[a][key] for a in arch]) for key in ("horizon", "road", "sky", "cars", "people")}
    col = lambda v: np.asarray(v, np.float32)[:, None, None]  # noqa: E731
    horizon = col(np.clip(A["horizon"] + rng.normal(0, 0.06, n), 0.2, 0.7) * H)
    vx = col(np.clip(0.5 + rng.normal(0, 0.12, n), 0.15, 0.85) * W)
    road = col(np.clip(A["road"] * rng.lognormal(0, 0.2, n), 0.2, 3.0))
    walk = col(rng.uniform(0.2, 0.8, n)) * road
    below = np.maximum(yy - horizon, 0)
    dx = xx - vx
    left = dx < 0
    side_cls = np.array([ARCHETYPES[a]["side"] for a in arch], np.uint8)
    ground_cls = np.array([ARCHETYPES[a]["ground"] for a in arch], np.uint8)
    flip = rng.random(n) < 0.5  # mirror scenes so left/right are not fixed per archetype
    side_cls[flip] = side_cls[flip][:, ::-1]
    ground_cls[flip] = ground_cls[flip][:, ::-1]

    label = np.where(left, ground_cls[:, 0, None, None], ground_cls[:, 1, None, None]).astype(np.uint8)
    label = np.broadcast_to(label, (n, H, W)).copy()
    label[np.broadcast_to(np.abs(dx) < (road + walk) * below, label.shape)] = SIDEWALK
    label[np.broadcast_to(np.abs(dx) < road * below, label.shape)] = ROAD
    # Skyline: 8 column blocks per scene, each with its own top above the horizon.
    blocks = 8
    heights = rng.uniform(0.1, 1.0, (n, blocks)) * (1.0 - A["sky"][:, None]) * horizon[:, :, 0]
    tops = horizon[:, :, 0] - heights
    block_of_x = np.minimum((xx[0, 0] / W * blocks).astype(int), blocks - 1)
    top_x = tops[:, block_of_x][:, None, :]
    structure = (yy < horizon) & (yy >= top_x)
    side_map = np.where(left, side_cls[:, 0, None, None], side_cls[:, 1, None, None])
    label = np.where(structure, side_map, label)
    label = np.where((yy < horizon) & ~structure, SKY, label)
    # Vehicles on the road, sized by perspective; people and poles on the sidewalks.
    for slot in range(4):
        present = col(rng.random(n) < A["cars"] / 4.0) > 0
        depth = col(rng.uniform(0.1, 1.0, n))
        bottom = horizon + depth * (H - horizon)
        scale = depth * (H - horizon)
        cx = vx + col(rng.uniform(-0.8, 0.8, n)) * road * (bottom - horizon)
        w = scale * col(rng.uniform(0.8, 1.4, n))
        h = w * col(rng.uniform(0.45, 0.8, n))
        kind = np.where(rng.random(n) < 0.85, CAR, np.where(rng.random(n) < 0.5, TRUCK, BUS)).astype(np.uint8)
        box = present & (yy < bottom) & (yy >= bottom - h) & (np.abs(xx - cx) < w / 2)
        label = np.where(box, kind[:, None, None], label)
    for slot in range(3):
        present = col(rng.random(n) < A["people"] / 3.0) > 0
        depth = col(rng.uniform(0.2, 1.0, n))
        bottom = horizon + depth * (H - horizon)
        side = col(np.where(rng.random(n) < 0.5, -1.0, 1.0))
        cx = vx + side * (road + walk / 2) * (bottom - horizon)
        h = depth * (H - horizon) * 0.9
        box = present & (yy < bottom) & (yy >= bottom - h) & (np.abs(xx - cx) < np.maximum(h / 6, 0.6))
        label = np.where(box, PERSON, label)
    for slot in range(2):
        present = col(rng.random(n) < 0.6) > 0
        depth = col(rng.uniform(0.3, 1.0, n))
        bottom = horizon + depth * (H - horizon)
        side = col(np.where(rng.random(n) < 0.5, -1.0, 1.0))
        cx = vx + side * (road + walk * 0.8) * (bottom - horizon)
        h = depth * H * 0.8
        pole = present & (yy < bottom) & (yy >= bottom - h) & (np.abs(xx - cx) < 0.6)
        label = np.where(pole, POLE, label)
        has_sign = col(rng.random(n) < 0.5) > 0
        head = present & has_sign & (yy >= bottom - h) & (yy < bottom - h + 2) & (np.abs(xx - cx) < 1.5)
        label = np.where(head, SIGN, label)
    return label.astype(np.uint8)


def timed(fn, repeats: int):
    """Best of ``repeats`` runs: (wall seconds, process CPU seconds of that run, result)."""
    best, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall = time.perf_counter() - t0
        if wall < best:
            best, cpu = wall, time.process_time() - c0
    return best, cpu, out


def recall_at(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a[a >= 0].tolist()) & set(e.tolist())) / exact.shape[1]
                          for a, e in zip(approx, exact)]))


def histogram_embedding(labels: np.ndarray) -> np.ndarray:
    """The baseline without the spatial grid: sqrt class histogram only (same channels)."""
    full = embed_layouts(labels)
    hist = full[:, EMBED_DIM - NUM_CHANNELS:]
    return hist / np.linalg.norm(hist, axis=1, keepdims=True)


def candidate_recall(labels: np.ndarray, queries: np.ndarray, emb_db: np.ndarray, emb_q: np.ndarray,
                     candidates: int = 32) -> tuple[float, float]:
    """How well the embedding feeds the exact rerank, against exact class IoU over the whole pool:
    (fraction of queries whose IoU-best layout is among the top-``candidates``,
     mean of best IoU among the candidates / best IoU overall)."""
    top = np.argsort(-(emb_q @ emb_db.T), axis=1, kind="stable")[:, :candidates]
    hits, ratios = [], []
    for q, t in zip(queries, top):
        iou = class_iou(q, labels)
        hits.append(int(np.argmax(iou)) in set(t.tolist()))
        ratios.append(iou[t].max() / max(iou.max(), 1e-9))
    return float(np.mean(hits)), float(np.mean(ratios))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux: KiB


def embedded_layouts(n: int, seed: int, keep: int, chunk: int = 10_000) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Generate and embed ``n`` layouts chunk by chunk (1M label maps would be 2 GB); keep only the
    first ``keep`` label maps. Returns (vectors, kept labels, generate seconds, embed seconds)."""
    xb = np.empty((n, EMBED_DIM), np.float32)
    kept, gen_s, embed_s = [], 0.0, 0.0
    for s in range(0, n, chunk):
        t0 = time.perf_counter()
        labels = synthetic_layouts(min(chunk, n - s), seed=seed * 1000 + s // chunk)
        t1 = time.perf_counter()
        xb[s:s + len(labels)] = embed_layouts(labels)
        gen_s, embed_s = gen_s + t1 - t0, embed_s + time.perf_counter() - t1
        if s < keep:
            kept.append(labels[: keep - s])
    return xb, np.concatenate(kept), gen_s, embed_s


def compare_index_types(xb: np.ndarray, xq: np.ndarray, exact: np.ndarray, qps_brute: float, specs: list[str],
                        seed: int, repeats: int) -> dict:
    """Other FAISS index types on the same vectors, one unsharded index each, against the same
    brute-force rate. ``spec``: "<index_factory string>|nprobe=N[,k_factor=F];..." e.g.
    "IVF2048,SQ8,RFlat|nprobe=16,k_factor=4" (RFlat: IndexRefineFlat, exact rerank of k*F)."""
    out = {}
    rng = np.random.default_rng(seed)
    for spec in specs:
        factory, settings = spec.split("|")
        t0 = time.perf_counter()
        index = faiss.index_factory(xb.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = KMEANS_ITERATIONS
        size = min(len(xb), ivf.nlist * TRAIN_POINTS_PER_LIST)
        index.train(xb[np.sort(rng.choice(len(xb), size, replace=False))])
        index.add(xb)
        build_s = time.perf_counter() - t0
        for setting in settings.split(";"):
            kv = dict(item.split("=") for item in setting.split(","))
            ivf.nprobe = int(kv["nprobe"])
            if "k_factor" in kv:
                faiss.downcast_index(index).k_factor = float(kv["k_factor"])
            wall, _, (_, rows) = timed(lambda: index.search(xq, 10), repeats)
            row = {"recall_at_10": round(recall_at(rows, exact), 4), "qps": round(len(xq) / wall, 1),
                   "speedup": round(len(xq) / wall / qps_brute, 2), "build_seconds": round(build_s, 1)}
            out[f"{factory}|{setting}"] = row
            print(f"  {factory:28s} {setting:22s} {row}", file=sys.stderr)
        del index
    return out


def staged_build(n: int, seed: int, out: str, shards: int, nlist: int, nprobe: int, part_size: int) -> dict:
    """``amgen index build``'s code path (stages.retrieve.build_exemplar_index_parts) over the same
    synthetic layouts, read part by part as a source would be; run in a child process so that its
    peak RSS is the build's alone."""
    from amgen_core.records import Layout
    from stages.retrieve import build_exemplar_index_parts

    def part(lo: int, hi: int):
        for s in range(lo - lo % 10_000, hi, 10_000):   # generator chunks of 10k, as embedded_layouts
            labels = synthetic_layouts(min(10_000, n - s), seed=seed * 1000 + s // 10_000)
            for i in range(max(lo, s), min(hi, s + len(labels))):
                yield Layout(layout_id=f"syn-{i:07d}", source="synthetic", label=labels[i - s])

    bounds = list(range(0, n, part_size)) + [n]
    t0 = time.perf_counter()
    index, stats = build_exemplar_index_parts([lambda lo=lo, hi=hi: part(lo, hi) for lo, hi in zip(bounds, bounds[1:])],
                                              out, shards, ivf_threshold=1, nlist=nlist, nprobe=nprobe, seed=seed,
                                              fingerprint={"bench": n})
    return {"seconds": time.perf_counter() - t0, "peak_rss_gib": peak_rss_gib(), "count": stats.count}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--brute-queries", type=int, default=None,
                    help="queries whose brute-force search is timed (default: all up to 200k vectors, else 200)")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--nlist", type=int, default=None, help="default: index_store.default_nlist(n), 1024 at 100k, 4096 at 1M")
    ap.add_argument("--nprobe", type=int, default=None, help="default: 12 up to nlist 1024, else 24 (see docs/performance.md)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quality-pool", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--build", choices=("memory", "staged"), default="memory",
                    help="memory: ShardedIndex.build over the vectors in hand; staged: `amgen index build`'s "
                    "streaming, resumable path in a child process, from the label maps (re-embedded there)")
    ap.add_argument("--part-size", type=int, default=20_000, help="layouts per staged part (--build staged)")
    ap.add_argument("--compare", nargs="*", default=[], metavar="SPEC",
                    help='other index types on the same data, e.g. "IVF2048,SQ8,RFlat|nprobe=16,k_factor=4" '
                    '(see compare_index_types); adds "compare" to the JSON')
    args = ap.parse_args()
    threads = faiss.omp_get_max_threads()
    nlist = args.nlist or default_nlist(args.n)
    nprobe = args.nprobe or (12 if nlist <= 1024 else 24)
    n_brute = min(args.queries, args.brute_queries or (args.queries if args.n <= 200_000 else 200))

    pool_size = min(args.quality_pool, args.n)
    xb, pool, gen_s, embed_s = embedded_layouts(args.n, args.seed, pool_size)
    query_labels = synthetic_layouts(args.queries, seed=args.seed * 1000 + 999)
    xq = embed_layouts(query_labels)
    print(f"generated {args.n} layouts in {gen_s:.1f}s, embedded in {embed_s:.1f}s "
          f"({args.n / embed_s:,.0f} layouts/s, dim {EMBED_DIM}); peak RSS {peak_rss_gib():.2f} GiB", file=sys.stderr)

    ids = [f"syn-{i:07d}" for i in range(args.n)]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if args.build == "staged":
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(1) as child:
                built = child.apply(staged_build, (args.n, args.seed, str(Path(tmp) / "index"), args.shards,
                                                   nlist, nprobe, args.part_size))
            index = ShardedIndex.load(Path(tmp) / "index", verify=False)
            build_s, build_rss = time.perf_counter() - t0, built["peak_rss_gib"]
        else:
            index = ShardedIndex.build(xb, ids, None, Path(tmp) / "index", args.shards, ivf_threshold=1,
                                       nlist=nlist, nprobe=nprobe, embedding_version=EMBED_VERSION, seed=args.seed)
            build_s = time.perf_counter() - t0
            build_rss = peak_rss_gib()
        print(f"built {index.kind} index: {args.shards} shards, nlist {index.nlist}, nprobe {index.nprobe} "
              f"in {build_s:.1f}s; peak RSS {build_rss:.2f} GiB", file=sys.stderr)

        # Exact top-10 of every query (faiss.knn: BLAS over xb in place, no copy of the 2.6 GB at 1M),
        # then the brute-force timing on the first n_brute queries.
        _, _, (_, exact) = timed(lambda: faiss.knn(xq, xb, 10, faiss.METRIC_INNER_PRODUCT), 1)
        brute_s, brute_cpu, _ = timed(lambda: faiss.knn(xq[:n_brute], xb, 10, faiss.METRIC_INNER_PRODUCT), args.repeats)
        shard_s, shard_cpu, hits = timed(lambda: index.search(xq, 10), args.repeats)
        recall = recall_at(hits.rows, exact)
        qps_brute, qps_index = n_brute / brute_s, len(xq) / shard_s
        sweep = {}
        for probe in sorted({max(1, nprobe // 2), nprobe, nprobe * 2, nprobe * 4}):
            s, _, h = timed(lambda: index.search(xq, 10, nprobe=probe), 1)
            sweep[str(probe)] = {"recall_at_10": round(recall_at(h.rows, exact), 4), "qps": round(len(xq) / s, 1)}
        print(f"brute force {qps_brute:,.1f} q/s ({n_brute} queries); sharded {qps_index:,.0f} q/s; "
              f"recall@10 {recall:.4f}; speedup {qps_index / qps_brute:.1f}x wall, "
              f"{(brute_cpu / n_brute) / (shard_cpu / len(xq)):.1f}x CPU time; sweep {sweep}", file=sys.stderr)
        del index
    compared = compare_index_types(xb, xq, exact, qps_brute, args.compare, args.seed, args.repeats) if args.compare else None

    # Embedding choice: does the exact IoU winner reach the rerank? (ours vs histogram only)
    qsub = query_labels[:100]
    ours = candidate_recall(pool, qsub, xb[: len(pool)], xq[:100])
    hist_only = candidate_recall(pool, qsub, histogram_embedding(pool), histogram_embedding(qsub))
    print(f"IoU-best in top-32 candidates: layout embedding {ours[0]:.2f} (IoU ratio {ours[1]:.3f}), "
          f"histogram only {hist_only[0]:.2f} (IoU ratio {hist_only[1]:.3f})", file=sys.stderr)

    # End to end per target: FAISS candidates + exact rerank + diverse top-k (flat index over the pool).
    with tempfile.TemporaryDirectory() as tmp:
        pool_index = ShardedIndex.build(xb[: len(pool)], ids[: len(pool)], None, Path(tmp) / "pool", 2,
                                        labels=pool, embedding_version=EMBED_VERSION)
        retriever = Retriever(pool_index, k=4, candidates=32, diversity=0.3)
        retr_s, _, _ = timed(lambda: retriever.query_batch(list(query_labels[:200])), 1)
    print(f"retriever (32 candidates, rerank at 32x64, k=4): {200 / retr_s:,.0f} targets/s", file=sys.stderr)

    speedup = qps_index / qps_brute
    result = {
        "n": args.n, "dim": EMBED_DIM, "shards": args.shards, "kind": "ivf", "nlist": nlist,
        "nprobe": nprobe, "queries": len(xq), "recall_at_10": round(recall, 4),
        "qps_sharded": round(qps_index, 1), "qps_bruteforce": round(qps_brute, 1),
        "speedup_vs_bruteforce": round(speedup, 2), "build_seconds": round(build_s, 2),
        "embed_layouts_per_s": round(args.n / embed_s, 1), "nprobe_sweep": sweep,
        "iou_best_in_top32": ours[0], "iou_ratio_top32": round(ours[1], 4),
        "iou_best_in_top32_hist_only": hist_only[0], "iou_ratio_top32_hist_only": round(hist_only[1], 4),
        "retriever_targets_per_s": round(200 / retr_s, 1), "faiss_threads": threads, "faiss_version": faiss.__version__,
        "speedup": round(speedup, 2),
        "speedup_cpu_time": round((brute_cpu / n_brute) / (shard_cpu / len(xq)), 2),
        "bruteforce_queries": n_brute, "build": args.build, "build_peak_rss_gib": round(build_rss, 2), "peak_rss_gib": round(peak_rss_gib(), 2),
    }
    if compared:
        result["compare"] = compared
    print(json.dumps(result))


if __name__ == "__main__":
    main()
