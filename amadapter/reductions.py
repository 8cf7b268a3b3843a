"""Per-sample reductions over huge rows, with a device-aware split.

The adapter normalizes and takes the max over each sample's whole 4D volume: rows of tens of
millions of values at SD1.5 (32x32x32x32 positions x 16-32 channels). On the CPU torch's group
norm kernel reads such a row fastest (a two-dim ``var_mean`` measured 20x slower), so that path
stays as it is. On CUDA that kernel gives each row one thread block: one block of 132 reduces a
sample while the rest of the GPU waits (89% of an am_adapter step's device time on an H200,
issue 20). The split path cuts each row into ``SPLIT_CHUNK`` pieces, reduces every piece in its
own slot of one batched kernel, and combines the pieces' results: the max of the maxima, and
the moments by Chan's parallel formula (the pieces' means and squared deviations, in float32).

:func:`use_split` picks the path: CUDA tensors split, CPU tensors do not; :func:`split_reductions`
forces either for a block of code (tests force the split on the CPU to check it against the
plain path and a float64 reference).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

# Elements per piece of a row. Long enough that a piece is a cheap reduction of its own, short
# enough that a sample's volume (1M-33M elements) makes hundreds to thousands of pieces.
SPLIT_CHUNK = 1 << 14
_forced: bool | None = None  # None: by device; set by split_reductions()


def use_split(x: torch.Tensor) -> bool:
    """Whether reductions over ``x`` take the split path: forced, or on CUDA by default."""
    return x.is_cuda if _forced is None else _forced


@contextlib.contextmanager
def split_reductions(on: bool | None = True):
    """Force the split path (``True``), the plain path (``False``) or the device's choice (``None``)
    for the reductions run inside the block."""
    global _forced
    previous, _forced = _forced, on
    try:
        yield
    finally:
        _forced = previous


def _pieces(n: int, chunk: int) -> tuple[int, int, int]:
    """A row of ``n`` values as ``count`` pieces of ``size`` and a ``tail`` of the rest."""
    size = min(chunk, n)
    count = n // size
    return count, size, n - count * size


def split_amax(x: torch.Tensor, chunk: int = SPLIT_CHUNK) -> torch.Tensor:
    """``x.amax(1)`` for x (B, N, K) or (B, N), as the max over pieces of dim 1 (exact: the same
    value as the plain max). ``chunk`` counts elements, so a piece spans chunk // K rows of N."""
    inner = x.shape[2] if x.dim() == 3 else 1
    count, size, tail = _pieces(x.shape[1], max(1, chunk // inner))
    head = x.narrow(1, 0, count * size).unflatten(1, (count, size)).amax(2).amax(1)
    return head if not tail else torch.maximum(head, x.narrow(1, count * size, tail).amax(1))


def split_var_mean(x: torch.Tensor, chunk: int = SPLIT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(biased variance, mean) of each row of x (B, N), float32 (float64 for float64 input),
    from pieces: every piece's variance and mean in one batched kernel each, accumulated and
    returned in float32 (on CUDA a half or bfloat16 input is read as it is, no float copy),
    combined by Chan's formula M2 = sum n_i var_i + sum n_i (mean_i - mean)^2."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    count, size, tail = _pieces(x.shape[1], chunk)
    rows = [(x.narrow(1, 0, count * size).reshape(x.shape[0], count, size), size)]
    if tail:
        rows.append((x.narrow(1, count * size, tail)[:, None], tail))
    var_i, mean_i, n_i = [], [], []
    graph = torch.is_grad_enabled() and x.requires_grad  # out= records no graph: upcast instead
    for piece, n in rows:
        if graph:
            v, m = torch.var_mean(piece.to(acc), dim=2, correction=0)
        else:
            v = torch.var(piece, dim=2, correction=0, out=piece.new_empty(piece.shape[:2], dtype=acc))
            m = torch.mean(piece, dim=2, dtype=acc)
        var_i.append(v)
        mean_i.append(m)
        n_i.append(torch.full((piece.shape[1],), float(n), dtype=acc, device=x.device))
    var_i, mean_i, n_i = torch.cat(var_i, 1), torch.cat(mean_i, 1), torch.cat(n_i)
    total = float(x.shape[1])
    mean = (mean_i * n_i).sum(1) / total
    m2 = (var_i * n_i).sum(1) + ((mean_i - mean[:, None]).square() * n_i).sum(1)
    return m2 / total, mean


# nn.GroupNorm on CUDA gives each (sample, group) row one thread block: a net whose rows are few
# and long (the structure net's stem at SD1.5: 2 groups of 2-4M values per sample) leaves most of
# the GPU idle, so such rows are split. Short or many rows keep torch's kernel.
SPLIT_GROUP_NORM_MIN_ROW = 1 << 16
SPLIT_GROUP_NORM_MAX_ROWS = 256


def affine_normalize(x: torch.Tensor, var, mean, weight, bias, eps: float, shape) -> torch.Tensor:
    """weight * (x - mean) / sqrt(var + eps) + bias as one multiply-add with a float32 scale and
    shift: ``var`` and ``mean`` (N, C) per sample and channel, ``shape`` how (N, C) broadcasts
    over x. The result has x's dtype (on CUDA one pass: half/bfloat16 in and out) and, made by
    ``empty_like``, its memory format."""
    scale = (var + eps).rsqrt()
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shift = -mean * scale if bias is None else bias.to(scale.dtype) - mean * scale
    if torch.is_grad_enabled():  # out= records no graph
        return torch.addcmul(shift.view(shape), x, scale.view(shape)).to(x.dtype)
    return torch.addcmul(shift.view(shape), x, scale.view(shape), out=torch.empty_like(x))


def split_group_norm(x: torch.Tensor, groups: int, weight, bias, eps: float) -> torch.Tensor:
    """``F.group_norm`` of x (N, C, ...) from :func:`split_var_mean` statistics and
    :func:`affine_normalize`; the result has x's dtype and memory format."""
    n, c = x.shape[:2]
    var, mean = split_var_mean(x.reshape(n * groups, -1))
    per_group = (n, groups, 1)
    var, mean = (t.view(per_group).expand(n, groups, c // groups).reshape(n, c) for t in (var, mean))
    return affine_normalize(x, var, mean, weight, bias, eps, (n, c) + (1,) * (x.dim() - 2))


class SplitGroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters, same state dict) whose few long rows are split on CUDA
    (:func:`split_group_norm`); elsewhere torch's kernel, as before."""

    @classmethod
    def like(cls, norm: nn.GroupNorm) -> "SplitGroupNorm":
        like = {"device": norm.weight.device, "dtype": norm.weight.dtype} if norm.affine else {}
        new = cls(norm.num_groups, norm.num_channels, norm.eps, norm.affine, **like)
        new.load_state_dict(norm.state_dict())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0] * self.num_groups
        if (use_split(x) and rows <= SPLIT_GROUP_NORM_MAX_ROWS
                and x.numel() >= rows * SPLIT_GROUP_NORM_MIN_ROW):
            return split_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)
