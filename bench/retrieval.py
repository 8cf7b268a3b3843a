"""Exemplar index benchmark: sharded IVF vs exact brute force on >= 100k layout embeddings.

Synthetic street layouts (32x64 label maps, Cityscapes ids) are drawn cheaply in numpy
batches: each scene picks one of a few archetypes (urban canyon, suburb, highway, park,
plaza, overpass) and jitters its horizon, road, side structures, cars, people and poles, so
the embeddings cluster the way real driving scenes do. They go through the real embedding
(stages/embed.py) and the real index (connectors/index_store.py).

Measured in one run on the same queries (held-out layouts, not in the index):
  * recall@10 of the sharded index vs exact top-10 (``faiss.knn`` over all vectors),
  * the cost per query of both arms, on the SAME queries (all ``--queries``), with the SAME
    number of FAISS/BLAS threads (``--threads``, default 1), each timed ``--repeats`` times
    after a warm-up: the median process CPU time per query and the median wall time per query.
    ``speedup`` is the ratio of the CPU-time medians (what holds from run to run on a shared
    box); ``speedup_wall`` the ratio of the wall medians,
  * the OpenBLAS kernel both arms run on (``--blas``): faiss-cpu's bundled OpenBLAS 0.3.15 does
    not know every CPU and falls back to a generic SSE3 kernel ("Prescott") ~15x slower for
    brute force; ``auto`` (default) pins the best kernel the CPU runs (SkylakeX with AVX-512,
    Haswell with AVX2) through OPENBLAS_CORETYPE before faiss loads; ``env`` keeps the
    environment's. The kernel used is in the JSON (``blas``),
  * build time and peak RSS of the sharded index (k-means + parallel shard build + write + load),
  * embedding throughput, and how often the best layout by exact class IoU is among the
    32 embedding candidates the rerank sees (ours vs a histogram-only embedding).

``--cache DIR`` keeps the generated vectors and the built index there (keyed by every input
that shapes them), so a repeat run measures the queries without generating or building again.
Layouts are generated and embedded 10k at a time. At 1M the vectors are 2.6 GB and the index
another 2.6 GB (flat lists, or the pq codec's rerank copy): peak RSS ~8.5 GiB for a run that
builds (memory-mapped vectors counted), ~6 GiB for one that loads from ``--cache``.
Last line: one JSON object.
Usage: python bench/retrieval.py [--n 100000] [--shards 8] [--nlist N] [--nprobe P] [--threads 1]
       [--repeats 3] [--cache /tmp/amgen-bench-retrieval] [--index ivf|ivfpq]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def best_openblas_coretype() -> str | None:
    """The fastest OpenBLAS kernel family this CPU runs (None: leave OpenBLAS's own choice)."""
    flags = cpu_flags()
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def _pin_blas(argv: list[str]) -> None:
    """Set OPENBLAS_CORETYPE from ``--blas`` before numpy and faiss load their OpenBLAS."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--blas", default="auto")
    choice = pre.parse_known_args(argv)[0].blas
    if choice == "env":
        return
    core = best_openblas_coretype() if choice == "auto" else choice
    if core:
        os.environ["OPENBLAS_CORETYPE"] = core


if __name__ == "__main__":
    _pin_blas(sys.argv[1:])

import faiss  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from connectors.index_store import (DEFAULT_RERANK, KMEANS_ITERATIONS, TRAIN_POINTS_PER_LIST,  # noqa: E402
                                    ShardedIndex, default_nlist)
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


def timed(fn, repeats: int, warmup: bool = True) -> dict:
    """Run ``fn`` ``repeats`` times (after one untimed warm-up run unless ``warmup`` is False).

    Returns {"cpu": [...], "wall": [...], "cpu_median", "wall_median", "out": the last result}:
    process CPU seconds and wall seconds of every run. With a fixed thread count the CPU time is
    the work done, whatever else the machine runs; wall time also counts waiting for a core.
    """
    out = fn() if warmup else None
    cpu, wall = [], []
    for _ in range(max(1, repeats)):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"cpu": cpu, "wall": wall, "cpu_median": statistics.median(cpu), "wall_median": statistics.median(wall),
            "out": out}


def timed_interleaved(fns: dict, repeats: int) -> dict:
    """``timed`` for several arms, alternating them (a, b, a, b, ...) after one warm-up each, so
    that a change in the machine's load falls on every arm alike."""
    runs = {name: timed(fn, 1) for name, fn in fns.items()}   # warm-up + first timed run
    for _ in range(max(1, repeats) - 1):
        for name, fn in fns.items():
            one = timed(fn, 1, warmup=False)
            runs[name]["cpu"] += one["cpu"]
            runs[name]["wall"] += one["wall"]
            runs[name]["out"] = one["out"]
    for r in runs.values():
        r["cpu_median"], r["wall_median"] = statistics.median(r["cpu"]), statistics.median(r["wall"])
    return runs


def openblas_info() -> dict:
    """The OpenBLAS kernel faiss's bundled library runs (faiss-cpu wheels ship their own OpenBLAS)."""
    import ctypes
    import glob

    info = {"OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")}
    libs = sorted(glob.glob(str(Path(faiss.__file__).resolve().parents[1] / "faiss_cpu.libs" / "libopenblas*.so*")))
    try:
        lib = ctypes.CDLL(libs[0]) if libs else None
        if lib is not None:
            lib.openblas_get_corename.restype = ctypes.c_char_p
            lib.openblas_get_config.restype = ctypes.c_char_p
            info["faiss_openblas_core"] = lib.openblas_get_corename().decode()
            info["faiss_openblas_config"] = lib.openblas_get_config().decode()
    except (OSError, AttributeError):
        pass
    return info


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
    return xb, (np.concatenate(kept) if kept else np.empty((0, 32, 64), np.uint8)), gen_s, embed_s


def cached_layouts(n: int, seed: int, keep: int, cache: Path | None) -> tuple[np.ndarray, np.ndarray, dict]:
    """``embedded_layouts``, kept in ``cache`` (vectors memory-mapped on a repeat run)."""
    if cache is None:
        xb, pool, gen_s, embed_s = embedded_layouts(n, seed, keep)
        return xb, pool, {"generate_s": gen_s, "embed_s": embed_s, "cached": False}
    stem = f"layouts-n{n}-seed{seed}-{EMBED_VERSION}"
    vec, lab, info = (cache / f"{stem}.vectors.npy", cache / f"{stem}.pool.npy", cache / f"{stem}.json")
    if vec.is_file() and lab.is_file() and info.is_file() and np.load(lab, mmap_mode="r").shape[0] >= keep:
        return np.load(vec, mmap_mode="r"), np.load(lab)[:keep], {**json.loads(info.read_text()), "cached": True}
    xb, pool, gen_s, embed_s = embedded_layouts(n, seed, keep)
    cache.mkdir(parents=True, exist_ok=True)
    for path, arr in ((vec, xb), (lab, pool)):
        part = path.with_name(path.name + ".part.npy")
        np.save(part, arr)
        os.replace(part, path)
    info.write_text(json.dumps({"generate_s": gen_s, "embed_s": embed_s}))
    return xb, pool, {"generate_s": gen_s, "embed_s": embed_s, "cached": False}


def cost_row(run: dict, nq: int, brute: dict | None = None) -> dict:
    """CPU and wall milliseconds per query (medians), queries/s, and the speedups against ``brute``."""
    row = {"cpu_ms_per_query": round(1e3 * run["cpu_median"] / nq, 4),
           "wall_ms_per_query": round(1e3 * run["wall_median"] / nq, 4),
           "qps": round(nq / run["wall_median"], 1), "qps_cpu": round(nq / run["cpu_median"], 1)}
    if brute is not None:
        row["speedup"] = round(brute["cpu_median"] / run["cpu_median"], 2)
        row["speedup_wall"] = round(brute["wall_median"] / run["wall_median"], 2)
    return row


def compare_index_types(xb: np.ndarray, xq: np.ndarray, exact: np.ndarray, brute: dict, specs: list[str],
                        seed: int, repeats: int, threads: int, build_threads: int) -> dict:
    """Other FAISS index types on the same vectors, one unsharded index each, against the same
    brute-force timing. ``spec``: "<index_factory string>|nprobe=N[,k_factor=F][,ef=E];..." e.g.
    "IVF2048,SQ8,RFlat|nprobe=16,k_factor=4" (RFlat: IndexRefineFlat, exact rerank of k*F;
    ef: efSearch of an HNSW coarse quantizer, e.g. IVF4096_HNSW32)."""
    out = {}
    rng = np.random.default_rng(seed)
    for spec in specs:
        factory, settings = spec.split("|")
        faiss.omp_set_num_threads(build_threads)
        t0 = time.perf_counter()
        index = faiss.index_factory(xb.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = KMEANS_ITERATIONS
        size = min(len(xb), ivf.nlist * TRAIN_POINTS_PER_LIST)
        index.train(np.ascontiguousarray(xb[np.sort(rng.choice(len(xb), size, replace=False))]))
        for lo in range(0, len(xb), 50_000):
            index.add(np.ascontiguousarray(xb[lo:lo + 50_000]))
        build_s = time.perf_counter() - t0
        faiss.omp_set_num_threads(threads)
        for setting in settings.split(";"):
            kv = dict(item.split("=") for item in setting.split(","))
            ivf.nprobe = int(kv["nprobe"])
            if "k_factor" in kv:
                faiss.downcast_index(index).k_factor = float(kv["k_factor"])
            if "ef" in kv:
                faiss.downcast_index(ivf.quantizer).hnsw.efSearch = int(kv["ef"])
            run = timed(lambda: index.search(xq, 10), repeats)
            row = {"recall_at_10": round(recall_at(run["out"][1], exact), 4), **cost_row(run, len(xq), brute),
                   "build_seconds": round(build_s, 1)}
            out[f"{factory}|{setting}"] = row
            print(f"  {factory:28s} {setting:22s} {row}", file=sys.stderr)
        del index
    return out


def staged_build(n: int, seed: int, out: str, shards: int, index_kwargs: dict, part_size: int,
                 build_threads: int) -> dict:
    """``amgen index build``'s code path (stages.retrieve.build_exemplar_index_parts) over the same
    synthetic layouts, read part by part as a source would be; run in a child process so that its
    peak RSS is the build's alone."""
    from amgen_core.records import Layout
    from stages.retrieve import build_exemplar_index_parts

    faiss.omp_set_num_threads(build_threads)

    def part(lo: int, hi: int):
        for s in range(lo - lo % 10_000, hi, 10_000):   # generator chunks of 10k, as embedded_layouts
            labels = synthetic_layouts(min(10_000, n - s), seed=seed * 1000 + s // 10_000)
            for i in range(max(lo, s), min(hi, s + len(labels))):
                yield Layout(layout_id=f"syn-{i:07d}", source="synthetic", label=labels[i - s])

    bounds = list(range(0, n, part_size)) + [n]
    t0 = time.perf_counter()
    index, stats = build_exemplar_index_parts([lambda lo=lo, hi=hi: part(lo, hi) for lo, hi in zip(bounds, bounds[1:])],
                                              out, shards, ivf_threshold=1, seed=seed, fingerprint={"bench": n},
                                              **index_kwargs)
    return {"seconds": time.perf_counter() - t0, "peak_rss_gib": peak_rss_gib(), "count": stats.count}


def build_or_load(args, xb: np.ndarray, ids: list[str], index_kwargs: dict, root: Path) -> tuple[ShardedIndex, dict]:
    """The sharded index under ``root`` (loaded when a finished one is there: ``--cache``), else built."""
    key = "-".join(f"{k}{v}" for k, v in sorted(index_kwargs.items()) if k not in ("nprobe", "rerank"))   # search settings
    out = root / f"index-n{args.n}-seed{args.seed}-s{args.shards}-{key}-{args.build}-{EMBED_VERSION}"
    if (out / "manifest.json").is_file():
        t0 = time.perf_counter()
        index = ShardedIndex.load(out, verify=False, nprobe=index_kwargs.get("nprobe"), rerank=index_kwargs.get("rerank"))
        return index, {"cached": True, "load_seconds": round(time.perf_counter() - t0, 2), "build_seconds": None,
                       "build_peak_rss_gib": None}
    faiss.omp_set_num_threads(args.build_threads)
    t0 = time.perf_counter()
    if args.build == "staged":
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(1) as child:
            built = child.apply(staged_build, (args.n, args.seed, str(out), args.shards, index_kwargs,
                                               args.part_size, args.build_threads))
        index = ShardedIndex.load(out, verify=False)
        rss = built["peak_rss_gib"]
    else:
        index = ShardedIndex.build(xb, ids, None, out, args.shards, ivf_threshold=1, embedding_version=EMBED_VERSION,
                                   seed=args.seed, **index_kwargs)
        rss = peak_rss_gib()
    return index, {"cached": False, "build_seconds": round(time.perf_counter() - t0, 2), "build_peak_rss_gib": round(rss, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1000, help="held-out queries; both arms are timed on all of them")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--nlist", type=int, default=None, help="default: index_store.default_nlist(n), 1024 at 100k, 4096 at 1M")
    ap.add_argument("--nprobe", type=int, default=None, help="default: 12 up to nlist 1024, else 24 (see docs/performance.md)")
    ap.add_argument("--codec", default="flat", help="what the IVF lists hold: flat, or pq<M>x4fs (4-bit PQ fast-scan "
                    "codes + an exact rerank; connectors/index_store.py)")
    ap.add_argument("--rerank", type=int, default=None, help="pq codecs: candidates re-scored exactly per hit (default 16)")
    ap.add_argument("--threads", type=int, default=1, help="FAISS/OpenMP threads of both timed arms (brute force and index)")
    ap.add_argument("--build-threads", type=int, default=os.cpu_count() or 1, help="threads for k-means and the shard build")
    ap.add_argument("--blas", default="auto",
                    help="OpenBLAS kernel: auto (the best this CPU runs), env (OPENBLAS_CORETYPE as set), or a name")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each arm after a warm-up; medians count")
    ap.add_argument("--quality-pool", type=int, default=4000)
    ap.add_argument("--retriever-queries", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=None,
                    help="keep the generated vectors and the built index here; a repeat run reuses them")
    ap.add_argument("--no-sweep", action="store_true", help="skip the nprobe sweep")
    ap.add_argument("--build", choices=("memory", "staged"), default="memory",
                    help="memory: ShardedIndex.build over the vectors in hand; staged: `amgen index build`'s "
                    "streaming, resumable path in a child process, from the label maps (re-embedded there)")
    ap.add_argument("--part-size", type=int, default=20_000, help="layouts per staged part (--build staged)")
    ap.add_argument("--compare", nargs="*", default=[], metavar="SPEC",
                    help='other index types on the same data, e.g. "IVF2048,SQ8,RFlat|nprobe=16,k_factor=4" '
                    '(see compare_index_types); adds "compare" to the JSON')
    args = ap.parse_args()
    nlist = args.nlist or default_nlist(args.n)
    nprobe = args.nprobe or (12 if nlist <= 1024 else 24)
    index_kwargs = {"nlist": nlist, "nprobe": nprobe}
    if args.codec != "flat":
        index_kwargs.update(codec=args.codec, rerank=args.rerank or DEFAULT_RERANK)
    blas = openblas_info()

    pool_size = min(args.quality_pool, args.n)
    xb, pool, made = cached_layouts(args.n, args.seed, pool_size, args.cache)
    query_labels = synthetic_layouts(args.queries, seed=args.seed * 1000 + 999)
    xq = embed_layouts(query_labels)
    nq = len(xq)
    if not made["cached"]:
        print(f"generated {args.n} layouts in {made['generate_s']:.1f}s, embedded in {made['embed_s']:.1f}s "
              f"({args.n / made['embed_s']:,.0f} layouts/s, dim {EMBED_DIM}); peak RSS {peak_rss_gib():.2f} GiB",
              file=sys.stderr)

    ids = [f"syn-{i:07d}" for i in range(args.n)]
    with tempfile.TemporaryDirectory() as tmp:
        index, built = build_or_load(args, xb, ids, index_kwargs, args.cache or Path(tmp))
        print(f"{'loaded' if built['cached'] else 'built'} {index.kind} index: {args.shards} shards, nlist {index.nlist}, "
              f"nprobe {index.nprobe}, codec {index.codec}; {built}", file=sys.stderr)

        # Both arms on the same queries with the same threads: a warm-up run each (which also pages in a
        # memory-mapped cache), then --repeats timed runs each, alternating. The brute force's hits are the
        # exact top-10.
        faiss.omp_set_num_threads(args.threads)
        arms = timed_interleaved({"bruteforce": lambda: faiss.knn(xq, xb, 10, faiss.METRIC_INNER_PRODUCT),
                                  "index": lambda: index.search(xq, 10)}, args.repeats)
        brute, run = arms["bruteforce"], arms["index"]
        exact = brute["out"][1]
        recall = recall_at(run["out"].rows, exact)
        sweep = {}
        for probe in [] if args.no_sweep else sorted({max(1, nprobe // 2), nprobe, nprobe * 2, nprobe * 4}):
            r = timed(lambda: index.search(xq, 10, nprobe=probe), 1)
            sweep[str(probe)] = {"recall_at_10": round(recall_at(r["out"].rows, exact), 4), **cost_row(r, nq, brute)}
        rerank_sweep = {}
        if index.codec != "flat" and not args.no_sweep:   # candidates re-scored per hit, at the chosen nprobe
            chosen = index.rerank
            for factor in sorted({max(1, chosen // 2), chosen, chosen * 2}):
                index.rerank = factor
                r = timed(lambda: index.search(xq, 10), 1)
                rerank_sweep[str(factor)] = {"recall_at_10": round(recall_at(r["out"].rows, exact), 4),
                                             **cost_row(r, nq, brute)}
            index.rerank = chosen
        del index
    brute_row, index_row = cost_row(brute, nq), cost_row(run, nq, brute)
    print(f"brute force {brute_row['cpu_ms_per_query']:.3f} CPU-ms/query ({brute_row['qps']:,.1f} q/s); index "
          f"{index_row['cpu_ms_per_query']:.4f} CPU-ms/query ({index_row['qps']:,.0f} q/s); recall@10 {recall:.4f}; "
          f"speedup {index_row['speedup']:.1f}x CPU time, {index_row['speedup_wall']:.1f}x wall "
          f"({args.threads} thread(s), {blas.get('faiss_openblas_core')} kernel); sweep {sweep}", file=sys.stderr)
    compared = (compare_index_types(xb, xq, exact, brute, args.compare, args.seed, args.repeats, args.threads,
                                    args.build_threads) if args.compare else None)

    # Embedding choice: does the exact IoU winner reach the rerank? (ours vs histogram only)
    qsub = query_labels[:100]
    ours = candidate_recall(pool, qsub, xb[: len(pool)], xq[:100])
    hist_only = candidate_recall(pool, qsub, histogram_embedding(pool), histogram_embedding(qsub))
    print(f"IoU-best in top-32 candidates: layout embedding {ours[0]:.2f} (IoU ratio {ours[1]:.3f}), "
          f"histogram only {hist_only[0]:.2f} (IoU ratio {hist_only[1]:.3f})", file=sys.stderr)

    # End to end per target: FAISS candidates + exact rerank + diverse top-k (flat index over the pool).
    nr = min(args.retriever_queries, nq)
    with tempfile.TemporaryDirectory() as tmp:
        pool_index = ShardedIndex.build(np.asarray(xb[: len(pool)]), ids[: len(pool)], None, Path(tmp) / "pool", 2,
                                        labels=pool, embedding_version=EMBED_VERSION)
        retriever = Retriever(pool_index, k=4, candidates=32, diversity=0.3)
        retr = timed(lambda: retriever.query_batch(list(query_labels[:nr])), 1, warmup=False)
    print(f"retriever (32 candidates, rerank at 32x64, k=4): {nr / retr['wall_median']:,.0f} targets/s", file=sys.stderr)

    result = {
        "n": args.n, "dim": EMBED_DIM, "shards": args.shards, "kind": "ivf", "nlist": nlist,
        "nprobe": nprobe, "codec": args.codec, "rerank": index_kwargs.get("rerank"), "queries": nq,
        "recall_at_10": round(recall, 4),
        # the headline: ratio of the median CPU time per query, same queries, same threads, same kernel
        "speedup": index_row["speedup"], "speedup_cpu_time": index_row["speedup"],
        "speedup_wall": index_row["speedup_wall"], "speedup_vs_bruteforce": index_row["speedup"],
        "index": index_row, "bruteforce": brute_row,
        "qps_sharded": index_row["qps"], "qps_bruteforce": brute_row["qps"],
        "cpu_s_runs": {"index": [round(c, 4) for c in run["cpu"]], "bruteforce": [round(c, 4) for c in brute["cpu"]]},
        "wall_s_runs": {"index": [round(c, 4) for c in run["wall"]], "bruteforce": [round(c, 4) for c in brute["wall"]]},
        "threads": args.threads, "repeats": args.repeats, "blas": blas, "faiss_version": faiss.__version__,
        "nprobe_sweep": sweep, "rerank_sweep": rerank_sweep, "build": args.build, "index_cached": built["cached"],
        "build_seconds": built["build_seconds"], "build_peak_rss_gib": built["build_peak_rss_gib"],
        "vectors_cached": made["cached"], "embed_layouts_per_s": round(args.n / made["embed_s"], 1),
        "iou_best_in_top32": ours[0], "iou_ratio_top32": round(ours[1], 4),
        "iou_best_in_top32_hist_only": hist_only[0], "iou_ratio_top32_hist_only": round(hist_only[1], 4),
        "retriever_targets_per_s": round(nr / retr["wall_median"], 1),
        "peak_rss_gib": round(peak_rss_gib(), 2), "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if compared:
        result["compare"] = compared
    print(json.dumps(result))


if __name__ == "__main__":
    main()
