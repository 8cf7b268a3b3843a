"""Domain adaptation benchmark (issue 11): toy-town day -> night, as ``amgen eval adapt`` runs it.

Makes the toy-town sets (seeds in ``evaluation.adaptation.ADAPT_TREE_SEEDS``), runs amgen for
real (day tree as targets, the night bank as the exemplar index, filtered to night), trains the
judge-architecture segmenters of arms (a)-(e) with every seed and scores them on held-out night
and day scenes. Progress goes to stderr; the table and the figures to stdout; the last stdout
line is one JSON object: per-arm mean night/day mIoU, ``gain_vs_b`` ((c) - (b), night),
``gain_vs_best_baseline`` ((c) - best (d), night), ``day_drop`` ((a) - (c), day), and the rest.

Usage: python bench/domain_adaptation.py [--work-dir runs/adapt] [--day-n 500] [--bank-n 10]
       [--test-n 300] [--night-real-n 500] [--steps S | --max-steps 3000 --plateau-window 100]
       [--seeds 3] [--workers 2] [--arms b_day_bank,c_amgen,...] [--gate 0.35 [--label-trusted] [--judge DIR]]
       [--per-layout 5] [--mix uniform|balanced] [--model toy] [--guidance 1.0] [--tiny]
       [--json rows.json] [--result result.json] [--picture docs/adaptation.png]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from evaluation.adaptation import figure_lines, table  # noqa: E402
from evaluation.quality import QualitySettings  # noqa: E402
from pipeline.cli_eval import AdaptSizes, downstream_train_config, run_adapt, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = AdaptSizes()
    ap.add_argument("--work-dir", type=Path, default=Path("runs/adapt"))
    ap.add_argument("--day-n", type=int, default=d.day_n)
    ap.add_argument("--bank-n", type=int, default=d.bank_n)
    ap.add_argument("--test-n", type=int, default=d.test_n)
    ap.add_argument("--night-real-n", type=int, default=d.night_real_n)
    ap.add_argument("--steps", type=int, default=None, help="fixed segmenter steps; default: until the loss plateaus")
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--plateau-window", type=int, default=100)
    ap.add_argument("--plateau-min-improvement", type=float, default=0.02)
    ap.add_argument("--arms", default=None, help="comma-separated arms (default: all)")
    ap.add_argument("--gate", type=float, action="append", default=[], help="arm (c) gated at this judge mIoU")
    ap.add_argument("--gate-metric", default="judge_miou", help="the gate's score (gate.metric)")
    ap.add_argument("--label-trusted", action="store_true",
                    help="also a gated arm trained on label_trusted (pixels the judge disagrees with set to unlabeled)")
    ap.add_argument("--judge", type=Path, default=None, help="the gate's judge: a segmenter folder (default: the bundled)")
    ap.add_argument("--per-layout", type=int, default=1, help="renderings per day layout, each with its own exemplar")
    ap.add_argument("--mix", default="uniform", help="uniform, or balanced: the day scenes weigh as much as an "
                    "arm's other parts together, as in (b)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model-steps", type=int, default=QualitySettings.num_inference_steps, help="the demo's")
    ap.add_argument("--guidance", type=float, default=QualitySettings.guidance_scale,
                    help="classifier-free guidance of the amgen run (the demo's)")
    ap.add_argument("--model", default="toy", help="the amgen model: toy (the bundled one) or a model folder")
    ap.add_argument("--tiny", action="store_true",
                    help="the smallest run that exercises every arm (a few scenes, 2 training steps, one seed, a tiny "
                    "random model): checks that the bench runs, measures nothing")
    ap.add_argument("--json", type=Path, default=None, help="rows [{arm, seed, night_miou, day_miou}]")
    ap.add_argument("--result", type=Path, default=None, help="the whole result")
    ap.add_argument("--picture", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.tiny:
        from amadapter.testing import tiny_pipeline

        a.day_n, a.bank_n, a.test_n, a.night_real_n = 9, 3, 4, 6
        a.steps, a.batch_size, a.seeds, a.model_steps = 2, 4, 1, 1
        tiny = a.work_dir / "tiny-model"
        if not (tiny / "model_index.json").is_file():
            tiny_pipeline(seed=0).save_pretrained(tiny)
        a.model = str(tiny)
    sizes = AdaptSizes(a.day_n, a.bank_n, a.test_n, a.night_real_n)
    train = downstream_train_config(a.steps, a.max_steps, a.plateau_window, a.plateau_min_improvement, a.batch_size)
    result = run_adapt(a.work_dir, sizes, train=train, seeds=a.seeds, workers=a.workers, model=a.model,
                       model_steps=a.model_steps, guidance=a.guidance,
                       picture=a.picture, log=lambda m: print(m, file=sys.stderr, flush=True),
                       arms=a.arms.split(",") if a.arms else None, gate_thresholds=a.gate, gate_metric=a.gate_metric,
                       label_trusted=a.label_trusted, judge=a.judge, per_layout=a.per_layout, mix=a.mix)
    if a.json is not None:
        write_json(a.json, [{k: r[k] for k in ("arm", "seed", "night_miou", "day_miou")} for r in result["rows"]])
    if a.result is not None:
        write_json(a.result, result)
    s = result["summary"]
    print(table(s))
    for figures in figure_lines(s):
        print(figures)
    line = {"arms": {arm: {"night_miou": v["night"]["mean"], "night_std": v["night"]["std"], "day_miou": v["day"]["mean"],
                           "day_std": v["day"]["std"]} for arm, v in s["arms"].items()},
            **{k: s[k] for k in ("gain_vs_b", "gain_vs_best_baseline", "best_baseline", "day_drop", "day_drop_vs_b",
                                 "gap_to_e", "verdicts", "paired", "gated") if k in s},
            "arm_steps": {arm: v["steps"] for arm, v in s["arms"].items()}, "gate": result.get("gate"),
            "sizes": result["sizes"], "mix": a.mix, "steps": a.steps or f"until plateau, at most {a.max_steps}", "seeds": a.seeds,
            "amgen_run_s": result["amgen_run"]["run_seconds"], "wall_s": result["wall_seconds"]}
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    main()
