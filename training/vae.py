"""Stage 0 (toy preset only): train the AutoencoderKL on the frames of the data it is given
(toy-town images for the bundled model).

Loss: L1 + L2 reconstruction + a tiny KL weight (1e-6), so the latent stays close to a
deterministic code, as SD's VAE does. After training the latent scale is measured on held-out
images (1 / std of the latents) and written into the VAE config (``scaling_factor``), so the
diffusion stages see unit-variance latents. SD1.5 users keep SD's VAE and skip this stage.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from amadapter.presets import TOY_LEARNED_VAE
from training.data import PairData, image_batch, rng_for, to_unit_range
from training.loop import TrainConfig


class VaeConfig(TrainConfig):
    stage: Literal["vae"] = "vae"
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    kl_weight: float = 1e-6
    scale_images: int = Field(256, ge=8)   # held-out images that fix the latent scaling factor
    # "decoder": fine-tune only the decoder of ``init_from`` (encoder, latent space and scaling
    # factor stay bit-identical), so a sharper decoder can replace the one the diffusion stages
    # were trained with, without retraining them.
    train: Literal["all", "decoder"] = "all"
    init_from: str | None = None           # a VAE folder (runs/toy_vae/vae)

    @model_validator(mode="after")
    def _toy_only(self) -> "VaeConfig":
        if self.preset != "toy":
            raise ValueError(f"the VAE stage trains the toy-sized learned VAE only; preset {self.preset!r} keeps its "
                             "own VAE (SD1.5: use the VAE of your local SD1.5 folder)")
        if self.train == "decoder" and not self.init_from:
            raise ValueError("train: decoder fine-tunes an existing VAE: set init_from to its folder")
        return self


class VaeStep(torch.nn.Module):
    def __init__(self, vae, config: VaeConfig):
        super().__init__()
        self.vae = vae
        self.config = config

    def forward(self, batch, generator: torch.Generator):
        x = batch["image"]
        with torch.set_grad_enabled(self.config.train == "all"):
            posterior = self.vae.encode(x).latent_dist
        z = posterior.sample(generator=generator)
        rec = self.vae.decode(z).sample.float()
        l1 = (rec - x).abs().mean()
        l2 = (rec - x).pow(2).mean()
        kl = posterior.kl().mean()
        c = self.config
        loss = c.l1_weight * l1 + c.l2_weight * l2 + c.kl_weight * kl
        return {"loss": loss, "l1": l1.detach(), "l2": l2.detach(), "kl": kl.detach()}


class VaeTask:
    """Trains on ``data.image(rng)`` frames; ``data`` is built by the caller (training/sources.py)."""

    def __init__(self, config: VaeConfig, data: PairData):
        self.config = config
        self.data = data

    def build(self, device: torch.device) -> torch.nn.Module:
        from diffusers import AutoencoderKL

        if self.config.init_from:
            if not Path(self.config.init_from, "config.json").is_file():
                raise FileNotFoundError(f"{self.config.init_from}: not a VAE folder (config.json missing)")
            vae = AutoencoderKL.from_pretrained(self.config.init_from)
        else:
            vae = AutoencoderKL(**TOY_LEARNED_VAE)
        if self.config.train == "decoder":
            vae.encoder.requires_grad_(False)
            vae.quant_conv.requires_grad_(False)
        return VaeStep(vae, self.config).to(device)

    def trainable_prefixes(self) -> tuple[str, ...]:
        return ("vae.",)

    def batch(self, step: int, rank: int, world_size: int):
        return image_batch(self.data, self.config.seed, step, rank, self.config.batch_size)

    def held_out_images(self, n: int) -> torch.Tensor:
        # salt 7: a stream the training batches never draw from
        imgs = [self.data.image(rng_for(self.config.seed, 0, 0, i, salt=7))[0] for i in range(n)]
        return to_unit_range(np.stack(imgs))

    def export(self, module: VaeStep, out_dir: Path) -> Path:
        vae = module.vae
        scale, psnr = measure_vae(vae, self.held_out_images(self.config.scale_images))
        if self.config.train == "decoder":
            scale = vae.config.scaling_factor  # the latent space is the one the UNet was trained on
        vae.register_to_config(scaling_factor=scale)
        path = out_dir / "vae"
        vae.save_pretrained(path, safe_serialization=True)
        (out_dir / "vae_metrics.json").write_text(
            f'{{"scaling_factor": {scale:.6f}, "heldout_psnr_db": {psnr:.3f}, "heldout_images": {self.config.scale_images}}}\n')
        save_reconstruction_grid(vae, self.held_out_images(8), out_dir / "vae_reconstructions.png")
        return path


@torch.no_grad()
def measure_vae(vae, images: torch.Tensor, batch: int = 32) -> tuple[float, float]:
    """(1 / std of latent means, reconstruction PSNR in dB) over ``images`` in [-1, 1]."""
    latents, sq_err = [], []
    device = next(vae.parameters()).device
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(device)
        z = vae.encode(x).latent_dist.mode()
        latents.append(z.float().cpu())
        rec = vae.decode(z).sample.float().clamp(-1, 1).cpu()
        sq_err.append(((rec - x.cpu()) / 2).pow(2).flatten(1).mean(1))  # on the [0, 1] scale
    std = torch.cat(latents).std().item()
    mse = torch.cat(sq_err)
    psnr = float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())
    return 1.0 / std, psnr


@torch.no_grad()
def save_reconstruction_grid(vae, images: torch.Tensor, path: Path) -> None:
    """Top row: inputs; bottom row: reconstructions."""
    from PIL import Image

    device = next(vae.parameters()).device
    rec = vae.decode(vae.encode(images.to(device)).latent_dist.mode()).sample.float().clamp(-1, 1).cpu()
    to_u8 = lambda t: ((t.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)  # noqa: E731
    rows = [np.concatenate(list(to_u8(t)), axis=1) for t in (images, rec)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
