"""The adapter: 4D cost aggregation over (target grid x exemplar grid) volumes.

Each phi is four separable 4D convolutions H+1 -> 16 -> 32 -> 16 -> H (a 1x1 conv over the
query dims plus a 3x3 conv over the exemplar dims, summed; GroupNorm(1); ReLU). One phi
each for the UNet's down, mid and up blocks, not timestep-conditioned.

Volumes are kept in a query-major layout (B*Nq, C, he, we): the 1x1 query conv is then a
per-position channel mix, so it folds into the centre tap of the 3x3 exemplar conv and one
conv2d does both (exactly the same sum; see tests/test_model_matcher.py). In memory the volumes
are channels-last, stored (B, Nq, he, we, C): the aggregation input is written that way once
from the logits (resized first, so only reduced-size volumes exist), the thin convs run 2-4x
faster so on CPU, and GroupNorm reads each sample's volume as one flat row
(tests/test_matcher_fast_path.py checks the whole refinement against a plain reference).

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

from amadapter.reductions import affine_normalize, split_amax, split_var_mean, use_split

BLOCKS = ("down", "mid", "up")
# Bytes of the widest aggregation activation per chunk of samples: a few samples at toy size
# (their volumes stay in cache), one sample at SD1.5 size (a 32x32x32x32 volume of 32 channels
# is 128 MB in fp32; GroupNorm and the max are per sample, so one sample is the floor).
VOLUME_BUDGET_BYTES = 8 << 20
# On CUDA the budget is a memory bound only: a sample at a time would run each of the matcher's
# kernels once per sample (batch 8 at SD1.5: 8 launches of ~60 each per layer, fp16 volumes of
# 64 MB per sample), so samples share kernels up to this many bytes of the widest activation.
CUDA_VOLUME_BUDGET_BYTES = 512 << 20
# Bytes of the upsampled residual held at once while it is added back to full-size logits
# (query rows are upsampled a block at a time; SD1.5: 16 of the 64 target rows per block).
RESIDUAL_BUDGET_BYTES = 64 << 20
# The release's fixed sizes (cvlab-kaist/AM-Adapter): the cost is built on a 32x32 grid
# (src/pipelines/pipeline_ours.py:1096-1097); a layer of 64x64 tokens (attn_size 8192 =
# 2 x 64 x 64, src/models/attention_processor.py:119) is aggregated on that 32x32 grid.
RELEASE_COST_SIDE = 32
RELEASE_RESIZED_SIDE = 64
CHANNELS_LAST = torch.channels_last


class Separable4DConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.query_conv = nn.Conv2d(in_channels, out_channels, 1)
        self.exemplar_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B*Nq, Cin, he, we) -> (B*Nq, Cout, he, we), channels-last memory (the channels of
        one (query, exemplar) position adjacent: 2-4x faster on CPU for these thin convs)."""
        weight = self.exemplar_conv.weight + F.pad(self.query_conv.weight, (1, 1, 1, 1))
        bias = self.exemplar_conv.bias + self.query_conv.bias
        return F.conv2d(x.contiguous(memory_format=CHANNELS_LAST), weight, bias, padding=1)


def group_norm_relu(x: torch.Tensor, batch: int, norm: nn.GroupNorm) -> torch.Tensor:
    """relu(GroupNorm(1)(x)) with the statistics over each sample's whole volume, for x
    (batch*Nq, C, he, we) in channels-last memory; the result keeps that memory format.

    On the CPU the statistics run on the flat per-sample rows (torch's group norm kernel; a
    two-dim ``var_mean`` is 20x slower here), the affine is one fused multiply-add, ReLU is in
    place. On CUDA that kernel reduces a sample with one thread block, so the statistics come
    from :func:`amadapter.reductions.split_var_mean` and normalization and affine are one
    multiply-add (:func:`amadapter.reductions.affine_normalize`)."""
    n, c, h, w = x.shape
    flat = x.permute(0, 2, 3, 1).reshape(batch, 1, -1)  # a view when x is channels-last
    if use_split(x):
        var, mean = (t[:, None].expand(batch, c) for t in split_var_mean(flat.view(batch, -1)))
        rows = flat.view(batch, -1, c)
        y = affine_normalize(rows, var, mean, norm.weight, norm.bias, norm.eps, (batch, 1, c)).relu_()
    else:
        y = F.group_norm(flat, 1, eps=norm.eps).view(batch, -1, c)
        y = torch.addcmul(norm.bias, y, norm.weight).relu_()
    return y.view(n, h, w, c).permute(0, 3, 1, 2)


def volume_max(v: torch.Tensor, per_head: bool = True) -> torch.Tensor:
    """The max of each sample's volume v (B, Nq, Ne, H): (B, H), one per head, or (B,) over all
    heads. On CUDA the volume is split into pieces (:func:`amadapter.reductions.split_amax`,
    the same value); on the CPU one ``amax``."""
    B, H = v.shape[0], v.shape[-1]
    if use_split(v):
        return split_amax(v.reshape(B, -1, H) if per_head else v.reshape(B, -1))
    return v.amax(dim=(1, 2)) if per_head else v.amax(dim=(1, 2, 3))


class CostAggregator(nn.Module):
    """phi: (B*Nq, H+1, he, we) -> (B*Nq, H, he, we); GroupNorm(1) over each sample's volume."""

    def __init__(self, in_channels: int, hidden_channels: tuple, out_channels: int):
        super().__init__()
        chans = (in_channels, *hidden_channels, out_channels)
        self.convs = nn.ModuleList(Separable4DConv(a, b) for a, b in zip(chans[:-1], chans[1:]))
        self.norms = nn.ModuleList(nn.GroupNorm(1, b) for b in chans[1:])

    def forward(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = group_norm_relu(conv(x), batch, norm)
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


def _halved(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Bilinear (align_corners=False) halving of axis ``dim``: each output samples the midpoint
    of a pair of inputs, i.e. their mean (one strided read of ``x``)."""
    pairs = x.unflatten(dim, (x.shape[dim] // 2, 2))
    return torch.add(pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)).mul_(0.5)


def _doubled(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Bilinear (align_corners=False) doubling of axis ``dim``: output 2i is 3/4 x[i] + 1/4 x[i-1],
    output 2i+1 is 3/4 x[i] + 1/4 x[i+1], clamped at the ends (each output written once)."""
    n = x.shape[dim]
    if n == 1:
        return torch.cat([x, x], dim)
    lo, hi = x.narrow(dim, 0, n - 1), x.narrow(dim, 1, n - 1)
    if torch.is_grad_enabled() and x.requires_grad:  # out= cannot record a graph
        even = torch.cat([x.narrow(dim, 0, 1), torch.lerp(hi, lo, 0.25)], dim)
        odd = torch.cat([torch.lerp(lo, hi, 0.25), x.narrow(dim, n - 1, 1)], dim)
        return torch.stack([even, odd], dim + 1).flatten(dim, dim + 1)
    out = x.new_empty(*x.shape[:dim], n, 2, *x.shape[dim + 1 :])
    even, odd = out.select(dim + 1, 0), out.select(dim + 1, 1)
    even.narrow(dim, 0, 1).copy_(x.narrow(dim, 0, 1))
    odd.narrow(dim, n - 1, 1).copy_(x.narrow(dim, n - 1, 1))
    torch.lerp(hi, lo, 0.25, out=even.narrow(dim, 1, n - 1))
    torch.lerp(lo, hi, 0.25, out=odd.narrow(dim, 0, n - 1))
    return out.flatten(dim, dim + 1)


def resize_axis(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Linear (align_corners=False) resize of one axis; bilinear resizing is this applied to
    each of the two axes. Halving and doubling (the release's 64 <-> 32) avoid interpolate's
    index tables and run as strided arithmetic."""
    n = x.shape[dim]
    if n == size:
        return x
    if n == 2 * size:
        return _halved(x, dim)
    if size == 2 * n:
        return _doubled(x, dim)
    y = x.movedim(dim, -1)
    lead = y.shape[:-1]
    y = F.interpolate(y.reshape(-1, 1, n), size=size, mode="linear", align_corners=False)
    return y.view(*lead, size).movedim(-1, dim)


def reduced_volume(logits: torch.Tensor, cost: torch.Tensor, q_hw, e_hw, q_to, e_to) -> torch.Tensor:
    """The aggregation input R for logits (b, H, Nq, Ne) and cost (b or 1, Nq', Ne') on the grids
    (q_to, e_to): (b*Nq', H+1, he', we') in channels-last memory, i.e. stored (b, Nq', Ne', H+1).
    The logits are resized before anything is copied (exemplar dims, then query dims, as
    :func:`resize_volume`), so only reduced-size volumes are allocated."""
    b, H = logits.shape[:2]
    x = logits.reshape(b, H, *q_hw, *e_hw)
    for dim, size in zip((5, 4, 3, 2), (e_to[1], e_to[0], q_to[1], q_to[0])):
        x = resize_axis(x, dim, size)
    nq, ne = q_to[0] * q_to[1], e_to[0] * e_to[1]
    r = logits.new_empty(b, nq, ne, H + 1)
    r[..., :H].copy_(x.reshape(b, H, nq, ne).permute(0, 2, 3, 1))
    r[..., H].copy_(cost.to(r.dtype).expand(b, nq, ne))
    return r.view(b * nq, *e_to, H + 1).permute(0, 3, 1, 2)


def add_upsampled_(logits: torch.Tensor, res: torch.Tensor, q_hw, e_hw, q_from, e_from,
                   budget_bytes: int | None = None) -> torch.Tensor:
    """logits (b, H, Nq, Ne) += res (b, Nq', Ne', H) resized bilinearly from (q_from, e_from) to
    (q_hw, e_hw), exemplar dims then query dims (the order of :func:`resize_volume`).

    The full-size residual never exists when the target grid's height doubles: its rows are
    upsampled a block at a time (about ``budget_bytes`` of intermediates), each block with one
    reduced row of context on either side. A doubled row reads only its two nearest source
    rows, so a block's rows equal those of the whole."""
    b, H = logits.shape[:2]
    (hq, wq), (hf, wf) = tuple(q_hw), tuple(q_from)
    budget = RESIDUAL_BUDGET_BYTES if budget_bytes is None else budget_bytes
    blocked = hq == 2 * hf
    rows = hf
    if blocked:  # per reduced row, the widest intermediate: two full-size target rows
        per_row = 2 * b * H * wq * e_hw[0] * e_hw[1] * res.element_size()
        rows = max(1, min(hf, budget // per_row))
    src = res.view(b, hf, wf, *e_from, H).permute(0, 5, 1, 2, 3, 4)  # (b, H, hf, wf, he', we')
    full = logits.view(b, H, hq, wq, *e_hw)
    for r0 in range(0, hf, rows):
        r1 = min(hf, r0 + rows)
        s0, s1 = (max(0, r0 - 1), min(hf, r1 + 1)) if blocked else (0, hf)
        y = src[:, :, s0:s1]
        for dim, size in ((5, e_hw[1]), (4, e_hw[0]), (3, wq)):
            y = resize_axis(y, dim, size)
        if blocked:
            y = _doubled(y, 2)[:, :, 2 * (r0 - s0) : 2 * (r1 - s0)]
            full[:, :, 2 * r0 : 2 * r1].add_(y)
        else:
            full.add_(resize_axis(y, 2, hq))
    return logits


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
        self.volume_budget_bytes: int | None = None  # runtime setting (tests shrink it; None: by device); never saved

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

    def _volume_budget(self, x: torch.Tensor) -> int:
        if self.volume_budget_bytes is not None:
            return self.volume_budget_bytes
        return CUDA_VOLUME_BUDGET_BYTES if x.is_cuda else VOLUME_BUDGET_BYTES

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
        return self.phi(block)(r.reshape(B * Nq, H + 1, *e_hw), B).reshape(B, Nq, H, Ne)

    def residual(self, logits: torch.Tensor, cost: torch.Tensor, e_hw, block: str) -> torch.Tensor:
        """phi(R) - max/4 for logits (B, H, Nq, Ne) and cost (B or 1, Nq, Ne) on one grid."""
        out = self.aggregate(logits, cost, e_hw, block)
        B, _, H, _ = out.shape
        out = out - volume_max(out.transpose(2, 3)).view(B, 1, H, 1) / 4
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
        B, H = logits.shape[:2]
        if H != self.config.num_heads:
            raise ValueError(f"matcher was built for {self.config.num_heads} heads, the layer has {H}")
        # GroupNorm and the max are per sample, so samples are aggregated a few at a time (as
        # many as fit the byte budget): the same result, with the volumes bounded in memory.
        nq, ne = q_agg[0] * q_agg[1], e_agg[0] * e_agg[1]
        per_sample = nq * ne * max(self.config.hidden_channels) * logits.element_size()
        step = max(1, self._volume_budget(logits) // per_sample)
        phi = self.phi(block)
        for a in range(0, B, step):
            part = logits[a : a + step]
            b = part.shape[0]
            # stop-gradient: the adapter reads the logits, it does not train them
            r = reduced_volume(part.detach(), cost if cost.shape[0] == 1 else cost[a : a + step],
                               q_hw, e_hw, q_agg, e_agg)
            out = phi(r, b).permute(0, 2, 3, 1).reshape(b, nq, ne, H)  # a view: phi's output is channels-last
            peak = volume_max(out).view(b, 1, 1, H)  # per sample and head
            res = out.sub_(peak / 4) if not torch.is_grad_enabled() else out - peak / 4
            if resized:
                add_upsampled_(part, res, q_hw, e_hw, q_agg, e_agg)
            else:
                part.add_(res.permute(0, 3, 1, 2))
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
        step = max(1, self._volume_budget(logits) // (rows * m * m * max(self.config.hidden_channels) * logits.element_size()))
        for a in range(0, B, step):
            part = logits[a : a + step]
            cost = seg if seg.shape[0] == 1 else seg[a : a + step]
            peak, outs = None, []
            for x in ([part] if uncond_logits is None else [part, uncond_logits[a : a + step]]):
                x = x.detach()
                if big:
                    x = flat_resize(x, m, "bilinear")
                out = self.aggregate(x, cost, grid, "down")
                p = volume_max(out.transpose(2, 3), per_head=False)
                peak = p if peak is None else torch.maximum(peak, p)
                outs.append(out)
            res = (outs[0] - peak.view(-1, 1, 1, 1) / 4).transpose(1, 2)
            if big:
                res = flat_resize(res, n, "bilinear")
            part.add_(res)
        return logits
