"""A lossless latent: space-to-depth (pixel unshuffle) behind AutoencoderKL's interface.

The toy preset's learned AutoencoderKL capped every sample far below real toy-town images
(ground truth through it: 20.7 dB, 28.7 judge mIoU). Folding each ``factor x factor`` pixel
patch into channels keeps the UNet's latent grid (1/4 of the image per side) and loses nothing,
at no training cost. ``encode``/``decode`` return diffusers' output types, so the pipeline and
training read ``encode(x).latent_dist.mean`` and ``decode(z).sample`` from either autoencoder.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_utils import ModelMixin


class PixelUnshuffleAutoencoder(ModelMixin, ConfigMixin):
    """(N, C, H, W) in [-1, 1] <-> (N, C * factor**2, H / factor, W / factor), exactly.

    Each colour channel is standardised first with ``channel_mean``/``channel_std`` (weights of
    the model, measured from data by :meth:`fit`), so the UNet sees zero-mean, unit-variance
    latents; ``scaling_factor`` and ``shift_factor`` stay at diffusers' identity (1, 0)."""

    @register_to_config
    def __init__(self, in_channels: int = 3, factor: int = 4, scaling_factor: float = 1.0, sample_size=None):
        super().__init__()
        self.register_buffer("channel_mean", torch.zeros(in_channels))
        self.register_buffer("channel_std", torch.ones(in_channels))

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> "PixelUnshuffleAutoencoder":
        """Set the per-colour statistics from images (N, C, H, W) in [-1, 1]."""
        self._check(images, self.config.in_channels, "fit")
        x = images.to(self.channel_mean.device, torch.float64)
        self.channel_mean.copy_(x.mean(dim=(0, 2, 3)))
        self.channel_std.copy_(x.std(dim=(0, 2, 3)).clamp_min(1e-3))
        return self

    def _stats(self, x: torch.Tensor):
        shape = (1, -1, 1, 1)
        return self.channel_mean.to(x.dtype).view(shape), self.channel_std.to(x.dtype).view(shape)

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels * self.config.factor ** 2

    def _check(self, x: torch.Tensor, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{type(self).__name__}.{what}: expected (N, {channels}, H, W), got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        self._check(x, self.config.in_channels, "encode")
        f = self.config.factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"{type(self).__name__}.encode: size {x.shape[-2]}x{x.shape[-1]} is not a multiple of {f}")
        mean, std = self._stats(x)
        z = F.pixel_unshuffle((x - mean) / std, f)
        # A zero-variance posterior: mean, mode and sample are all z.
        dist = DiagonalGaussianDistribution(torch.cat([z, torch.zeros_like(z)], dim=1), deterministic=True)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        self._check(z, self.latent_channels, "decode")
        mean, std = self._stats(z)
        x = F.pixel_shuffle(z, self.config.factor) * std + mean
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, x: torch.Tensor, return_dict: bool = True):
        return self.decode(self.encode(x).latent_dist.mean, return_dict=return_dict)
