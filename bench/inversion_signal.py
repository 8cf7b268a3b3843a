"""How much of the exemplar does DDIM inversion keep, against random noise at the same t?

For held-out toy-town exemplars, inverts the VAE latent with the bundled model (the sampler's own
inversion) and, at each timestep t, measures the correlation of the inverted latent with the clean
latent. Random noising at t keeps sqrt(alpha_bar_t) of it. The gap is why training noises the
exemplar less than the target (`exemplar_t_fraction`, docs/architecture.md).
Prints one JSON object on its last line: {t: {inverted, random}}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from evaluation.runner import DEFAULT_MODEL_DIR, load_pipeline  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    args = ap.parse_args()
    from toytown import make_triples

    torch.set_num_threads(1)
    pipe = load_pipeline(args.model)
    sched = pipe._scheduler(args.steps)
    trajectory: dict[int, list[float]] = {}

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    with torch.no_grad():
        for triple in make_triples(args.n, seed=2000):
            z0 = pipe.encode_images(triple.exemplar_image[None])
            guidance_at = pipe.guidance_memo(pipe.prepare_condition(triple.exemplar_label))
            # the sampler's own inversion, read after each step
            pipe._invert(z0, guidance_at, sched,
                         on_step=lambda t, z, z0=z0: trajectory.setdefault(t, []).append(corr(z, z0)))
    alphas = sched.alphas_cumprod
    out = {"n": args.n, "steps": args.steps, "model_hash": pipe.model_hash()[:16],
           "correlation_with_clean_latent": {
               str(t): {"inverted": round(float(np.mean(v)), 3), "random_noise": round(float(alphas[t].sqrt()), 3)}
               for t, v in sorted(trajectory.items())}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
