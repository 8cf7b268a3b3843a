"""Sampling noise: how much speckle a model leaves in its samples, and where it comes from.

Toy-town's real images carry monochrome grain and almost no fine colour detail. This measures:

1. ``basis`` (no model): the span of a cell's variances (largest / smallest principal axis), and
   the pixel speckle that a small latent error (i.i.d., std 0.1) decodes to under the two scalings of the pixel-unshuffle latent, per-colour standardisation (the
   preset's first) and PCA whitening (its current one), both fitted on the same images.
2. ``samples`` (per pipeline folder): the high-frequency energy of samples at the demo's settings,
   chroma and luma apart, as a ratio to the ground truth's. 1.0 is the data's own texture.
3. ``denoising`` (per pixel-latent pipeline folder): PSNR of the model's one-step clean-image
   estimate at t = 50, 250, 500, against a linear denoiser over 3x3 latent cells fitted by least
   squares on other images, the floor any trained net should clear.

High-frequency energy: mean absolute difference of horizontally and vertically adjacent pixels,
of chroma (each pixel minus its RGB mean) and of luma (the RGB mean), in grey levels.

Last line: one JSON object.
Usage: python bench/sampling_noise.py --model NAME=DIR [--model ...] [--n 8] [--steps 4] [--guidance 3.0]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluation.metrics import psnr  # noqa: E402
from evaluation.quality import QUALITY_SEED  # noqa: E402
from toytown import make_triples  # noqa: E402

FIT_SEED = 7            # images the latents and the linear denoiser are fitted on, apart from QUALITY_SEED
TIMESTEPS = (50, 250, 500)


def high_frequency(images: np.ndarray) -> dict:
    x = images.astype(np.float64)
    luma = x.mean(-1, keepdims=True)
    out = {}
    for name, part in (("chroma", x - luma), ("luma", luma)):
        dx = np.abs(np.diff(part, axis=2)).mean()
        dy = np.abs(np.diff(part, axis=1)).mean()
        out[name] = float((dx + dy) / 2)
    return out


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def basis_speckle(fit_images: np.ndarray, test_images: np.ndarray, gt_hf: dict) -> list[dict]:
    from amadapter.pixel_autoencoder import PixelUnshuffleAutoencoder

    x = _to_tensor(fit_images)
    whitened = PixelUnshuffleAutoencoder().fit(x)
    per_colour = PixelUnshuffleAutoencoder()
    with torch.no_grad():   # the preset's former scaling, written as the same linear map
        colour_of = torch.arange(48) // 16
        mean, std = x.mean((0, 2, 3)), x.std((0, 2, 3))
        per_colour.cell_mean.copy_(mean[colour_of])
        per_colour.to_latent.copy_(torch.diag(1 / std[colour_of]))
        per_colour.from_latent.copy_(torch.diag(std[colour_of]))
    t = _to_tensor(test_images)
    cells = F.pixel_unshuffle(x.double(), 4).permute(0, 2, 3, 1).reshape(-1, 48)
    variances = torch.linalg.eigvalsh(torch.cov(cells.T))
    rows = [{"cell_variance_span": round(float(variances.max() / variances.min()))}]
    for name, ae in (("per_colour", per_colour), ("whitened", whitened)):
        with torch.no_grad():
            z = ae.encode(t).latent_dist.mean
            error = 0.1 * torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
            decoded = _to_uint8(ae.decode(z + error).sample)
        hf = high_frequency(decoded)
        rows.append({"basis": name, "chroma_hf_ratio": round(hf["chroma"] / gt_hf["chroma"], 3),
                     "luma_hf_ratio": round(hf["luma"] / gt_hf["luma"], 3)})
    return rows


def sample_speckle(pipe, triples, steps: int, guidance: float, gt_hf: dict) -> list[dict]:
    rows = []
    for mode in ("structure_only", "am_adapter"):
        images = []
        for i, tr in enumerate(triples):
            kwargs = {} if mode == "structure_only" else {
                "exemplar_image": tr.exemplar_image, "exemplar_label": tr.exemplar_label}
            out = pipe(tr.target_label[None], seeds=[i], num_inference_steps=steps,
                       guidance_scale=guidance, mode=mode, **kwargs)
            images.append(out.images[0])
        hf = high_frequency(np.stack(images))
        rows.append({"mode": mode, "chroma_hf_ratio": round(hf["chroma"] / gt_hf["chroma"], 3),
                     "luma_hf_ratio": round(hf["luma"] / gt_hf["luma"], 3)})
    return rows


def _cells(z: torch.Tensor) -> torch.Tensor:
    u = F.unfold(z.double(), 3, padding=1)           # (N, C*9, L)
    u = u.transpose(1, 2).reshape(-1, u.shape[1])
    return torch.cat([u, torch.ones(len(u), 1, dtype=u.dtype)], 1)


@torch.no_grad()
def denoising(pipe, fit_images: np.ndarray, triples) -> list[dict]:
    sched = pipe.scheduler
    targets = np.stack([t.target_image for t in triples])
    z_fit, z = pipe.encode_images(fit_images), pipe.encode_images(targets)
    cond = pipe.prepare_condition(np.stack([t.target_label for t in triples]))
    g = torch.Generator().manual_seed(0)
    rows = []
    for t in TIMESTEPS:
        a, s = sched.alphas_cumprod[t].sqrt(), (1 - sched.alphas_cumprod[t]).sqrt()
        noisy_fit = a * z_fit + s * torch.randn(z_fit.shape, generator=g)
        noisy = a * z + s * torch.randn(z.shape, generator=g)
        x = _cells(noisy_fit)
        y = z_fit.double().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        w = torch.linalg.solve(x.T @ x + 1e-3 * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)
        linear = (_cells(noisy) @ w).reshape(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
        out = pipe.generation_eps(noisy, torch.full((len(triples),), t), cond, mode="structure_only")
        x0 = (noisy - s * pipe._epsilon_at(out, t, noisy)) / a   # whatever the model predicts
        rows.append({"t": t, "model_psnr_db": round(psnr(pipe.decode_latents(x0), targets), 2),
                     "linear_psnr_db": round(psnr(pipe.decode_latents(linear.float()), targets), 2),
                     "noisy_psnr_db": round(psnr(pipe.decode_latents(noisy / a), targets), 2)})
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[], help="NAME=DIR of a pipeline folder")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--fit", type=int, default=64, help="images the latents and linear denoiser are fitted on")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from amadapter.pipeline import AMAdapterPipeline
    from amadapter.pixel_autoencoder import PixelUnshuffleAutoencoder

    triples = list(make_triples(args.n, seed=QUALITY_SEED))
    fit_images = np.stack([t.target_image for t in make_triples(args.fit, seed=FIT_SEED)])
    gt = np.stack([t.target_image for t in triples])
    gt_hf = high_frequency(gt)
    result = {"bench": "sampling_noise", "n": args.n, "steps": args.steps, "guidance": args.guidance,
              "ground_truth_hf": {k: round(v, 3) for k, v in gt_hf.items()},
              "basis": basis_speckle(fit_images, gt, gt_hf), "models": {}}
    print(json.dumps({"basis": result["basis"]}), flush=True)
    for spec in args.model:
        name, _, path = spec.partition("=")
        if not path or not Path(path).is_dir():
            raise SystemExit(f"--model {spec!r}: expected NAME=DIR with a pipeline folder")
        pipe = AMAdapterPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        entry = {"model_hash": pipe.model_hash()[:8], "samples": sample_speckle(pipe, triples, args.steps, args.guidance, gt_hf)}
        if isinstance(pipe.vae, PixelUnshuffleAutoencoder):
            entry["denoising"] = denoising(pipe, fit_images, triples)
        result["models"][name] = entry
        print(json.dumps({name: entry}), flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
