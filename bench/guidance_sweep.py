"""Classifier-free guidance against layout fidelity and colour: the quality benchmark at several
guidance scales, one model and one set of triples.

Guidance here pushes the exemplar-guided prediction away from the unconditional one, which is
plain self-attention (structure only), so a high scale amplifies whatever the exemplar brings,
its textures and shapes included. This sweep says what each scale costs in judge mIoU and gains
in class colour error (ΔE00), and the seconds per triple (scale 1 skips the unconditional rows).
Last line: one JSON object.

    python bench/guidance_sweep.py [--n 200] [--steps 4] [--guidance 1,1.5,2,3] [--model DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from evaluation.quality import QUALITY_SEED, QualitySettings, run_quality  # noqa: E402
from evaluation.runner import DEFAULT_MODEL_DIR, load_pipeline  # noqa: E402
from evaluation.segmenter import DEFAULT_DIR as SEGMENTER_DIR  # noqa: E402
from evaluation.segmenter import Segmenter  # noqa: E402

MODES = ("structure_only", "sa_aug", "am_adapter")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=QualitySettings.num_inference_steps)
    ap.add_argument("--guidance", default="1,1.5,2,3", help="comma-separated scales")
    ap.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scales = [float(g) for g in args.guidance.split(",")]
    pipe, judge = load_pipeline(args.model), Segmenter.from_pretrained(SEGMENTER_DIR)
    from toytown import make_triples

    triples = list(make_triples(args.n, seed=QUALITY_SEED))
    rows: dict[str, dict] = {}
    for g in scales:
        settings = QualitySettings(n=args.n, seed=QUALITY_SEED, num_inference_steps=args.steps, guidance_scale=g,
                                   modes=MODES, vae_ceiling=False)
        t0 = time.perf_counter()
        report = run_quality(pipe, judge, triples, settings)
        elapsed = time.perf_counter() - t0
        by_mode = {r["mode"]: r for r in report.json_rows()}
        rows[f"{g:g}"] = {m: {k: by_mode[m][k] for k in ("miou", "class_de2000", "controllability")} for m in MODES}
        rows[f"{g:g}"]["s_per_triple_all_modes"] = round(elapsed / args.n, 4)
        am = by_mode["am_adapter"]
        print(f"guidance {g:g}: am_adapter mIoU {am['miou']:.2f}, class dE00 {am['class_de2000']:.2f}; "
              f"structure_only mIoU {by_mode['structure_only']['miou']:.2f}; {elapsed:.1f} s", file=sys.stderr)
    best = max(rows, key=lambda g: rows[g]["am_adapter"]["miou"])
    print(json.dumps({"model_hash": pipe.model_hash()[:8], "n": args.n, "steps": args.steps, "threads": args.threads,
                      "rows": rows, "best_miou_guidance": float(best)}))


if __name__ == "__main__":
    main()
