"""Carry a trained UNet over to a new basis of the same latent space, instead of retraining it.

When an autoencoder's latent changes only by an invertible linear map (``z_old = A @ z_new`` per
cell, e.g. refitting PixelUnshuffleAutoencoder's whitening), a UNet trained on ``z_old`` becomes
one for ``z_new`` by folding ``A`` into its first convolution and ``A^-1`` into its last:
``unet_new(z) = A^-1 unet_old(A z)``. The prediction (epsilon, v or x0) is linear in the latent,
so it maps the same way. The noise the new UNet sees is white in the new basis, not the old, so
this is a starting point for training, not a finished model.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def rebase_unet(unet, old_from_new: torch.Tensor) -> None:
    """In place: ``unet``'s conv_in reads new-basis latents and conv_out writes them."""
    a = old_from_new.to(torch.float64)
    c = unet.config.in_channels
    if a.shape != (c, c) or unet.config.out_channels != c:
        raise ValueError(f"rebase_unet: need a ({c}, {c}) matrix for a UNet with {c} in and out channels, "
                         f"got {tuple(a.shape)} (out_channels {unet.config.out_channels})")
    inverse = torch.linalg.inv(a)
    w_in = unet.conv_in.weight
    w_in.copy_(torch.einsum("oikl,ij->ojkl", w_in.double(), a).to(w_in.dtype))
    w_out, b_out = unet.conv_out.weight, unet.conv_out.bias
    w_out.copy_(torch.einsum("ij,jokl->iokl", inverse, w_out.double()).to(w_out.dtype))
    if b_out is not None:
        b_out.copy_((inverse @ b_out.double()).to(b_out.dtype))
