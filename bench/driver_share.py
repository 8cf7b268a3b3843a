"""The driver's share of a run: CPU seconds of the driver process per 100 samples.

    python -m bench.driver_share --n 64 [--json out.json]

Runs the toy demo config (bundled toy model, CPU) on ``n`` fresh toy-town scenes in a temporary
folder and reads ``resource.getrusage(RUSAGE_SELF)`` of this process (the driver) around
``run_pipeline``. Ray's own processes (raylet, GCS, workers) are other processes and do not count:
what is left is what the driver itself does per sample (collecting rows, encoding, hashing,
writing).
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="toy-town scenes (= samples with k=1)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="amgen-driver-share-") as tmp:
        res = measure(args.n, Path(tmp))
    print(json.dumps(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
