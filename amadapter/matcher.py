"""The adapter: 4D cost aggregation over (target grid x exemplar grid) volumes.

Each phi is four separable 4D convolutions H+1 -> 16 -> 32 -> 16 -> H (a 1x1 conv over the
query dims plus a 3x3 conv over the exemplar dims, summed; GroupNorm(1); ReLU). One phi
each for the UNet's down, mid and up blocks, not timestep-conditioned.

Volumes are kept in a query-major layout (B*Nq, C, he, we): the 1x1 query conv is then a
per-position channel mix, so it folds into the centre tap of the 3x3 exemplar conv and one
conv2d does both (exactly the same sum; see tests/test_model_matcher.py).

``release_compat`` (imported release weights only; docs/architecture.md, "Release
compatibility") reproduces the public release's inference, which differs from the method:
one phi (the down stack) for every layer, one max over the target's whole CFG pair and all
heads, a fixed 32x32 cost resized as a flattened matrix, and 64x64 logits resized the same way.
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
# The release's fixed sizes (cvlab-kaist/AM-Adapter): the cost is built on a 32x32 grid
# (src/pipelines/pipeline_ours.py:1096-1097); a layer of 64x64 tokens (attn_size 8192 =
# 2 x 64 x 64, src/models/attention_processor.py:119) is aggregated on that 32x32 grid.
RELEASE_COST_SIDE = 32
RELEASE_RESIZED_SIDE = 64


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


def flat_resize(x: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """Resize the last two dims of ``x`` (..., N, M) to (n, n) as if the matrix were an image:
    the release's resize of a flattened (query x exemplar) matrix. Grid cells are not kept
    together (row r of a 16x16 layer reads flat cell floor(r * 1024 / 256) of the 32x32 grid)."""
    lead = x.shape[:-2]
    y = x.reshape(-1, 1, *x.shape[-2:])
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    y = F.interpolate(y, size=(n, n), mode=mode, **kwargs)
    return y.reshape(*lead, n, n)


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
    ``release_compat`` reproduces the release's whole inference path (it implies the
    transposed cost); see :meth:`_refine_release_`.
    """

    # The release's grid sizes; instance attributes may shrink them (tests on small grids).
    release_cost_side = RELEASE_COST_SIDE
    release_resized_side = RELEASE_RESIZED_SIDE

    # release_compat came after the bundled toy model; off, it changes nothing (model_hash).
    _hash_neutral_defaults = {"release_compat": False}

    @register_to_config
    def __init__(
        self,
        num_heads: int = 8,
        hidden_channels: tuple = (16, 32, 16),
        max_side: int = 32,
        cost_transposed: bool = False,
        release_compat: bool = False,
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

    def aggregate(self, logits: torch.Tensor, cost: torch.Tensor, e_hw, block: str) -> torch.Tensor:
        """phi(R), query-major (B, Nq, H, Ne), for logits (B, H, Nq, Ne) and cost (B or 1, Nq, Ne)."""
        B, H, Nq, Ne = logits.shape
        if H != self.config.num_heads:
            raise ValueError(f"matcher was built for {self.config.num_heads} heads, the layer has {H}")
        cost = cost.to(logits.dtype).expand(B, Nq, Ne)
        r = torch.cat([logits.transpose(1, 2), cost[:, :, None, :]], dim=2)  # (B, Nq, H+1, Ne)
        return self.phi(block)(r.reshape(B * Nq, H + 1, *e_hw), B).view(B, Nq, H, Ne)

    def residual(self, logits: torch.Tensor, cost: torch.Tensor, e_hw, block: str) -> torch.Tensor:
        """phi(R) - max/4 for logits (B, H, Nq, Ne) and cost (B or 1, Nq, Ne) on one grid."""
        out = self.aggregate(logits, cost, e_hw, block)
        out = out - out.amax(dim=(1, 3), keepdim=True) / 4
        return out.transpose(1, 2)

    def refine_(
        self,
        logits: torch.Tensor,
        cost_fn: Callable[[tuple, tuple], torch.Tensor],
        q_hw: tuple[int, int],
        e_hw: tuple[int, int],
        block: str,
        uncond_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Add the refinement to ``logits`` (B, H, Nq, Ne) in place; ``cost_fn(q_grid, e_grid)``
        gives the matching cost on the aggregation grid. Returns ``logits``.
        ``uncond_logits`` (the unconditional CFG rows' exemplar logits, row i pairing with
        logits row i) are read under ``release_compat`` only (for the max)."""
        if self.zero_output:
            return logits
        if self.config.release_compat:
            return self._refine_release_(logits, uncond_logits, cost_fn, tuple(q_hw), tuple(e_hw))
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

    def _refine_release_(self, logits, uncond_logits, cost_fn, q_hw, e_hw) -> torch.Tensor:
        """The release's refinement (cvlab-kaist/AM-Adapter, src/models/attention_processor.py
        :104-148, src/models/matching_module.py:91-97, src/pipelines/pipeline_ours.py:1096-1099).

        * phi is the down stack for every layer: the block name reaches ``OurModel.forward`` as
          its ``t`` argument, so ``block`` keeps its default "down_blocks".
        * the cost is built once on a 32x32 grid, rows exemplar and columns target; a layer of
          other size reads it through a nearest resize of the flattened matrix.
        * a 64x64 layer resizes its logits bilinearly as a flattened matrix to 1024 x 1024,
          aggregates there, and resizes the residual back the same way.
        * the max is one scalar over the target's CFG pair (its conditional and unconditional
          rows: the release's UNet batch) and all heads.
        """
        if q_hw != e_hw or q_hw[0] != q_hw[1]:
            raise ValueError(f"release_compat (imported release weights) needs square target and exemplar grids of one "
                             f"size, as the release does; got target {q_hw}, exemplar {e_hw}")
        B, H, n, _ = logits.shape
        if uncond_logits is not None and uncond_logits.shape != logits.shape:
            raise ValueError(f"release_compat: unconditional logits {tuple(uncond_logits.shape)} do not pair with the "
                             f"conditional logits {tuple(logits.shape)}")
        side = self.release_cost_side
        seg = cost_fn((side, side), (side, side)).transpose(-1, -2)  # release: rows exemplar, columns target
        big = n == self.release_resized_side ** 2
        grid = (side, side) if big else q_hw
        m = grid[0] * grid[1]
        if not big:
            seg = flat_resize(seg.float(), n, "nearest")
        rows = 1 if uncond_logits is None else 2
        step = max(1, VOLUME_BUDGET // (rows * m * m * max(self.config.hidden_channels)))
        for a in range(0, B, step):
            part = logits[a : a + step]
            cost = seg if seg.shape[0] == 1 else seg[a : a + step]
            peak, outs = None, []
            for x in ([part] if uncond_logits is None else [part, uncond_logits[a : a + step]]):
                x = x.detach()
                if big:
                    x = flat_resize(x, m, "bilinear")
                out = self.aggregate(x, cost, grid, "down")
                p = out.amax(dim=(1, 2, 3))
                peak = p if peak is None else torch.maximum(peak, p)
                outs.append(out)
            res = (outs[0] - peak.view(-1, 1, 1, 1) / 4).transpose(1, 2)
            if big:
                res = flat_resize(res, n, "bilinear")
            part.add_(res)
        return logits
