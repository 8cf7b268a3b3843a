"""Matcher.refine_ (channels-last volumes, strided halving/doubling, sample and row blocks)
against a straightforward reference: F.interpolate on the whole (query x exemplar) volume,
nn.Conv2d pairs on the query-major layout, nn.GroupNorm, the max, and the resize back.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amadapter import matcher as matcher_module
from amadapter.matcher import Matcher, aggregation_grid, resize_axis


def reference_refine(m: Matcher, logits, cost_fn, q_hw, e_hw, block):
    """The method written out plainly (method.md, "The adapter"), in the logits' dtype."""
    B, H, Nq, Ne = logits.shape
    q_agg, e_agg = aggregation_grid(q_hw, m.config.max_side), aggregation_grid(e_hw, m.config.max_side)
    x = logits.detach()
    # bilinear resize of the volume: exemplar dims, then query dims
    y = x.reshape(B * H * Nq, 1, *e_hw)
    if e_agg != tuple(e_hw):
        y = F.interpolate(y, size=e_agg, mode="bilinear", align_corners=False)
    ne, nq = e_agg[0] * e_agg[1], q_agg[0] * q_agg[1]
    y = y.reshape(B * H, Nq, ne).transpose(1, 2).reshape(B * H, ne, *q_hw)
    if q_agg != tuple(q_hw):
        y = F.interpolate(y, size=q_agg, mode="bilinear", align_corners=False)
    y = y.reshape(B, H, ne, nq).transpose(2, 3)                       # (B, H, Nq', Ne')
    cost = cost_fn(q_agg, e_agg).to(x.dtype).expand(B, nq, ne)
    r = torch.cat([y, cost[:, None]], dim=1)                          # (B, H+1, Nq', Ne')
    v = r.permute(0, 2, 1, 3).reshape(B * nq, H + 1, *e_agg)          # query-major
    phi = m.phi(block)
    for conv, norm in zip(phi.convs, phi.norms):
        v = conv.query_conv(v) + conv.exemplar_conv(v)                # 1x1 over query dims is per row
        c = v.shape[1]
        vol = v.reshape(B, nq, c, ne).permute(0, 2, 1, 3)             # (B, C, Nq', Ne'): one sample's volume
        vol = F.relu(nn.functional.group_norm(vol, 1, norm.weight, norm.bias, norm.eps))
        v = vol.permute(0, 2, 1, 3).reshape(B * nq, c, *e_agg)
    out = v.reshape(B, nq, H, ne).permute(0, 2, 1, 3)                 # (B, H, Nq', Ne')
    res = out - out.amax(dim=(2, 3), keepdim=True) / 4
    z = res.reshape(B * H * nq, 1, *e_agg)
    if e_agg != tuple(e_hw):
        z = F.interpolate(z, size=tuple(e_hw), mode="bilinear", align_corners=False)
    z = z.reshape(B * H, nq, Ne).transpose(1, 2).reshape(B * H, Ne, *q_agg)
    if q_agg != tuple(q_hw):
        z = F.interpolate(z, size=tuple(q_hw), mode="bilinear", align_corners=False)
    return logits + z.reshape(B, H, Ne, Nq).transpose(2, 3)


def _matcher(heads, max_side, seed=0):
    torch.manual_seed(seed)
    m = Matcher(num_heads=heads, max_side=max_side).double()
    for p in m.parameters():  # non-trivial affine and biases so a wrong broadcast shows
        nn.init.normal_(p, std=0.3)
    return m


def _case(B, H, q_hw, e_hw, seed=1, cost_rows=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(B, H, q_hw[0] * q_hw[1], e_hw[0] * e_hw[1], generator=g, dtype=dtype)
    costs = {}

    def cost_fn(q, e):
        if (q, e) not in costs:
            rows = B if cost_rows is None else cost_rows
            costs[(q, e)] = (torch.rand(rows, q[0] * q[1], e[0] * e[1], generator=g) > 0.6).to(dtype)
        return costs[(q, e)]

    return logits, cost_fn


CASES = [
    # (B, H, target grid, exemplar grid, max_side): what each exercises
    (2, 4, (16, 32), (16, 32), 16),   # toy's large layers: both grids halved (strided path)
    (3, 4, (8, 16), (8, 16), 16),     # toy's other layers: no resize
    (2, 2, (8, 8), (12, 16), 8),      # different grids: exemplar shrunk by 3/4 (interpolate path)
    (2, 2, (7, 9), (5, 6), 4),        # odd sizes: non-integer factors everywhere
    (1, 8, (16, 16), (8, 8), 8),      # SD1.5's shape in small: 8 heads, target halved only
    (2, 2, (6, 8), (4, 4), 4),        # target halved, exemplar kept
]


@pytest.mark.parametrize("B,H,q_hw,e_hw,max_side", CASES)
@pytest.mark.parametrize("shared_cost", [False, True])
def test_refine_equals_the_plain_reference(B, H, q_hw, e_hw, max_side, shared_cost):
    m = _matcher(H, max_side)
    logits, cost_fn = _case(B, H, q_hw, e_hw, cost_rows=1 if shared_cost else None)
    with torch.no_grad():
        ref = reference_refine(m, logits, cost_fn, q_hw, e_hw, "up")
        got = m.refine_(logits.clone(), cost_fn, q_hw, e_hw, "up")
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("B,H,q_hw,e_hw,max_side", CASES[:1] + CASES[4:5])
def test_float32_within_float_tolerance_of_float64(B, H, q_hw, e_hw, max_side):
    m64 = _matcher(H, max_side)
    m32 = copy.deepcopy(m64).float()
    logits, cost_fn = _case(B, H, q_hw, e_hw)
    with torch.no_grad():
        ref = reference_refine(m64, logits, cost_fn, q_hw, e_hw, "down")
        got = m32.refine_(logits.float(), lambda q, e: cost_fn(q, e).float(), q_hw, e_hw, "down")
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-5)


def test_sample_and_row_blocks_change_nothing(monkeypatch):
    """A volume budget below one sample (one sample per chunk) and a residual budget of one
    target row pair per block (context rows on both sides) give the unblocked result."""
    B, H, q_hw, e_hw = 3, 4, (16, 32), (16, 32)
    m = _matcher(H, 16)
    logits, cost_fn = _case(B, H, q_hw, e_hw)
    with torch.no_grad():
        whole = m.refine_(logits.clone(), cost_fn, q_hw, e_hw, "mid")
        calls = []
        original = matcher_module.add_upsampled_

        def spy(logits, res, *args, **kwargs):
            calls.append(res.shape[0])
            return original(logits, res, *args, **kwargs)

        monkeypatch.setattr(matcher_module, "add_upsampled_", spy)
        monkeypatch.setattr(matcher_module, "RESIDUAL_BUDGET_BYTES", 1)
        m.volume_budget_bytes = 1
        blocked = m.refine_(logits.clone(), cost_fn, q_hw, e_hw, "mid")
    assert calls == [1, 1, 1]  # one sample per chunk
    torch.testing.assert_close(blocked, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whole, reference_refine(m, logits, cost_fn, q_hw, e_hw, "mid"), rtol=1e-10, atol=1e-10)


def test_gradients_equal_the_reference():
    """Stage 2 trains phi through refine_: its parameter gradients match the reference's."""
    B, H, q_hw, e_hw = 2, 4, (16, 32), (16, 32)
    m = _matcher(H, 16)
    logits, cost_fn = _case(B, H, q_hw, e_hw)
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5), dtype=logits.dtype)

    def grads(fn):
        m.zero_grad()
        x = logits.clone().requires_grad_(True)
        (fn(x) * weight).sum().backward()
        return [p.grad.clone() for p in m.phi("up").parameters()], x.grad

    got, got_x = grads(lambda x: m.refine_(x * 1.0, cost_fn, q_hw, e_hw, "up"))
    ref, ref_x = grads(lambda x: reference_refine(m, x, cost_fn, q_hw, e_hw, "up"))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got_x, ref_x)  # stop-gradient: the logits pass straight through


@pytest.mark.parametrize("n,size", [(8, 4), (4, 8), (7, 3), (3, 7), (1, 2), (2, 1), (5, 5)])
def test_resize_axis_equals_interpolate(n, size):
    x = torch.randn(3, n, 5, dtype=torch.float64)
    ref = F.interpolate(x.transpose(1, 2), size=size, mode="linear", align_corners=False).transpose(1, 2)
    torch.testing.assert_close(resize_axis(x, 1, size), ref, rtol=1e-12, atol=1e-12)
