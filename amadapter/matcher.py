"""The adapter: 4D cost aggregation over (target grid x exemplar grid) volumes.

Each phi is four separable 4D convolutions H+1 -> 16 -> 32 -> 16 -> H (a 1x1 conv over the
query dims plus a 3x3 conv over the exemplar dims, summed; GroupNorm(1); ReLU). One phi
each for the UNet's down, mid and up blocks, not timestep-conditioned.

Volumes are kept in a query-major layout (B*Nq, C, he, we): the 1x1 query conv is then a
per-position channel mix, so it folds into the centre tap of the 3x3 exemplar conv and one
conv2d does both (exactly the same sum; see tests/test_model_matcher.py).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

BLOCKS = ("down", "mid", "up")
VOLUME_BUDGET = 1 << 21  # elements of the widest aggregation activation per chunk of samples


class Separable4DConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.query_conv = nn.Conv2d(in_channels, out_channels, 1)
        self.exemplar_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B*Nq, Cin, he, we) -> (B*Nq, Cout, he, we)."""
        weight = self.exemplar_conv.weight + F.pad(self.query_conv.weight, (1, 1, 1, 1))
        bias = self.exemplar_conv.bias + self.query_conv.bias
        return F.conv2d(x, weight, bias, padding=1)


class CostAggregator(nn.Module):
    """phi: (B*Nq, H+1, he, we) -> (B*Nq, H, he, we); GroupNorm(1) over each sample's volume."""

    def __init__(self, in_channels: int, hidden_channels: tuple, out_channels: int):
        super().__init__()
        chans = (in_channels, *hidden_channels, out_channels)
        self.convs = nn.ModuleList(Separable4DConv(a, b) for a, b in zip(chans[:-1], chans[1:]))
        self.norms = nn.ModuleList(nn.GroupNorm(1, b) for b in chans[1:])

    def forward(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = conv(x)
            y = F.group_norm(x.reshape(batch, 1, -1), 1, eps=norm.eps).view_as(x)
            x = F.relu(y * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1))
        return x


def aggregation_grid(hw: tuple[int, int], max_side: int) -> tuple[int, int]:
    """The grid a layer is aggregated on: itself, or shrunk (aspect kept) to ``max_side``."""
    h, w = hw
    if max(h, w) <= max_side:
        return (h, w)
    f = max(h, w) / max_side
    return (max(1, round(h / f)), max(1, round(w / f)))


def resize_volume(x: torch.Tensor, q_hw, e_hw, q_to, e_to) -> torch.Tensor:
    """Bilinear resize of a (B, C, Nq, Ne) volume, exemplar dims then query dims."""
    B, C, Nq, Ne = x.shape
    y = x.reshape(B * C, Nq, *e_hw)
    if tuple(e_to) != tuple(e_hw):
        y = F.interpolate(y, size=tuple(e_to), mode="bilinear", align_corners=False)
    ne = e_to[0] * e_to[1]
    y = y.reshape(B * C, Nq, ne).transpose(1, 2).reshape(B * C, ne, *q_hw)
    if tuple(q_to) != tuple(q_hw):
        y = F.interpolate(y, size=tuple(q_to), mode="bilinear", align_corners=False)
    return y.reshape(B, C, ne, q_to[0] * q_to[1]).transpose(2, 3)


def block_of(layer_name: str) -> str:
    """'down_blocks.1.attentions...' -> 'down' (which phi serves a layer)."""
    for prefix, block in (("down_blocks", "down"), ("mid_block", "mid"), ("up_blocks", "up")):
        if layer_name.startswith(prefix):
            return block
    raise ValueError(f"attention layer {layer_name!r} is in no down/mid/up block")


class Matcher(ModelMixin, ConfigMixin):
    """Refines exemplar logits in place: L_ex += phi(R) - max(phi(R)) / 4.

    Reading of method.md's "max(phi(R))": the maximum over all (query, exemplar) positions
    of each sample and head, so a sample's result never depends on its batch neighbours
    (the release takes one max over the whole batch tensor).
    ``cost_transposed`` reproduces the release's transposed cost, for imported weights only.
    """

    @register_to_config
    def __init__(
        self,
        num_heads: int = 8,
        hidden_channels: tuple = (16, 32, 16),
        max_side: int = 32,
        cost_transposed: bool = False,
    ):
        super().__init__()
        self.phi_down = CostAggregator(num_heads + 1, tuple(hidden_channels), num_heads)
        self.phi_mid = CostAggregator(num_heads + 1, tuple(hidden_channels), num_heads)
        self.phi_up = CostAggregator(num_heads + 1, tuple(hidden_channels), num_heads)
        self.zero_output = False  # runtime switch for ablations/tests; never saved

    @torch.no_grad()
    def start_near_zero_(self, bias: float = 1e-2) -> "Matcher":
        """Make every phi output a tiny constant (last GroupNorm: weight 0, small bias), so the
        adapter starts as a uniform shift of the exemplar logits (am_adapter ~ sa_aug) and
        training moves it from there rather than from random routing noise. The bias is not 0
        so the final ReLU still passes gradient."""
        for block in BLOCKS:
            norm = self.phi(block).norms[-1]
            norm.weight.zero_()
            norm.bias.fill_(bias)
        return self

    def phi(self, block: str) -> CostAggregator:
        return {"down": self.phi_down, "mid": self.phi_mid, "up": self.phi_up}[block]

    @contextlib.contextmanager
    def disabled(self):
        """Force the adapter's contribution to zero (am_adapter then equals sa_aug)."""
        previous, self.zero_output = self.zero_output, True
        try:
            yield self
        finally:
            self.zero_output = previous

    def residual(self, logits: torch.Tensor, cost: torch.Tensor, e_hw, block: str) -> torch.Tensor:
        """phi(R) - max/4 for logits (B, H, Nq, Ne) and cost (B or 1, Nq, Ne) on one grid."""
        B, H, Nq, Ne = logits.shape
        if H != self.config.num_heads:
            raise ValueError(f"matcher was built for {self.config.num_heads} heads, the layer has {H}")
        cost = cost.to(logits.dtype).expand(B, Nq, Ne)
        r = torch.cat([logits.transpose(1, 2), cost[:, :, None, :]], dim=2)  # (B, Nq, H+1, Ne)
        out = self.phi(block)(r.reshape(B * Nq, H + 1, *e_hw), B).view(B, Nq, H, Ne)
        out = out - out.amax(dim=(1, 3), keepdim=True) / 4
        return out.transpose(1, 2)

    def refine_(
        self,
        logits: torch.Tensor,
        cost_fn: Callable[[tuple, tuple], torch.Tensor],
        q_hw: tuple[int, int],
        e_hw: tuple[int, int],
        block: str,
    ) -> torch.Tensor:
        """Add the refinement to ``logits`` (B, H, Nq, Ne) in place; ``cost_fn(q_grid, e_grid)``
        gives the matching cost on the aggregation grid. Returns ``logits``."""
        if self.zero_output:
            return logits
        q_agg = aggregation_grid(q_hw, self.config.max_side)
        e_agg = aggregation_grid(e_hw, self.config.max_side)
        resized = (q_agg, e_agg) != (tuple(q_hw), tuple(e_hw))
        cost = cost_fn(q_agg, e_agg)
        if self.config.cost_transposed:
            if q_agg != e_agg:
                raise ValueError(
                    f"cost_transposed (imported release weights) needs equal target and exemplar grids, got {q_agg} vs {e_agg}"
                )
            cost = cost.transpose(-1, -2)
        # GroupNorm and the max are per sample, so samples can be aggregated a few at a time:
        # the same result, with the 4D volumes small enough to stay in cache.
        per_sample = q_agg[0] * q_agg[1] * e_agg[0] * e_agg[1] * max(self.config.hidden_channels)
        step = max(1, VOLUME_BUDGET // per_sample)
        for a in range(0, logits.shape[0], step):
            part = logits[a : a + step]
            x = part.detach()  # stop-gradient: the adapter reads the logits, it does not train them
            if resized:
                x = resize_volume(x, q_hw, e_hw, q_agg, e_agg)
            res = self.residual(x, cost if cost.shape[0] == 1 else cost[a : a + step], e_agg, block)
            if resized:
                res = resize_volume(res, q_agg, e_agg, q_hw, e_hw)
            part.add_(res)
        return logits
