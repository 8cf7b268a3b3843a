"""The split (GPU-style) per-sample reductions, forced on the CPU: the pieces' max and Chan's
combination of the pieces' moments against float64 references, and the whole matcher with the
split path against the plain reference of tests/test_matcher_fast_path.py at its tolerances.
The CPU keeps the plain path unless forced."""
import copy

import pytest
import torch

from amadapter import reductions
from amadapter.matcher import CostAggregator, Matcher, group_norm_relu
from amadapter.reductions import split_amax, split_reductions, split_var_mean, use_split
from amadapter.testing import single_thread, tiny_pipeline, tiny_scene
from test_matcher_fast_path import CASES, _case, _matcher, reference_refine


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


def test_the_device_chooses_and_a_block_can_force_either_path():
    x = torch.zeros(2, 3)
    assert not use_split(x)  # CPU: the plain path
    with split_reductions():
        assert use_split(x)
        with split_reductions(False):
            assert not use_split(x)
        assert use_split(x)
    assert not use_split(x)
    assert use_split(torch.zeros(2, 3, device="meta")) is False  # only CUDA splits by default


@pytest.mark.parametrize("n,chunk", [(4096, 512), (5000, 512), (100, 512), (7, 3), (1, 4)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_split_moments_equal_float64(n, chunk, dtype):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(3, n, generator=g, dtype=torch.float64) * 2 + 5).to(dtype)  # mean >> 0: Chan's term matters
    var, mean = split_var_mean(x, chunk)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=1, correction=0)
    assert var.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 1e-5  # the pieces accumulate in float32 from any input
    torch.testing.assert_close(var.double(), ref_var, rtol=tol, atol=tol)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape,chunk", [((2, 1000, 8), 64), ((2, 1001, 8), 64), ((3, 77), 10), ((1, 5, 3), 100)])
def test_split_max_is_the_max(shape, chunk):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(split_amax(x, chunk), x.amax(1))


def test_split_moments_keep_the_graph():
    x = torch.randn(2, 300, dtype=torch.float64, requires_grad=True)
    var, mean = split_var_mean(x, 64)
    ref_var, ref_mean = torch.var_mean(x, dim=1, correction=0)
    g_split = torch.autograd.grad((var * 3 + mean).sum(), x)[0]
    g_ref = torch.autograd.grad((ref_var * 3 + ref_mean).sum(), x)[0]
    torch.testing.assert_close(g_split, g_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_group_norm_relu_split_equals_plain(monkeypatch, dtype, tol):
    """Both paths against the float64 group norm; bfloat16 within a few of its ulps of O(1) values."""
    monkeypatch.setattr(reductions, "SPLIT_CHUNK", 96)  # many pieces and a tail on a small volume
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(1, 6).double()
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = (torch.randn(2 * 5, 6, 4, 7, dtype=torch.float64) + 1.5).contiguous(memory_format=torch.channels_last)
    ref = torch.relu(torch.nn.functional.group_norm(
        x.view(2, 5, 6, 28).transpose(1, 2), 1, norm.weight, norm.bias, norm.eps)).transpose(1, 2).reshape(x.shape)
    low = copy.deepcopy(norm).to(dtype)
    with torch.no_grad():
        plain = group_norm_relu(x.to(dtype), 2, low)
        with split_reductions():
            split = group_norm_relu(x.to(dtype), 2, low)
    assert split.dtype == dtype and split.is_contiguous(memory_format=torch.channels_last)
    for y in (plain, split):
        torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("B,H,q_hw,e_hw,max_side", CASES)
def test_split_refine_equals_the_plain_reference(monkeypatch, B, H, q_hw, e_hw, max_side):
    """tests/test_matcher_fast_path.py's float64 check, with the reductions split."""
    monkeypatch.setattr(reductions, "SPLIT_CHUNK", 128)
    m = _matcher(H, max_side)
    logits, cost_fn = _case(B, H, q_hw, e_hw)
    with torch.no_grad(), split_reductions():
        got = m.refine_(logits.clone(), cost_fn, q_hw, e_hw, "up")
    torch.testing.assert_close(got, reference_refine(m, logits, cost_fn, q_hw, e_hw, "up"), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("B,H,q_hw,e_hw,max_side", CASES[:1] + CASES[4:5])
def test_split_float32_within_float_tolerance_of_float64(monkeypatch, B, H, q_hw, e_hw, max_side):
    monkeypatch.setattr(reductions, "SPLIT_CHUNK", 128)
    m64 = _matcher(H, max_side)
    m32 = copy.deepcopy(m64).float()
    logits, cost_fn = _case(B, H, q_hw, e_hw)
    with torch.no_grad():
        ref = reference_refine(m64, logits, cost_fn, q_hw, e_hw, "down")
        with split_reductions():
            got = m32.refine_(logits.float(), lambda q, e: cost_fn(q, e).float(), q_hw, e_hw, "down")
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-5)


def test_split_gradients_equal_the_reference(monkeypatch):
    """Stage 2 on a GPU trains phi through the split path: the same parameter gradients."""
    monkeypatch.setattr(reductions, "SPLIT_CHUNK", 128)
    B, H, q_hw, e_hw = 2, 4, (16, 32), (16, 32)
    m = _matcher(H, 16)
    logits, cost_fn = _case(B, H, q_hw, e_hw)

    def grads(fn):
        m.zero_grad()
        fn(logits.clone()).square().sum().backward()
        return [p.grad.clone() for p in m.phi("up").parameters()]

    with split_reductions():
        got = grads(lambda x: m.refine_(x, cost_fn, q_hw, e_hw, "up"))
    ref = grads(lambda x: reference_refine(m, x, cost_fn, q_hw, e_hw, "up"))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_split_residual_and_release_max_equal_plain(monkeypatch):
    """The other two per-sample maxima: Matcher.residual (per head) and release_compat (all heads)."""
    monkeypatch.setattr(reductions, "SPLIT_CHUNK", 32)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 2, 16, 16, generator=g, dtype=torch.float64)
    cost = (torch.rand(1, 16, 16, generator=g) > 0.5).double()
    m = _matcher(2, 8)
    release = Matcher(num_heads=2, release_compat=True).double()
    release.release_cost_side, release.release_resized_side = 4, 8
    with torch.no_grad():
        plain = [m.residual(logits, cost, (4, 4), "down"),
                 release.refine_(logits[1:].clone(), lambda q, e: cost, (4, 4), (4, 4), "up", uncond_logits=logits[:1])]
        with split_reductions():
            split = [m.residual(logits, cost, (4, 4), "down"),
                     release.refine_(logits[1:].clone(), lambda q, e: cost, (4, 4), (4, 4), "up",
                                     uncond_logits=logits[:1])]
    for a, b in zip(split, plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_cuda_budget_groups_samples_unless_set():
    m = Matcher(num_heads=2)
    assert m._volume_budget(torch.zeros(1)) == 8 << 20  # CPU: a few toy samples, in cache
    m.volume_budget_bytes = 1
    assert m._volume_budget(torch.zeros(1)) == 1


def test_pipeline_with_split_reductions_matches_the_cpu_path():
    """A whole am_adapter sampling run of the tiny model: forced split = plain path (fp32)."""
    pipe = tiny_pipeline()
    image, label, _ = tiny_scene(0)
    _, target, _ = tiny_scene(1)
    kwargs = dict(seeds=[3, 4], num_inference_steps=2, guidance_scale=3.0, mode="am_adapter")
    plain = pipe([target, target], image, label, **kwargs).latents
    with split_reductions():
        split = pipe([target, target], image, label, **kwargs).latents
    torch.testing.assert_close(split, plain, rtol=1e-4, atol=1e-4)
    assert isinstance(pipe.matcher.phi("up"), CostAggregator)


@pytest.mark.parametrize("channels_last", [False, True])
def test_split_group_norm_equals_torch(monkeypatch, channels_last):
    """SplitGroupNorm forced to split (its row thresholds lowered): nn.GroupNorm's output and
    gradients in float64, the input's memory format kept; unforced, torch's kernel itself."""
    monkeypatch.setattr(reductions, "SPLIT_CHUNK", 100)
    monkeypatch.setattr(reductions, "SPLIT_GROUP_NORM_MIN_ROW", 1)
    torch.manual_seed(0)
    ref = torch.nn.GroupNorm(2, 6, eps=1e-6).double()
    torch.nn.init.normal_(ref.weight)
    torch.nn.init.normal_(ref.bias)
    norm = reductions.SplitGroupNorm.like(ref)
    x = torch.randn(3, 6, 10, 13, dtype=torch.float64) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), ref(x), rtol=0, atol=0)  # the CPU's own kernel
        with split_reductions():
            got = norm(x)
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(got, ref(x), rtol=1e-10, atol=1e-10)
    xg = x.clone().requires_grad_(True)
    with split_reductions():
        g_split = torch.autograd.grad(norm(xg).square().sum(), [xg, norm.weight])
    g_ref = torch.autograd.grad(ref(xg).square().sum(), [xg, ref.weight])
    for a, b in zip(g_split, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_structure_net_norms_split_and_keep_their_state_dict(monkeypatch):
    from amadapter.structure_net import StructureNet

    monkeypatch.setattr(reductions, "SPLIT_GROUP_NORM_MIN_ROW", 1)
    pipe = tiny_pipeline()
    net = pipe.structure_net.double()
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(isinstance(m, reductions.SplitGroupNorm) for m in norms)
    plain = StructureNet(**net.config)
    assert plain.state_dict().keys() == net.state_dict().keys()
    cond = torch.rand(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = net(cond, 500)
        with split_reductions():
            after = net(cond, 500)
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)
