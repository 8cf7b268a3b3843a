"""The adapter's 4D aggregation against direct references."""
import torch
import torch.nn.functional as F
from torch import nn

from amadapter.matcher import CostAggregator, Matcher, Separable4DConv, aggregation_grid, resize_volume


def naive_separable_4d(conv: Separable4DConv, x: torch.Tensor) -> torch.Tensor:
    """Direct 4D reference on x (B, C, hq, wq, he, we): 1x1 over query dims + 3x3 over exemplar dims."""
    wq, bq = conv.query_conv.weight[:, :, 0, 0], conv.query_conv.bias
    we, be = conv.exemplar_conv.weight, conv.exemplar_conv.bias
    B, C, hq, wq_, he, we_ = x.shape
    out = torch.einsum("oc,bcijkl->boijkl", wq, x) + bq.view(1, -1, 1, 1, 1, 1)
    xp = F.pad(x, (1, 1, 1, 1))  # pads the last two (exemplar) dims
    for dk in range(3):
        for dl in range(3):
            out = out + torch.einsum("oc,bcijkl->boijkl", we[:, :, dk, dl], xp[..., dk : dk + he, dl : dl + we_])
    return out + be.view(1, -1, 1, 1, 1, 1)


def to_query_major(x):  # (B, C, hq, wq, he, we) -> (B*Nq, C, he, we)
    B, C, hq, wq, he, we = x.shape
    return x.permute(0, 2, 3, 1, 4, 5).reshape(B * hq * wq, C, he, we)


def from_query_major(y, B, hq, wq):
    _, C, he, we = y.shape
    return y.view(B, hq, wq, C, he, we).permute(0, 3, 1, 2, 4, 5)


def test_separable_conv_equals_naive_4d_reference():
    torch.manual_seed(0)
    conv = Separable4DConv(3, 5)
    x = torch.randn(2, 3, 3, 4, 4, 5, dtype=torch.float64)
    conv = conv.double()
    got = from_query_major(conv(to_query_major(x)), 2, 3, 4)
    torch.testing.assert_close(got, naive_separable_4d(conv, x), rtol=1e-10, atol=1e-10)


def test_aggregator_equals_reference_with_groupnorm_over_the_volume():
    torch.manual_seed(1)
    agg = CostAggregator(3, (4, 6), 2).double()
    for norm in agg.norms:  # non-trivial affine so a wrong broadcast shows
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
    x = torch.randn(2, 3, 2, 3, 4, 4, dtype=torch.float64)
    ref = x
    for conv, norm in zip(agg.convs, agg.norms):
        ref = F.relu(norm(naive_separable_4d(conv, ref)))  # nn.GroupNorm(1, C) on the 6-D volume
    got = from_query_major(agg(to_query_major(x), 2), 2, 2, 3)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_parameter_count_matches_the_method():
    m = Matcher(num_heads=8)
    assert 30_000 < sum(p.numel() for p in m.parameters()) < 50_000  # "about 40k" for H = 8


def test_refine_is_per_sample_and_zero_switch_works():
    torch.manual_seed(2)
    m = Matcher(num_heads=2, max_side=4)
    logits = torch.randn(3, 2, 6 * 8, 4 * 4)  # target grid 6x8 (resized to 3x4), exemplar 4x4
    cost = (torch.rand(3, 48, 16) > 0.5).float()

    def cost_fn(q, e, cost=cost):
        # cost on the aggregation grid: a fixed pattern of the right size
        return cost[:, : q[0] * q[1], : e[0] * e[1]]

    batch = m.refine_(logits.clone(), cost_fn, (6, 8), (4, 4), "up")
    assert not torch.allclose(batch, logits)
    for i in range(3):
        single = m.refine_(logits[i : i + 1].clone(), lambda q, e, i=i: cost_fn(q, e)[i : i + 1], (6, 8), (4, 4), "up")
        torch.testing.assert_close(single, batch[i : i + 1], rtol=1e-5, atol=1e-5)
    with m.disabled():
        torch.testing.assert_close(m.refine_(logits.clone(), cost_fn, (6, 8), (4, 4), "up"), logits)
    assert m.zero_output is False


def test_aggregation_grid_and_resize():
    assert aggregation_grid((16, 32), 32) == (16, 32)
    assert aggregation_grid((64, 64), 32) == (32, 32)
    assert aggregation_grid((64, 128), 32) == (16, 32)
    x = torch.arange(4 * 6, dtype=torch.float32).view(1, 1, 4, 6)  # constant along exemplar rows
    y = resize_volume(x.expand(1, 1, 4, 6).contiguous(), (2, 2), (2, 3), (4, 4), (2, 3))
    assert y.shape == (1, 1, 16, 6)
    # resizing a volume that is constant in the query dims keeps it constant there
    z = resize_volume(torch.ones(1, 1, 4, 6), (2, 2), (2, 3), (4, 4), (4, 6))
    torch.testing.assert_close(z, torch.ones(1, 1, 16, 24))


def test_transposed_cost_needs_equal_grids():
    m = Matcher(num_heads=2, cost_transposed=True)
    logits = torch.randn(1, 2, 4, 6)
    try:
        m.refine_(logits, lambda q, e: torch.ones(1, 4, 6), (2, 2), (2, 3), "down")
    except ValueError as e:
        assert "equal target and exemplar grids" in str(e)
    else:
        raise AssertionError("transposed cost accepted unequal grids")
    sq = torch.randn(1, 2, 4, 4)
    c = torch.zeros(1, 4, 4)
    c[0, 0, 3] = 1  # asymmetric: transposing changes the result
    a = Matcher(num_heads=2, cost_transposed=True)
    b = Matcher(num_heads=2, cost_transposed=False)
    b.load_state_dict(a.state_dict())
    ra = a.refine_(sq.clone(), lambda q, e: c, (2, 2), (2, 2), "mid")
    rb = b.refine_(sq.clone(), lambda q, e: c.transpose(-1, -2), (2, 2), (2, 2), "mid")
    torch.testing.assert_close(ra, rb)


def test_near_zero_start_is_a_uniform_shift_that_still_learns():
    torch.manual_seed(3)
    m = Matcher(num_heads=2, max_side=4).start_near_zero_(bias=0.01)
    logits = torch.randn(2, 2, 16, 16, requires_grad=True)
    cost = (torch.rand(2, 16, 16) > 0.5).float()
    out = m.refine_(logits.detach().clone(), lambda q, e: cost, (4, 4), (4, 4), "down")
    # phi is the constant 0.01 everywhere: the residual is 0.01 - 0.01/4 on every logit
    torch.testing.assert_close(out - logits.detach(), torch.full_like(out, 0.0075))
    # gradient reaches the last norm's weight (its bias alone would keep the output constant)
    base = logits.detach().clone().requires_grad_(False)
    res = m.residual(base, cost, (4, 4), "down")
    (res * torch.randn_like(res)).sum().backward()
    assert m.phi_down.norms[-1].weight.grad.abs().sum() > 0
