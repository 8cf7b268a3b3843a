"""The driver's share of a run: CPU seconds of the driver process per 100 samples.

    python -m bench.driver_share --n 64 [--json out.json]
    python -m bench.driver_share --writer-only --size 512 1024 --n 100

Runs the toy demo config (bundled toy model, CPU) on ``n`` fresh toy-town scenes in a temporary
folder and reads ``resource.getrusage(RUSAGE_SELF)`` of this process (the driver) around
``run_pipeline``. Ray's own processes (raylet, GCS, workers) are other processes and do not count:
what is left is what the driver itself does per sample (collecting rows, encoding, hashing,
writing) plus the Ray Data executor's own loop, which runs in the driver and grows with wall time.

``--writer-only`` measures the part a driver-side writer paid per sample (what pass 2 moved onto
the workers): CPU seconds of ``stages.write.ShardWriter`` taking ``n`` synthesized rows of the
given size (PNG image and label, decoded again for the label statistics, Parquet, sha256).
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(n: int, work: Path) -> dict:
    import ray

    from pipeline.config import load_config
    from pipeline.presets import resolve_config
    from pipeline.run import run_pipeline
    from toytown import make_tree

    tree = work / "toy"
    make_tree(tree, n, seed=0, split="train", height=64, width=128)
    cfg = load_config(resolve_config("toytown_demo"), overrides=[f"source.root={tree}", f"output.dir={work / 'out'}"])
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        c0, t0 = cpu_seconds(), time.perf_counter()
        summary = run_pipeline(cfg)
        c1, t1 = cpu_seconds(), time.perf_counter()
    finally:
        ray.shutdown()
    return {"samples": summary.written, "driver_cpu_s": round(c1 - c0, 3), "wall_s": round(t1 - t0, 3),
            "driver_cpu_s_per_100": round(100 * (c1 - c0) / max(1, summary.written), 3)}


def writer_cost(n: int, size: tuple[int, int], work: Path) -> dict:
    """CPU seconds a single writer spends on ``n`` sample rows of ``size`` (what the old driver did)."""
    import numpy as np

    from amgen_core.image_io import encode_png
    from stages.write import ShardWriter

    rng = np.random.default_rng(0)
    h, w = size
    # Regions with grain (PNG sizes near those of photographs) and blocky labels.
    base = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    image = np.kron(base, np.ones((16, 16, 1), np.uint8))[:h, :w].astype(np.int16)
    image = np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
    label = np.kron(rng.integers(0, 34, (h // 32 + 1, w // 32 + 1), dtype=np.uint8), np.ones((32, 32), np.uint8))[:h, :w]
    img_png, lab_png = encode_png(image), encode_png(label)
    rows = [{"sample_id": f"s{i:06d}", "shard": 0, "target_id": f"t{i}", "exemplar_id": "e", "image": img_png,
             "label": lab_png, "instance": b"", "seed": i, "augment": "{}", "model": "m@1", "error": "",
             "bank_new": False, "seconds": 0.0} for i in range(n)]
    writer = ShardWriter(work / "out", {0: [r["sample_id"] for r in rows]}, 1, "c" * 64)
    c0 = cpu_seconds()
    for r in rows:
        writer.add(r)
    c1 = cpu_seconds()
    return {"samples": n, "size": [h, w], "png_bytes_per_sample": len(img_png) + len(lab_png),
            "writer_cpu_s": round(c1 - c0, 3), "writer_cpu_s_per_100": round(100 * (c1 - c0) / n, 3)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="toy-town scenes (= samples with k=1)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--writer-only", action="store_true", help="only the per-sample cost of a single writer")
    ap.add_argument("--size", type=int, nargs=2, default=(64, 128), metavar=("H", "W"), help="--writer-only sample size")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="amgen-driver-share-") as tmp:
        res = writer_cost(args.n, tuple(args.size), Path(tmp)) if args.writer_only else measure(args.n, Path(tmp))
    print(json.dumps(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
