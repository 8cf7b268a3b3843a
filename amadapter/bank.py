"""The exemplar bank: everything the appearance side computes, which depends on the
exemplar alone; computed once, it serves every target of that exemplar."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class ExemplarBank:
    """Per denoising step, the appearance net's recorded attn1 tokens, plus the exemplar's
    labels (for the matching cost) and the sampling settings it was made with."""

    timesteps: tuple[int, ...]
    tokens: list[dict[str, torch.Tensor]]  # tokens[step][layer] -> (1, Ne, C)
    label: np.ndarray  # (H, W) uint8 ids
    instance: np.ndarray | None
    latent_hw: tuple[int, int]
    guidance_scale: float
    key: object = None
    meta: dict = field(default_factory=dict)

    @property
    def num_inference_steps(self) -> int:
        return len(self.timesteps)

    @property
    def image_hw(self) -> tuple[int, int]:
        return tuple(self.label.shape)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for step in self.tokens for t in step.values())


class BankCache:
    """A bounded LRU of exemplar banks keyed by (exemplar key, sampling settings)."""

    def __init__(self, max_items: int = 8):
        self.max_items = max_items
        self._items: OrderedDict = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key):
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        return None

    def put(self, key, bank: ExemplarBank) -> None:
        if self.max_items <= 0:
            return
        self._items[key] = bank
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
