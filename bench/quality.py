"""Quality benchmark (issue 3): AM-Adapter modes against toy-town ground truth.

Runs the bundled toy model on held-out toy-town triples, writes docs/quality.{md,png,json}
and prints the rows as JSON on its last line. Options: --n, --steps, --guidance, --model, --threads.
Defaults are the demo's sampling (2 DDIM steps, guidance 1.0).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evaluation.quality import QUALITY_SEED, QualitySettings  # noqa: E402
from evaluation.report import acceptance_section, table  # noqa: E402
from evaluation.runner import DEFAULT_MODEL_DIR, json_line, run_benchmark  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=QualitySettings.num_inference_steps)
    ap.add_argument("--guidance", type=float, default=QualitySettings.guidance_scale)
    ap.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--docs", default=str(ROOT / "docs"), help="where quality.md/.png/.json go ('' = nowhere)")
    args = ap.parse_args()
    settings = QualitySettings(n=args.n, seed=QUALITY_SEED, num_inference_steps=args.steps,
                               guidance_scale=args.guidance)

    def progress(done: int, total: int) -> None:
        if done % 10 == 0 or done == total:
            print(f"  {done}/{total} triples", file=sys.stderr, flush=True)

    report = run_benchmark(settings, args.model, docs_dir=args.docs or None, threads=args.threads,
                           command=f"python bench/quality.py --n {args.n} --steps {args.steps} --guidance {args.guidance}", progress=progress)
    print(table(report.rows))
    print(acceptance_section(report.rows, report.comparisons))
    print(f"timings: {report.timings}")
    print(json_line(report))


if __name__ == "__main__":
    main()
