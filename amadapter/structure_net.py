"""Structure guidance: a ControlNeXt-style light conv net on the label map, and the hook
that injects its output into a stock diffusers UNet after the first down block."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import Downsample2D, ResnetBlock2D
from torch import nn

from amadapter.reductions import SplitGroupNorm


class StructureNet(ModelMixin, ConfigMixin):
    """Colourised label map (B, 3, H, W) in [0, 1] + timestep -> guidance (B, out_channels, h, w).

    Strided stem (GroupNorm, ReLU), ResNet stages with time embedding and strided
    downsampling, a residual mid conv, then a 1x1 conv to the UNet's first block width.
    Its group norms are :class:`amadapter.reductions.SplitGroupNorm` (nn.GroupNorm's parameters
    and state dict): the stem's two groups of 2-4M values per sample at SD1.5 split on CUDA.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        stem_channels: tuple = (64, 64, 128),
        stem_strides: tuple = (2, 1, 1),
        stem_groups: int = 2,
        stage_channels: tuple = (128, 256),
        stage_groups: tuple = (4, 8),
        mid_groups: int = 8,
        out_channels: int = 320,
        time_proj_dim: int = 128,
        time_embed_dim: int = 256,
        scale: float = 1.0,
    ):
        super().__init__()
        self.time_proj = Timesteps(time_proj_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time_proj_dim, time_embed_dim)
        stem: list[nn.Module] = []
        cin = in_channels
        for cout, stride in zip(stem_channels, stem_strides):
            stem += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), SplitGroupNorm(stem_groups, cout), nn.ReLU()]
            cin = cout
        self.stem = nn.Sequential(*stem)
        self.resnets = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        for cout, groups in zip(stage_channels, stage_groups):
            resnet = ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=time_embed_dim, groups=groups)
            resnet.norm1, resnet.norm2 = SplitGroupNorm.like(resnet.norm1), SplitGroupNorm.like(resnet.norm2)
            self.resnets.append(resnet)
            self.downsamplers.append(Downsample2D(cout, use_conv=True, out_channels=cout, padding=1, name="op"))
            cin = cout
        self.mid = nn.Sequential(
            nn.Conv2d(cin, cin, 3, padding=1), nn.ReLU(), SplitGroupNorm(mid_groups, cin),
            nn.Conv2d(cin, cin, 3, padding=1), SplitGroupNorm(mid_groups, cin),
        )
        self.conv_out = nn.Conv2d(cin, out_channels, 1)

    def forward(self, cond: torch.Tensor, timestep: torch.Tensor | int | float) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=cond.device)
        if t.ndim == 0:
            t = t[None]
        t = t.expand(cond.shape[0])
        emb = self.time_embedding(self.time_proj(t).to(cond.dtype))
        x = self.stem(cond)
        for resnet, down in zip(self.resnets, self.downsamplers):
            x = down(resnet(x, emb))
        x = self.mid(x) + x
        return self.conv_out(x)


def cross_normalize(guidance: torch.Tensor, hidden: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Pool ``guidance`` to ``hidden``'s size and give it ``hidden``'s per-sample mean and std."""
    g = F.adaptive_avg_pool2d(guidance, hidden.shape[-2:]).to(hidden.dtype)
    if g.shape[0] != hidden.shape[0]:  # CFG: [uncond ; cond] halves read the same map
        g = g.repeat(hidden.shape[0] // g.shape[0], 1, 1, 1)
    dims = (1, 2, 3)
    g_mean, g_std = g.mean(dims, keepdim=True), g.std(dims, keepdim=True)
    h_mean, h_std = hidden.mean(dims, keepdim=True), hidden.std(dims, keepdim=True)
    return (g - g_mean) * (h_std / (g_std + eps)) + h_mean


class StructureInjector:
    """A forward hook on ``unet.down_blocks[0]`` adding the (cross-normalised, scaled) guidance
    to its hidden states; the block's skip connections are left as they were."""

    def __init__(self, unet):
        self.guidance: torch.Tensor | None = None
        self.scale = 1.0
        self._handle = unet.down_blocks[0].register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if self.guidance is None:
            return None
        hidden, res_samples = output
        return hidden + self.scale * cross_normalize(self.guidance, hidden), res_samples

    @contextlib.contextmanager
    def guide(self, guidance: torch.Tensor | None, scale: float = 1.0):
        self.guidance, self.scale = guidance, scale
        try:
            yield
        finally:
            self.guidance = None

    def remove(self) -> None:
        self._handle.remove()
