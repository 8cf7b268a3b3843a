"""DDIM steps and exemplar_guidance_end against layout fidelity and colour: the quality benchmark
on one model and one set of triples, over a grid of sampling schedules.

The toy models predict x0 and were trained with the noisy steps oversampled, so fewer steps can
draw the layout better; the exemplar's colour is settled at the noisy steps, so handing the last
ones to plain self-attention (exemplar_guidance_end < 1) may keep colour and sharpen the layout.
This says what each costs in judge mIoU and class colour error (ΔE00), and the seconds per
triple. At each step count, all three modes run at end 1 and am_adapter at every other end that
leaves the exemplar at least one step.
Last line: one JSON object.

    python bench/sampling_schedule.py [--n 200] [--steps 1,2,4] [--ends 1,0.5] [--model DIR]
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
KEEP = ("miou", "class_de2000", "controllability")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", default="1,2,4", help="comma-separated DDIM step counts")
    ap.add_argument("--ends", default="1,0.5", help="comma-separated exemplar_guidance_end values")
    ap.add_argument("--guidance", type=float, default=QualitySettings.guidance_scale)
    ap.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    step_counts = [int(s) for s in args.steps.split(",")]
    ends = sorted({float(e) for e in args.ends.split(",")} | {1.0}, reverse=True)
    pipe, judge = load_pipeline(args.model), Segmenter.from_pretrained(SEGMENTER_DIR)
    from toytown import make_triples

    triples = list(make_triples(args.n, seed=QUALITY_SEED))
    rows: dict[str, dict] = {}
    for steps in step_counts:
        for end in ends:
            if end < 1.0 and end * steps < 1:  # no step reads the exemplar: that is structure_only's row
                continue
            modes = MODES if end == 1.0 else ("am_adapter",)
            settings = QualitySettings(n=args.n, seed=QUALITY_SEED, num_inference_steps=steps,
                                       guidance_scale=args.guidance, exemplar_guidance_end=end,
                                       modes=modes, vae_ceiling=False)
            t0 = time.perf_counter()
            report = run_quality(pipe, judge, triples, settings)
            elapsed = time.perf_counter() - t0
            by_mode = {r["mode"]: r for r in report.json_rows()}
            row = {m: {k: by_mode[m][k] for k in KEEP} for m in modes}
            row.update(steps=steps, exemplar_guidance_end=end, s_per_triple=round(elapsed / args.n, 4))
            rows[f"s{steps}_e{end:g}"] = row
            am = by_mode["am_adapter"]
            print(f"steps {steps}, end {end:g}: am_adapter mIoU {am['miou']:.2f}, class dE00 "
                  f"{am['class_de2000']:.2f}; {elapsed:.1f} s", file=sys.stderr)
    best = max(rows, key=lambda k: rows[k]["am_adapter"]["miou"])
    print(json.dumps({"model_hash": pipe.model_hash()[:8], "n": args.n, "guidance": args.guidance,
                      "threads": args.threads, "rows": rows, "best_miou": best}))


if __name__ == "__main__":
    main()
