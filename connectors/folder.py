"""A folder of image/mask pairs plus a user label table, as layouts in the Cityscapes id space.

    root/images/<stem>.png|jpg|jpeg
    root/masks/<stem>.png

The label table maps the values found in the masks to Cityscapes classes, by name or id, as a dict
or a YAML/JSON file. Keys are either mask values (single-channel masks) or "#rrggbb" colours
(colour masks):

    0: road            # or  "#804080": road
    1: car
    255: unlabeled

A mask value missing from the table is an error naming the mask file and the values.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import yaml

from amgen_core.labels import NAME_TO_ID, VALID_IDS, LabelError
from amgen_core.image_io import check_same_size, read_image, read_label_png
from connectors.source_api import Item, LayoutSource, paired_items
from amgen_core.records import Layout

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_COLOUR_KEY = re.compile(r"^#([0-9a-fA-F]{6})$")
_MAX_VALUE = 0xFFFF


class LabelTableError(ValueError):
    """A label table that cannot be used (bad key, unknown class)."""


def _load_table(label_table: Mapping | str | os.PathLike) -> tuple[Mapping, str]:
    if isinstance(label_table, Mapping):
        return label_table, "label table"
    path = Path(label_table)
    if not path.is_file():
        raise FileNotFoundError(f"label table {path} not found")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise LabelTableError(f"{path}: cannot parse label table ({e})") from e
    if not isinstance(data, Mapping) or not data:
        raise LabelTableError(f"{path}: a label table must be a non-empty mapping of mask value -> class")
    return data, str(path)


def _class_id(value, key, where: str) -> int:
    if isinstance(value, bool):
        raise LabelTableError(f"{where}: entry {key!r}: {value!r} is not a Cityscapes class")
    if isinstance(value, int):
        if value not in VALID_IDS:
            raise LabelTableError(f"{where}: entry {key!r}: {value} is not a Cityscapes id (0..33)")
        return value
    if isinstance(value, str) and value in NAME_TO_ID:
        return NAME_TO_ID[value]
    raise LabelTableError(f"{where}: entry {key!r}: {value!r} is not a Cityscapes class name or id")


def _mask_key(key, where: str) -> tuple[str, int]:
    """A table key -> ("value", v) for single-channel masks or ("colour", 0xRRGGBB)."""
    if isinstance(key, str) and _COLOUR_KEY.match(key.strip()):
        return "colour", int(key.strip()[1:], 16)
    try:
        v = int(key)
    except (TypeError, ValueError):
        raise LabelTableError(f"{where}: key {key!r} is neither a mask value nor a '#rrggbb' colour") from None
    if isinstance(key, bool) or not 0 <= v <= _MAX_VALUE:
        raise LabelTableError(f"{where}: key {key!r} is not a mask value in 0..{_MAX_VALUE}")
    return "value", v


class LabelTable:
    """Mask values (or colours) -> Cityscapes ids, applied as a lookup."""

    def __init__(self, label_table: Mapping | str | os.PathLike):
        data, self.where = _load_table(label_table)
        kinds, self.mapping = set(), {}
        for key, value in data.items():
            kind, k = _mask_key(key, self.where)
            kinds.add(kind)
            self.mapping[k] = _class_id(value, key, self.where)
        if len(kinds) != 1:
            raise LabelTableError(f"{self.where}: mixes mask values and '#rrggbb' colours; use one kind")
        self.kind = kinds.pop()

    def apply(self, mask: np.ndarray, where: str) -> np.ndarray:
        if self.kind == "colour":
            if mask.ndim != 3:
                raise LabelError(f"{where}: the label table has colour keys but the mask is single-channel")
            keys = (mask[..., 0].astype(np.int64) << 16) | (mask[..., 1].astype(np.int64) << 8) | mask[..., 2]
        else:
            keys = mask.astype(np.int64)
        uniq, inverse = np.unique(keys, return_inverse=True)
        unknown = [int(k) for k in uniq if int(k) not in self.mapping]
        if unknown:
            shown = [f"#{k:06x}" for k in unknown[:10]] if self.kind == "colour" else unknown[:10]
            raise LabelError(f"{where}: mask values {shown} are not in the label table ({self.where})")
        ids = np.array([self.mapping[int(k)] for k in uniq], np.uint8)
        return ids[inverse.reshape(keys.shape)]


class FolderSource(LayoutSource):
    name = "folder"

    def __init__(self, root: str | os.PathLike, label_table: Mapping | str | os.PathLike, *,
                 images: str = "images", masks: str = "masks", split: str = "train", name: str = "folder"):
        self.root = Path(root)
        self.image_dir, self.mask_dir = self.root / images, self.root / masks
        for d in (self.image_dir, self.mask_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"{d}: folder source needs this directory")
        self.table = LabelTable(label_table)
        self.split, self.name = split, name

    def list_items(self) -> list[Item]:
        return paired_items(self.image_dir, self.mask_dir, id_prefix=self.name, source=self.name,
                            image_suffixes=IMAGE_SUFFIXES, default_image_suffix=".png")

    def read_item(self, item: Item) -> Layout:
        image = read_image(item["image"])
        mask_path = item["label"]
        mask = read_image(mask_path) if self.table.kind == "colour" else read_label_png(mask_path)
        label = self.table.apply(mask, mask_path)
        check_same_size(image, label, f"{item['image']} / {mask_path}")
        return Layout(
            layout_id=item["item_id"], source=self.name, label=label, instance=None, image=image,
            split=self.split,
            meta={"dataset": self.name, "image": os.path.relpath(item["image"], self.root),
                  "label": os.path.relpath(mask_path, self.root)},
        )
