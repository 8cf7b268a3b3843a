"""joint_attention in several query chunks equals one chunk and a plain float64 softmax.

The chunk size comes from amadapter.attention.CHUNK_ELEMENTS (logits per chunk); the tests
shrink it so that a few dozen queries span several chunks, the last one shorter.
"""
import pytest
import torch
from torch.overrides import TorchFunctionMode

from amadapter import attention
from amadapter.attention import joint_attention

B, H, N, NE, D = 2, 3, 37, 11, 8
SCALE = D ** -0.5


def _inputs(ex_batch: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return r(B, H, N, D), r(B, H, N, D), r(B, H, N, D), r(ex_batch, H, NE, D), r(ex_batch, H, NE, D)


def _refine(logits_ex):
    """An in-place edit of the exemplar logits that depends on the query row (like the matcher)."""
    rows = torch.arange(logits_ex.shape[-2], dtype=logits_ex.dtype).view(-1, 1)
    cols = torch.arange(logits_ex.shape[-1], dtype=logits_ex.dtype)
    logits_ex.add_(torch.sin(rows * 0.3 + cols))
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
    """Records the row counts of every (B, H, rows, D) tensor handed to a torch function: a
    query slice shorter than N shows that the call really ran in chunks."""

    def __init__(self):
        super().__init__()
        self.rows = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        for a in args:
            if isinstance(a, torch.Tensor) and a.dim() == 4 and a.shape[:2] == (B, H) and a.shape[-1] == D:
                self.rows.add(a.shape[-2])
        return func(*args, **(kwargs or {}))


def _chunked(monkeypatch, chunk: int, *args, **kwargs):
    # joint_attention takes chunk = CHUNK_ELEMENTS // (B * H * (N + Ne)) query rows.
    monkeypatch.setattr(attention, "CHUNK_ELEMENTS", chunk * B * H * (N + NE))
    seen = _QueryRows()
    with seen:
        out = joint_attention(*args, **kwargs)
    monkeypatch.undo()
    return out, seen.rows


@pytest.mark.parametrize("ex_batch", [1, B])
@pytest.mark.parametrize("refine", [None, _refine])
@pytest.mark.parametrize("chunk", [1, 5, 36])
def test_chunks_equal_one_chunk_and_the_float64_softmax(monkeypatch, ex_batch, refine, chunk):
    args = _inputs(ex_batch)
    with torch.no_grad():
        whole = joint_attention(*args, SCALE, refine=refine)            # default: all 37 rows at once
        parts, rows = _chunked(monkeypatch, chunk, *args, SCALE, refine=refine)
    assert 0 < min(r for r in rows if r != NE) <= chunk < N               # several chunks really ran
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
