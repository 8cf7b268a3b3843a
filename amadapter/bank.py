"""The exemplar bank: everything the appearance side computes, which depends on the
exemplar alone; computed once, it serves every target of that exemplar."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from cachetools import LRUCache

if TYPE_CHECKING:  # the stage imports this module for its defaults; torch comes with the pipeline
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


DEFAULT_BANK_CACHE_BYTES = 2 << 30  # 2 GiB: an SD1.5 bank at 512x1024 is a few hundred MB


class BankCache:
    """A least-recently-used store of exemplar banks keyed by (exemplar key, sampling settings),
    bounded by the banks' tensor bytes (``max_bytes``) and, optionally, by their number
    (``max_items``, the older setting; None = no count bound). A bank larger than the whole
    byte budget is not kept."""

    def __init__(self, max_items: int | None = None, max_bytes: int = DEFAULT_BANK_CACHE_BYTES):
        if max_bytes < 0 or (max_items is not None and max_items < 0):
            raise ValueError(f"bank cache bounds must be >= 0, got max_items={max_items} max_bytes={max_bytes}")
        self.max_items = max_items
        self.max_bytes = int(max_bytes)
        # maxsize 0 makes cachetools refuse every item, which is what a zero budget means
        self._items = LRUCache(maxsize=self.max_bytes, getsizeof=ExemplarBank.nbytes)
        self.hits = 0
        self.misses = 0

    def get(self, key):
        bank = self._items.get(key)  # a hit refreshes the key's recency
        if bank is None:
            self.misses += 1
        else:
            self.hits += 1
        return bank

    def put(self, key, bank: ExemplarBank) -> None:
        if self.max_items == 0 or bank.nbytes() > self.max_bytes:
            return
        self._items[key] = bank  # evicts least recently used banks until the bytes fit
        while self.max_items is not None and len(self._items) > self.max_items:
            self._items.popitem()

    @property
    def nbytes(self) -> int:
        """Tensor bytes of the banks held now."""
        return int(self._items.currsize)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
