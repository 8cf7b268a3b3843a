"""joint_attention in several query chunks (and sample chunks) equals one chunk and a plain
float64 softmax.

The query chunk comes from amadapter.attention.CHUNK_BYTES (logit bytes per chunk), the sample
chunk from LOGITS_BUDGET_BYTES (exemplar logit bytes held at once); the tests shrink them so
that a few dozen queries span several chunks, the last one shorter, and samples go one by one.
"""
import pytest
import torch
from torch.overrides import TorchFunctionMode

from amadapter import attention
from amadapter.attention import joint_attention

B, H, N, NE, D = 2, 3, 37, 11, 8
SCALE = D ** -0.5
BF16_ATOL = 0.05  # measured: 0.038 with l_s in float32, 0.070 with l_s rounded to bf16


def _inputs(ex_batch: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return r(B, H, N, D), r(B, H, N, D), r(B, H, N, D), r(ex_batch, H, NE, D), r(ex_batch, H, NE, D)


def _refine(logits_ex, samples=slice(None)):
    """An in-place edit of the exemplar logits that depends on the query row and the sample
    (like the matcher); ``samples`` says which samples of the batch ``logits_ex`` holds."""
    rows = torch.arange(logits_ex.shape[-2], dtype=logits_ex.dtype).view(-1, 1)
    cols = torch.arange(logits_ex.shape[-1], dtype=logits_ex.dtype)
    sample = torch.arange(B, dtype=logits_ex.dtype)[samples].view(-1, 1, 1, 1)
    logits_ex.add_(torch.sin(rows * 0.3 + cols + sample))
    return logits_ex


def _reference(q, k_self, v_self, k_ex, v_ex, refine=None):
    """softmax([q k_self^T ; refine(q k_ex^T)] * scale) @ [v_self ; v_ex] in float64, concatenated."""
    q, k_self, v_self, k_ex, v_ex = (t.double() for t in (q, k_self, v_self, k_ex, v_ex))
    k_ex, v_ex = k_ex.expand(B, -1, -1, -1), v_ex.expand(B, -1, -1, -1)
    logits_ex = (q * SCALE) @ k_ex.transpose(-1, -2)
    if refine is not None:
        refine(logits_ex)
    logits = torch.cat([(q * SCALE) @ k_self.transpose(-1, -2), logits_ex], dim=-1)
    return logits.softmax(-1) @ torch.cat([v_self, v_ex], dim=-2)


class _QueryRows(TorchFunctionMode):
    """Records the row counts of every (b, H, rows, D) tensor handed to a torch function: a
    query slice shorter than N shows that the call really ran in chunks; ``samples`` records
    the batch sizes b of the exemplar logits (b, H, N, Ne) that were made."""

    def __init__(self):
        super().__init__()
        self.rows, self.samples = set(), set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for a in args:
            if isinstance(a, torch.Tensor) and a.dim() == 4 and a.shape[1] == H and a.shape[-1] == D:
                self.rows.add(a.shape[-2])
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[1:] == (H, N, NE):
            self.samples.add(out.shape[0])
        return out


def _chunked(monkeypatch, chunk: int, *args, one_sample: bool = False, **kwargs):
    # joint_attention takes chunk = CHUNK_BYTES // (b * H * width * 4) query rows (fp32), for
    # b samples at a time; one_sample: a budget below one sample's exemplar logits (b = 1).
    # width: N + Ne, or Ne alone where torch's fused kernel does the self part (CPU inference).
    b = 1 if one_sample else B
    width = NE if attention._FLASH_CPU is not None and not torch.is_grad_enabled() else N + NE
    monkeypatch.setattr(attention, "CHUNK_BYTES", chunk * b * H * width * 4)
    if one_sample:
        monkeypatch.setattr(attention, "LOGITS_BUDGET_BYTES", H * N * NE * 4 - 1)
    seen = _QueryRows()
    with seen:
        out = joint_attention(*args, **kwargs)
    monkeypatch.undo()
    if one_sample:
        assert seen.samples == {1}                                         # samples really went one by one
    return out, seen.rows


@pytest.mark.parametrize("one_sample", [False, True])
@pytest.mark.parametrize("ex_batch", [1, B])
@pytest.mark.parametrize("refine", [None, _refine])
@pytest.mark.parametrize("chunk", [1, 5, 36])
def test_chunks_equal_one_chunk_and_the_float64_softmax(monkeypatch, ex_batch, refine, chunk, one_sample):
    args = _inputs(ex_batch)
    with torch.no_grad():
        whole = joint_attention(*args, SCALE, refine=refine)            # default: all 37 rows at once
        parts, rows = _chunked(monkeypatch, chunk, *args, SCALE, refine=refine, one_sample=one_sample)
    if not one_sample:
        assert 0 < min(r for r in rows if r != NE) <= chunk < N           # several chunks really ran
    assert parts.shape == whole.shape == (B, H, N, D) and parts.dtype == torch.float32
    # Rows are independent; chunking changes only the matmul blocking. Measured max |diff|:
    # 2.4e-7 against one chunk, 4.2e-7 against float64 (outputs are O(1)).
    torch.testing.assert_close(parts, whole, rtol=0, atol=2e-6)
    ref = _reference(*args, refine=refine)
    torch.testing.assert_close(parts.double(), ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(whole.double(), ref, rtol=0, atol=2e-6)


def test_chunks_keep_gradients(monkeypatch):
    """With grad on, the exemplar logits are not edited in place; chunked gradients match too."""
    base = _inputs(1)

    def grads(chunk):
        leaves = [t.clone().requires_grad_(True) for t in base]
        if chunk is None:
            out = joint_attention(*leaves, SCALE, refine=_refine)
        else:
            out, _ = _chunked(monkeypatch, chunk, *leaves, SCALE, refine=_refine)
        (out * torch.linspace(-1, 1, D)).sum().backward()
        return out.detach(), [t.grad for t in leaves]

    out1, g1 = grads(None)
    out7, g7 = grads(7)
    ref_leaves = [t.double().requires_grad_(True) for t in base]
    (_reference(*ref_leaves, refine=_refine) * torch.linspace(-1, 1, D, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(out7, out1, rtol=0, atol=2e-6)
    for a, b, r in zip(g7, g1, ref_leaves):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        torch.testing.assert_close(a.double(), r.grad, rtol=0, atol=1e-5)


def test_sample_chunks_keep_gradients(monkeypatch):
    """Sample chunks (one exemplar-logit sample at a time) give the gradients of one chunk."""
    base = _inputs(B)

    def grads(one_sample):
        leaves = [t.clone().requires_grad_(True) for t in base]
        if one_sample:
            out, _ = _chunked(monkeypatch, 7, *leaves, SCALE, refine=_refine, one_sample=True)
        else:
            out = joint_attention(*leaves, SCALE, refine=_refine)
        (out * torch.linspace(-1, 1, D)).sum().backward()
        return out.detach(), [t.grad for t in leaves]

    out1, g1 = grads(False)
    out2, g2 = grads(True)
    torch.testing.assert_close(out2, out1, rtol=0, atol=2e-6)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.skipif(attention._FLASH_CPU is None, reason="this torch has no fused CPU attention kernel")
@pytest.mark.parametrize("ex_batch", [1, B])
def test_fused_self_part_equals_the_explicit_self_logits(monkeypatch, ex_batch):
    """CPU inference takes the self part from torch's fused kernel (its output and log-sum-exp);
    with the kernel hidden the self logits are explicit. Both equal the float64 softmax."""
    args = _inputs(ex_batch)
    with torch.no_grad():
        fused = joint_attention(*args, SCALE, refine=_refine)
        monkeypatch.setattr(attention, "_FLASH_CPU", None)
        explicit = joint_attention(*args, SCALE, refine=_refine)
    torch.testing.assert_close(fused, explicit, rtol=0, atol=2e-6)
    torch.testing.assert_close(fused.double(), _reference(*args, refine=_refine), rtol=0, atol=2e-6)


def test_a_fused_kernel_that_refuses_its_inputs_falls_back_for_good(monkeypatch):
    """On CUDA the self part's fused kernel (flash attention) may refuse a head dim or a GPU at
    launch: that case then takes the general path, with the same result, and is not retried."""
    args = _inputs(1)
    fused = joint_attention(*args, SCALE)
    calls = []

    def refusing(*a, **k):
        calls.append(1)
        raise RuntimeError("no kernel for these inputs")

    monkeypatch.setattr(attention, "_FLASH_CPU", refusing)
    monkeypatch.setattr(attention, "_fused_refused", set())
    with torch.no_grad():
        general = [joint_attention(*args, SCALE) for _ in range(2)]
    assert calls == [1] and attention._fused_refused == {("cpu", torch.float32, D)}
    for out in general:
        torch.testing.assert_close(out, fused, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(general[0], _reference(*args).float(), rtol=1e-5, atol=1e-6)


def test_bf16_keeps_the_self_log_sum_exp_in_float32():
    """bfloat16 with large self logits (log-sum-exp near 40, where a bf16 step is 0.25): the
    fused path stays within bf16 rounding of the float64 softmax."""
    q, k, v, ke, ve = _inputs(1, torch.float64)
    inputs = [t.to(torch.bfloat16) for t in (q * 6, k, v, ke, ve)]
    ref = _reference(*(t.double() for t in inputs))  # the same rounded inputs, exact arithmetic
    with torch.no_grad():
        got = joint_attention(*inputs, SCALE)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=BF16_ATOL)


def test_out_of_memory_in_the_fused_kernel_is_not_a_refusal(monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(attention, "_FLASH_CPU", oom)
    monkeypatch.setattr(attention, "_fused_refused", set())
    with torch.no_grad(), pytest.raises(torch.OutOfMemoryError):
        joint_attention(*_inputs(1), SCALE)
    assert not attention._fused_refused
