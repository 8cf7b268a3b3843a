"""Fixed text conditioning, stored as tensors so that run time needs no text encoder."""
from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class TextEmbeds(ModelMixin, ConfigMixin):
    """Conditional / unconditional encoder hidden states, each (1, seq_len, cross_attention_dim).

    ``kind="learned_null"`` (toy): one learned embedding serves both CFG halves.
    ``kind="prompt"`` (sd15): the release's fixed prompt and the empty prompt, encoded once
    by CLIP at import time (:meth:`from_text_encoder`) and kept as buffers.
    """

    @register_to_config
    def __init__(
        self,
        kind: str = "learned_null",
        seq_len: int = 4,
        cross_attention_dim: int = 64,
        prompt: str | None = None,
        negative_prompt: str | None = None,
    ):
        super().__init__()
        if kind == "learned_null":
            self.null = nn.Parameter(torch.randn(1, seq_len, cross_attention_dim) * 0.02)
        elif kind == "prompt":
            self.register_buffer("cond", torch.zeros(1, seq_len, cross_attention_dim))
            self.register_buffer("uncond", torch.zeros(1, seq_len, cross_attention_dim))
        else:
            raise ValueError(f"unknown text embedding kind {kind!r}; choose 'learned_null' or 'prompt'")

    @property
    def identical_halves(self) -> bool:
        """True when CFG's two halves get the same embedding (then CFG only matters through
        the exemplar tokens, and passes without them can skip the unconditional half)."""
        return self.config.kind == "learned_null"

    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(uncond, cond), each (1, L, D)."""
        if self.config.kind == "learned_null":
            return self.null, self.null
        return self.uncond, self.cond

    @classmethod
    @torch.no_grad()
    def from_text_encoder(cls, text_encoder, tokenizer, prompt: str, negative_prompt: str = "") -> "TextEmbeds":
        def encode(text: str) -> torch.Tensor:
            ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            return text_encoder(ids.to(text_encoder.device))[0].float().cpu()

        cond, uncond = encode(prompt), encode(negative_prompt)
        module = cls(kind="prompt", seq_len=cond.shape[1], cross_attention_dim=cond.shape[2],
                     prompt=prompt, negative_prompt=negative_prompt)
        module.cond.copy_(cond)
        module.uncond.copy_(uncond)
        return module
