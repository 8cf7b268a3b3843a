"""The two records that flow through the DAG (design.md): a layout and a sample.

Stages pass plain dict rows (what Ray Data carries); these helpers give them one shape.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Layout:
    layout_id: str
    source: str
    label: np.ndarray                     # HxW uint8 Cityscapes ids
    instance: np.ndarray | None = None    # HxW int32, id*1000+k for things
    image: np.ndarray | None = None       # HxWx3 uint8, exemplars only
    split: str = "train"
    meta: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        return {
            "layout_id": self.layout_id,
            "source": self.source,
            "label": self.label,
            "instance": self.instance,
            "image": self.image,
            "split": self.split,
            "meta": json.dumps(self.meta, sort_keys=True),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Layout":
        meta = row.get("meta") or {}
        if isinstance(meta, (str, bytes)):
            meta = json.loads(meta)
        return cls(
            layout_id=str(row["layout_id"]),
            source=str(row["source"]),
            label=np.asarray(row["label"], dtype=np.uint8),
            instance=None if row.get("instance") is None else np.asarray(row["instance"], dtype=np.int32),
            image=None if row.get("image") is None else np.asarray(row["image"], dtype=np.uint8),
            split=str(row.get("split", "train")),
            meta=dict(meta),
        )


def sample_id(target_id: str, exemplar_id: str, augment: dict | str, seed: int) -> str:
    """Stable key of one synthesized pair: resume, dedup and determinism hang on it."""
    aug = augment if isinstance(augment, str) else json.dumps(augment, sort_keys=True)
    payload = json.dumps([target_id, exemplar_id, aug, int(seed)])
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def stable_seed(*parts: Any, base: int = 0) -> int:
    """A 31-bit seed derived from ``parts``; the same inputs always give the same seed."""
    h = hashlib.sha256(json.dumps([base, *map(str, parts)]).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF
