"""Attention processors for the appearance net (recording) and the generation net
(augmented self-attention, optionally refined by the matcher).

One UNet serves both nets (they share weights). A shared :class:`AttentionState` tells the
attn1 processors what the current UNet call is:

* ``record``: keep each layer's normalized attn1 input (the tokens the generation net will
  attend to) for the conditional rows, then plain attention;
* ``generate``: conditional rows attend to [own ; exemplar] tokens, keys/values of both
  projected with the layer's own to_k/to_v; unconditional rows use plain attention;
  with a matcher, the exemplar logits get the adapter's refinement first;
* ``None``: plain attention everywhere.

Plain attention is torch's scaled_dot_product_attention. With the adapter, only the
exemplar logits (b, H, Nq, Ne) are materialized (they are the matcher's input), for as many
samples at a time as a byte budget allows, and never copied; the joint softmax over
[self ; exemplar] runs in query chunks, so the self logits exist one chunk at a time and
nothing is concatenated.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from amadapter.matcher import Matcher, block_of

# Memory budgets of the joint softmax, in bytes (the element count follows from the dtype).
# Exemplar logits held at once: whole samples (the matcher's GroupNorm and max are per sample),
# one at least. SD1.5 at 512x512, 8 heads, 64x64 layer: 512 MB per sample in fp32, 256 MB in bf16.
LOGITS_BUDGET_BYTES = 512 << 20
CHUNK_BYTES = 128 << 20  # self logits + exemplar logits of one query chunk
# On CUDA the budgets only bound memory: one sample at a time would also hand the matcher one
# sample per call (its kernels launched per sample), and small query chunks multiply launches.
# SD1.5 fp16, batch 8: 8 x 256 MB of exemplar logits at once, about 4 query chunks per layer.
CUDA_LOGITS_BUDGET_BYTES = 2 << 30
CUDA_CHUNK_BYTES = 512 << 20
UNCOND_SUFFIX = "#uncond"  # recorded-token key of a layer's unconditional rows (release_compat)


class AttentionState:
    """What the attn1 processors of one UNet do during the current call."""

    def __init__(self):
        self.phase: str | None = None
        self.latent_hw: tuple[int, int] | None = None
        self.cond_start = 0  # rows [cond_start:] are conditional; rows before use plain attention
        self.keep_grad = False
        self.keep_uncond = False
        self.own_records = False  # copy recorded tokens (a compiled UNet's CUDA graphs reuse their buffers)
        self.recorded: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, torch.Tensor] | None = None
        self.exemplar_hw: tuple[int, int] | None = None
        self.matcher: Matcher | None = None
        self.cost_fn: Callable | None = None

    @contextlib.contextmanager
    def recording(self, latent_hw, cond_start: int = 0, keep_grad: bool = False, keep_uncond: bool = False):
        """Yields the dict that fills with {layer name: (B_cond, N, C) tokens}; with
        ``keep_uncond`` (imported release weights) also {layer name + UNCOND_SUFFIX: the
        unconditional rows' tokens}, which the release's max reads."""
        self.phase, self.latent_hw, self.cond_start, self.keep_grad = "record", tuple(latent_hw), cond_start, keep_grad
        self.keep_uncond = keep_uncond
        self.recorded = {}
        try:
            yield self.recorded
        finally:
            self.phase, self.recorded, self.keep_uncond = None, {}, False

    @contextlib.contextmanager
    def generating(self, tokens, latent_hw, exemplar_hw, cond_start: int = 0, matcher=None, cost_fn=None):
        """Conditional rows read ``tokens`` {layer name: (1 or B_cond, Ne, C)}; with ``matcher``
        and ``cost_fn(q_grid, e_grid) -> (B_cond or 1, Nq, Ne)`` the adapter is on."""
        self.phase, self.tokens, self.cond_start = "generate", tokens, cond_start
        self.latent_hw, self.exemplar_hw = tuple(latent_hw), tuple(exemplar_hw)
        self.matcher, self.cost_fn = matcher, cost_fn
        try:
            yield
        finally:
            self.phase, self.tokens, self.matcher, self.cost_fn = None, None, None, None


def token_grid(n_tokens: int, latent_hw) -> tuple[int, int]:
    """The (h, w) grid of a layer with ``n_tokens`` tokens in a UNet fed ``latent_hw``."""
    h, w = latent_hw
    while h * w > n_tokens:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != n_tokens:
        raise ValueError(f"cannot place {n_tokens} tokens on a grid derived from latent size {tuple(latent_hw)}")
    return h, w


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def joint_attention(q, k_self, v_self, k_ex, v_ex, scale: float, refine=None) -> torch.Tensor:
    """softmax([q k_self^T ; refine(q k_ex^T)] * scale) @ [v_self ; v_ex], without concatenating.

    q, k_self, v_self: (B, H, N, d); k_ex, v_ex: (1 or B, H, Ne, d) (broadcast, never copied).
    The exemplar logits exist for as many whole samples as fit ``LOGITS_BUDGET_BYTES`` (on CUDA
    ``CUDA_LOGITS_BUDGET_BYTES``, and ``CUDA_CHUNK_BYTES`` below);
    ``refine(logits, rows)`` edits those of the samples ``rows`` (a slice of the batch) in place.
    The softmax then runs in query chunks of ``CHUNK_BYTES``, on the exemplar logits in place.
    """
    B, H, N, _ = q.shape
    Ne = k_ex.shape[-2]
    per_sample = H * N * Ne * q.element_size()
    budget = CUDA_LOGITS_BUDGET_BYTES if q.is_cuda else LOGITS_BUDGET_BYTES
    step = max(1, budget // max(1, per_sample))
    outs = []
    for a in range(0, B, step):
        rows = slice(a, min(B, a + step))
        ke, ve = (k_ex, v_ex) if k_ex.shape[0] == 1 else (k_ex[rows], v_ex[rows])
        outs.append(_joint_rows(q[rows], k_self[rows], v_self[rows], ke, ve, scale, refine, rows))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


# torch's fused attention kernels that also return the log-sum-exp of each query row: the CPU's,
# and CUDA's flash attention (half and bfloat16)
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CUDA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention", None)
_FLASH_CUDA_DTYPES = (torch.float16, torch.bfloat16)
_fused_refused: set = set()  # (device type, dtype, head dim) whose kernel raised once: general path


def _fused_self(q, k, v, scale):
    """(normalized output, log-sum-exp (B, H, N) in float32) of plain attention from a fused
    kernel, or None where none applies. A kernel that refuses its inputs (an unsupported head
    dim or GPU) raises at launch; that case then takes the general path for good."""
    cpu = q.device.type == "cpu" and _FLASH_CPU is not None
    cuda = q.is_cuda and q.dtype in _FLASH_CUDA_DTYPES and _FLASH_CUDA is not None
    case = (q.device.type, q.dtype, q.shape[-1])
    if not (cpu or cuda) or case in _fused_refused:
        return None
    try:
        if cpu:
            out = _FLASH_CPU(q, k, v, 0.0, False, scale=scale)
        else:
            out = _FLASH_CUDA(q, k, v, 0.0, False, False, scale=scale)
    except torch.OutOfMemoryError:
        raise  # the machine's failure (stages/failures.py splits the batch), not the kernel's refusal
    except RuntimeError:
        _fused_refused.add(case)
        return None
    return out[0], out[1]


def _joint_rows(q, k_self, v_self, k_ex, v_ex, scale, refine, rows) -> torch.Tensor:
    qs = q * scale
    logits_ex = qs @ k_ex.transpose(-1, -2)
    if refine is not None:
        refine(logits_ex, rows)
    B, H, N, _ = q.shape
    inplace = not torch.is_grad_enabled()
    # Inference: the self part runs in a fused kernel (CPU; CUDA in half precision), which gives
    # its normalized output o_s and log-sum-exp l_s; a query's self probabilities then weigh in
    # as the single term exp(l_s - m) * o_s, and the self logits never exist. (Its l_s has no
    # gradient: training takes the general path.)
    fused = _fused_self(q, k_self, v_self, scale) if inplace else None
    if fused is not None:
        o_self, lse_self = fused
        # l_s stays float32: one rounded l_s would scale a row's whole self part (bf16 near 16: 6%)
        lse_self = lse_self.unsqueeze(-1).float()
        width = k_ex.shape[-2]
    else:
        width = N + k_ex.shape[-2]
    chunk = max(1, (CUDA_CHUNK_BYTES if q.is_cuda else CHUNK_BYTES) // max(1, B * H * width * q.element_size()))
    outs = []
    for a in range(0, N, chunk):
        le = logits_ex[:, :, a : a + chunk]
        if fused is not None:
            ls = lse_self[:, :, a : a + chunk]
            m = torch.maximum(le.amax(-1, keepdim=True), ls)
            pe = le.sub_(m).exp_()
            ws = ls.sub(m).exp_()  # the self part's share before normalization
            den = pe.sum(-1, keepdim=True, dtype=ws.dtype).add_(ws)
            out = torch.addcmul(pe @ v_ex, o_self[:, :, a : a + chunk].to(pe.dtype), ws).div_(den)
            outs.append(out.to(q.dtype))
            continue
        ls = qs[:, :, a : a + chunk] @ k_self.transpose(-1, -2)
        with torch.no_grad():
            m = torch.maximum(ls.amax(-1, keepdim=True), le.amax(-1, keepdim=True))
        ps = ls.sub_(m).exp_()
        pe = le.sub_(m).exp_() if inplace else (le - m).exp()
        den = ps.sum(-1, keepdim=True) + pe.sum(-1, keepdim=True)
        outs.append((ps @ v_self + pe @ v_ex) / den)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class AMAttnProcessor:
    """attn1 processor of every transformer block: records, augments or runs plain SDPA."""

    def __init__(self, name: str, state: AttentionState):
        self.name = name
        self.block = block_of(name)
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        st = self.state
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if st.phase == "record":
            record = _record_eagerly if torch.compiler.is_compiling() else AMAttnProcessor._record
            record(self, hidden_states)

        B, N, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        q = _heads(attn.to_q(hidden_states), attn.heads)
        k = _heads(attn.to_k(context), attn.heads)
        v = _heads(attn.to_v(context), attn.heads)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)

        if st.phase == "generate" and st.tokens is not None and self.name in st.tokens:
            if attention_mask is not None:
                raise ValueError(f"{self.name}: augmented self-attention does not take an attention mask")
            out = (_augmented_eagerly if torch.compiler.is_compiling() else AMAttnProcessor._augmented)(
                self, attn, q, k, v)
        else:
            mask = None
            if attention_mask is not None:
                mask = attn.prepare_attention_mask(attention_mask, context.shape[1], B)
                mask = mask.view(B, attn.heads, -1, mask.shape[-1])
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)

        out = out.transpose(1, 2).reshape(B, N, -1).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _record(self, hidden_states):
        st = self.state
        rec = hidden_states[st.cond_start :]
        rec = rec if st.keep_grad else rec.detach()
        st.recorded[self.name] = rec.clone() if st.own_records else rec
        if st.keep_uncond and st.cond_start > 0:
            uncond = hidden_states[: st.cond_start].detach()
            st.recorded[self.name + UNCOND_SUFFIX] = uncond.clone() if st.own_records else uncond

    def _exemplar_keys(self, attn, tokens, dtype, release: bool):
        if release:  # the release hands its bank over in fp16 (mutual_self_attention_sa_aug.py:337,385)
            tokens = tokens.to(torch.float16)
        tokens = tokens.to(dtype=dtype)
        k_ex = _heads(attn.to_k(tokens), attn.heads)
        if attn.norm_k is not None:
            k_ex = attn.norm_k(k_ex)
        return k_ex, tokens

    def _uncond_logits(self, attn, q_u, dtype):
        """Exemplar logits of the unconditional rows against the exemplar's unconditional tokens
        (the release's CFG batch, whose max includes them). A bank recorded without CFG has
        none: its appearance pass skipped the unconditional half because both halves were the
        same (identical text embeddings), so the conditional tokens are also the unconditional."""
        tokens = self.state.tokens
        k_u, _ = self._exemplar_keys(attn, tokens.get(self.name + UNCOND_SUFFIX, tokens[self.name]), dtype, True)
        return (q_u * attn.scale) @ k_u.transpose(-1, -2)

    def _augmented(self, attn, q, k, v):
        st = self.state
        c = st.cond_start
        release = st.matcher is not None and st.matcher.config.release_compat
        # once per layer per step, for the whole batch
        k_ex, tokens = self._exemplar_keys(attn, st.tokens[self.name], q.dtype, release)
        v_ex = _heads(attn.to_v(tokens), attn.heads)
        qc, kc, vc = q[c:], k[c:], v[c:]
        if st.matcher is None:
            n = qc.shape[0]
            keys = torch.cat([kc, k_ex.expand(n, -1, -1, -1)], dim=2)
            values = torch.cat([vc, v_ex.expand(n, -1, -1, -1)], dim=2)
            out_c = F.scaled_dot_product_attention(qc, keys, values, scale=attn.scale)
        else:
            q_hw = token_grid(q.shape[2], st.latent_hw)
            e_hw = token_grid(k_ex.shape[2], st.exemplar_hw)

            uncond = self._uncond_logits(attn, q[:c], q.dtype) if release and c > 0 else None
            if uncond is not None and uncond.shape[0] != qc.shape[0]:
                raise ValueError(f"{self.name}: release_compat pairs each conditional row with one unconditional row; "
                                 f"got {c} unconditional and {qc.shape[0]} conditional rows")

            def refine(logits, rows):
                def cost_fn(q_grid, e_grid):  # the cost rows of these samples (or the one shared row)
                    cost = st.cost_fn(q_grid, e_grid)
                    return cost if cost.shape[0] == 1 else cost[rows]

                st.matcher.refine_(logits, cost_fn, q_hw, e_hw, self.block,
                                   uncond_logits=None if uncond is None else uncond[rows])

            out_c = joint_attention(qc, kc, vc, k_ex, v_ex, attn.scale, refine)
        if c == 0:
            return out_c
        out_u = F.scaled_dot_product_attention(q[:c], k[:c], v[:c], scale=attn.scale)
        return torch.cat([out_u, out_c], dim=0)


# Under torch.compile these parts run eagerly (a graph break each): a recorded token must be a
# tensor of its own, not a CUDA graph output that the next replay overwrites, and the matcher's
# cost look-ups are Python. Uncompiled calls go to the methods directly.
_record_eagerly = torch.compiler.disable(AMAttnProcessor._record)
_augmented_eagerly = torch.compiler.disable(AMAttnProcessor._augmented)


def install_processors(unet, state: AttentionState) -> list[str]:
    """AMAttnProcessor on every self-attention (attn1), AttnProcessor2_0 elsewhere.
    Returns the names of the attn1 layers (the keys of recorded token dicts)."""
    procs, names = {}, []
    for name in unet.attn_processors:
        layer = name[: -len(".processor")]
        if layer.endswith("attn1"):
            procs[name] = AMAttnProcessor(layer, state)
            names.append(layer)
        else:
            procs[name] = AttnProcessor2_0()
    unet.set_attn_processor(procs)
    return names
