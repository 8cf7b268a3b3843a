"""Autoencoder ceiling: held-out toy-town ground truth through each candidate latent space.

Every image a model makes passes through its autoencoder's decoder, so the ground truth's round
trip bounds what any mode can score. For each candidate this scores the round trip of the
quality benchmark's held-out targets (toytown.make_triples, seed 1000) with the judge segmenter
(mIoU), class colour error (ΔE00) and PSNR, and times encode + decode.

Candidates: ``pixel_unshuffle`` (space-to-depth, the toy preset's latent) and any AutoencoderKL
folder given with ``--vae NAME=DIR`` (e.g. the learned toy VAE of model hash 012020a7).

Last line: one JSON object.
Usage: python bench/autoencoder.py [--n 200] [--vae learned=PATH/vae]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluation.quality import QUALITY_SEED, ModeScores, measure  # noqa: E402
from evaluation.segmenter import DEFAULT_DIR as SEGMENTER_DIR  # noqa: E402
from evaluation.segmenter import Segmenter  # noqa: E402
from toytown import make_triples  # noqa: E402


def _candidates(specs: list[str], images: torch.Tensor) -> dict:
    from diffusers import AutoencoderKL

    from amadapter.pixel_autoencoder import PixelUnshuffleAutoencoder

    found = {"pixel_unshuffle": PixelUnshuffleAutoencoder().fit(images)}
    for spec in specs:
        name, _, path = spec.partition("=")
        if not path or not Path(path).is_dir():
            raise SystemExit(f"--vae {spec!r}: expected NAME=DIR with an AutoencoderKL folder")
        found[name] = AutoencoderKL.from_pretrained(path)
    return found


@torch.no_grad()
def round_trip(ae, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    z = ae.encode(x).latent_dist.mean
    y = ae.decode(z).sample
    return ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--vae", action="append", default=[], help="NAME=DIR of an AutoencoderKL folder")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    triples = list(make_triples(args.n, seed=QUALITY_SEED))
    targets = np.stack([t.target_image for t in triples])
    fit_on = torch.from_numpy(targets).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    candidates = _candidates(args.vae, fit_on)
    judge = Segmenter.from_pretrained(SEGMENTER_DIR)
    rows = []
    for name, ae in {**candidates, "ground_truth": None}.items():
        scores = ModeScores()
        seconds = 0.0
        exact = True
        for k in range(0, len(triples), 16):
            chunk = triples[k:k + 16]
            imgs = targets[k:k + 16]
            if ae is not None:
                t0 = time.process_time()
                decoded = round_trip(ae, imgs)
                seconds += time.process_time() - t0
                exact = exact and np.array_equal(decoded, imgs)
                imgs = decoded
            for triple, img, seg in zip(chunk, imgs, judge.predict(imgs)):
                scores.add(measure(img, seg, triple), triple.domain)
        row = scores.row(name)
        params = 0 if ae is None else sum(p.numel() for p in ae.parameters())
        rows.append({"candidate": name, "miou": row["miou"], "class_de2000": row["class_de2000"],
                     "psnr_db": row["psnr"], "lossless": bool(exact) if ae is not None else None, "params": params,
                     "cpu_ms_per_image": round(1000 * seconds / len(triples), 3)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"bench": "autoencoder", "n": args.n, "seed": QUALITY_SEED, "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
