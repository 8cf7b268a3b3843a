"""Routing oracle: can better matching beat plain augmented attention with this generation net?

On validation toy-town triples (make_triples(n, seed=2000): not the benchmark's held-out set),
scores sa_aug, am_adapter with the trained matcher, and am_adapter with OracleRouter (the
ground-truth matching cost as a fixed bias: boost matches and/or suppress non-matches, optionally
keeping the exemplar's share of the attention). Then the
same with each target's own ground truth as its exemplar ("self": perfect correspondence).
Prints one JSON object on its last line: {setting: {mode: row}}, plus oracle/sa_aug ratios.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from evaluation.oracle import OracleRouter, routed_by  # noqa: E402
from evaluation.quality import QualitySettings, run_quality  # noqa: E402
from evaluation.runner import DEFAULT_MODEL_DIR, load_pipeline  # noqa: E402
from evaluation.segmenter import DEFAULT_DIR as SEGMENTER_DIR  # noqa: E402
from evaluation.segmenter import Segmenter  # noqa: E402

KEYS = ("miou", "class_de2000", "instance_de2000", "psnr", "controllability")
ORACLES = (OracleRouter(suppress=2.0), OracleRouter(suppress=6.0), OracleRouter(boost=1.0), OracleRouter(boost=3.0),
           OracleRouter(suppress=2.0, keep_mass=True), OracleRouter(suppress=6.0, keep_mass=True))


def self_exemplar(triple):
    """The target's own ground truth as exemplar; each mapped vehicle maps to itself."""
    return dataclasses.replace(triple, exemplar_image=triple.target_image, exemplar_label=triple.target_label,
                               exemplar_instance=triple.target_instance,
                               instance_map={k: k for k in triple.instance_map})


def score(pipe, judge, triples, settings, modes) -> dict:
    rows = run_quality(pipe, judge, triples, dataclasses.replace(settings, modes=modes, vae_ceiling=False)).rows
    return {r["mode"]: {k: r[k] for k in KEYS} for r in rows if r["mode"] in modes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--steps", type=int, default=QualitySettings.num_inference_steps)
    ap.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    from toytown import make_triples

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    judge = Segmenter.from_pretrained(SEGMENTER_DIR)
    settings = QualitySettings(n=args.n, seed=2000, num_inference_steps=args.steps)
    cross = list(make_triples(args.n, seed=2000))
    out: dict = {"n": args.n, "steps": args.steps, "model_hash": pipe.model_hash()}
    t0 = time.perf_counter()
    for setting, triples in (("cross", cross), ("self", [self_exemplar(t) for t in cross])):
        rows = score(pipe, judge, triples, settings, ("sa_aug", "am_adapter"))
        rows["am_adapter (trained matcher)"] = rows.pop("am_adapter")
        for router in ORACLES:
            with routed_by(pipe, router):
                rows[router.name] = score(pipe, judge, triples, settings, ("am_adapter",))["am_adapter"]
        sa = rows["sa_aug"]["class_de2000"]
        for name, row in rows.items():
            row["class_de2000_reduction_vs_sa_aug"] = round(1 - row["class_de2000"] / sa, 4)
            print(f"{setting:5s} {name:32s} " + " ".join(f"{k}={row[k]}" for k in KEYS)
                  + f" reduction={row['class_de2000_reduction_vs_sa_aug']:+.3f}", file=sys.stderr, flush=True)
        out[setting] = rows
    best = max((r["class_de2000_reduction_vs_sa_aug"], name) for name, r in out["cross"].items() if name.startswith("oracle"))
    out["best_oracle_cross"] = {"mode": best[1], "class_de2000_reduction_vs_sa_aug": best[0]}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
