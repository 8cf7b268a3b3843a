"""The one source registry: a source kind and a root -> its connector. `amgen run` (through the read
stage) and `amgen index build` both open sources here, so every kind works in both."""
from __future__ import annotations

import importlib
from typing import Any

from connectors.source_api import LayoutSource

# kind -> (module, class); toy-town is written as a Cityscapes tree and read by the same connector.
_CONNECTORS = {
    "toytown": ("connectors.cityscapes", "CityscapesSource"),
    "cityscapes": ("connectors.cityscapes", "CityscapesSource"),
    "bdd100k": ("connectors.bdd100k", "BDD100KSource"),
    "folder": ("connectors.folder", "FolderSource"),
    "parquet": ("connectors.parquet_source", "ParquetSource"),
}
SOURCE_KINDS: tuple[str, ...] = tuple(_CONNECTORS)


def make_source(kind: str, root: str, split: str = "train", options: dict[str, Any] | None = None) -> LayoutSource:
    """Build the connector of ``kind`` reading ``root``; connector-specific kwargs come from ``options``."""
    if kind not in _CONNECTORS:
        raise ValueError(f"unknown source kind {kind!r} (expected one of {', '.join(SOURCE_KINDS)})")
    module, cls_name = _CONNECTORS[kind]
    cls = getattr(importlib.import_module(module), cls_name)
    kwargs = dict(options or {})
    kwargs.setdefault("split", split)
    return cls(root, **kwargs)
