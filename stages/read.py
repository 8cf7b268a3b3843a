"""Read stage: source config -> connector -> item descriptors -> layouts, one bad item at a time.

A source lists cheap, JSON-able item descriptors (``connectors.source_api``); each item is decoded on
its own, so a corrupt PNG, an unknown label id or an image/label size mismatch becomes an error row
(``{input_id, source, stage, reason, path}``) and the run goes on.
"""
from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from typing import Any, Mapping

import numpy as np

from amgen_core.labels import check_label_ids
from amgen_core.image_io import SizeMismatchError
from connectors.registry import SOURCE_KINDS, make_source  # noqa: F401  (the read stage's sources)
from connectors.source_api import BAD_INPUT_ERRORS, Item, LayoutSource
from connectors.storage import is_uri, local_dir, relocate
from amgen_core.quarantine import item_error_row
from amgen_core.records import Layout

def source_from_config(src: Any) -> LayoutSource:
    """``src`` is a ``pipeline.config.SourceConfig`` (or anything with kind/root/split/options).
    A URI root is mirrored to this node's cache (connectors/storage.py), at the same local path on
    every node, so item descriptors listed here are valid on every worker."""
    return make_source(src.kind, local_dir(src.root), src.split, src.options)


def source_spec(src: Any) -> str:
    """A SourceConfig as the JSON string a batch function rebuilds the connector from (cheap to ship)."""
    return json.dumps({"kind": src.kind, "root": str(src.root), "split": src.split, "options": src.options},
                      sort_keys=True)


class _Relocated(LayoutSource):
    """A source whose root is this node's mirror of a URI: item paths listed in another node's
    mirror are moved into this one before reading."""

    def __init__(self, inner: LayoutSource, local_root: str):
        self.inner, self.local_root = inner, local_root
        self.name = getattr(inner, "name", type(inner).__name__)

    def list_items(self) -> list[Item]:
        return self.inner.list_items()

    def read_item(self, item: Item) -> Layout:
        moved = {k: relocate(v, self.local_root) if isinstance(v, str) else v for k, v in item.items()}
        return self.inner.read_item(moved)


@lru_cache(maxsize=8)
def cached_source(spec_json: str) -> LayoutSource:
    """The connector of a ``source_spec``, built once per worker process."""
    spec = json.loads(spec_json)
    root = local_dir(spec["root"])
    src = make_source(spec["kind"], root, spec.get("split", "train"), spec.get("options"))
    return _Relocated(src, root) if is_uri(spec["root"]) else src


def as_item(raw: Any, source_name: str) -> Item:
    """A connector's descriptor as a plain dict with ``item_id``, ``source`` and ``path``.

    Connectors may list dataclasses (e.g. ``CityscapesItem``) keyed by ``layout_id``; the dict form
    ships through Ray and goes back to the connector's ``read_item`` unchanged.
    """
    if isinstance(raw, dict):
        d = dict(raw)
    elif hasattr(raw, "to_row"):
        d = dict(raw.to_row())
    elif dataclasses.is_dataclass(raw):
        d = dataclasses.asdict(raw)
    else:
        raise TypeError(f"source {source_name}: cannot use item descriptor of type {type(raw).__name__}")
    d.setdefault("item_id", d.get("layout_id"))
    d.setdefault("source", source_name)
    d.setdefault("path", d.get("label") or d.get("polygons") or d.get("image"))
    if d["item_id"] is None:
        raise ValueError(f"source {source_name}: item descriptor without an id: {d}")
    return d


def list_items(source: LayoutSource, limit: int | None = None) -> list[Item]:
    """Descriptors sorted by item id (a deterministic order whatever the file system says), capped."""
    name = str(getattr(source, "name", type(source).__name__))
    items = sorted((as_item(it, name) for it in source.list_items()), key=lambda it: str(it["item_id"]))
    ids = [str(it["item_id"]) for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"source {getattr(source, 'name', '?')}: duplicate item id {dup!r}")
    return items[:limit] if limit is not None else items


def item_json(item: Item) -> str:
    return json.dumps(item, sort_keys=True, default=str)


error_row = item_error_row  # blames the file that failed, not the item's main file


def validate_layout(layout: Layout, where: str) -> Layout:
    """What every later stage relies on: known ids, uint8 label, aligned instance and image."""
    layout.label = check_label_ids(layout.label, f"{where} label")
    h, w = layout.label.shape
    if layout.instance is not None:
        inst = np.asarray(layout.instance)
        if inst.shape != (h, w):
            raise SizeMismatchError(f"{where}: label and instance differ in size ({h}x{w} vs {inst.shape[0]}x{inst.shape[1]})")
        layout.instance = inst.astype(np.int32, copy=False)
    if layout.image is not None:
        img = np.asarray(layout.image)
        if img.ndim != 3 or img.shape[2] != 3:
            raise SizeMismatchError(f"{where}: image must be HxWx3, got shape {img.shape}")
        if img.shape[:2] != (h, w):
            raise SizeMismatchError(f"{where}: image and label differ in size ({img.shape[0]}x{img.shape[1]} vs {h}x{w})")
    return layout


def read_item(source: LayoutSource, item: Item, stage: str = "read") -> tuple[Layout | None, dict | None]:
    """(layout, None) or (None, error row). Only bad-input errors are quarantined; bugs still raise."""
    where = str(item.get("path") or item.get("item_id"))
    try:
        layout = source.read_item(item)
        return validate_layout(layout, where), None
    except BAD_INPUT_ERRORS as e:
        return None, error_row(item, stage, e)


# ---------------------------------------------------------------- batches (Ray Data ``batch_format="numpy"``)

def batch_rows(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A dict of columns -> one dict per row."""
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: batch[k][i] for k in keys} for i in range(n)]


def batch_columns(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, list]:
    """Rows -> a dict of columns (only ``keys``, in that order)."""
    return {k: [r[k] for r in rows] for k in keys}
