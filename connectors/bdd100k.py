"""BDD100K 10k semantic segmentation as layouts in the Cityscapes id space.

Tree (design.md):
    images/10k/{split}/*.jpg
    labels/sem_seg/masks/{split}/*.png       single channel, trainIds 0..18, 255 = ignore
    labels/sem_seg/colormaps/{split}/*.png   the same labels drawn in the Cityscapes trainId colours

Both label kinds land in Cityscapes ids via ``amgen_core.labels`` (ignore -> 0 "unlabeled"), so
BDD100K layouts retrieve against and condition the model exactly like Cityscapes ones.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CS_LABELS

from amgen_core.labels import IGNORE_TRAIN_ID, NUM_TRAIN_IDS, LabelError, from_train_ids
from amgen_core.image_io import check_same_size, read_image, read_label_png
from connectors.source_api import Item, LayoutSource, paired_items
from amgen_core.records import Layout

LabelKind = Literal["auto", "masks", "colormaps"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _rgb_key(r: int, g: int, b: int) -> int:
    return (r << 16) | (g << 8) | b


def _colour_to_id() -> dict[int, int]:
    """Colormap colour -> Cityscapes id: the 19 trainId colours, plus black for ignore/unlabeled."""
    table = {_rgb_key(0, 0, 0): 0}
    for lab in _CS_LABELS:
        if lab.id >= 0 and 0 <= lab.trainId < IGNORE_TRAIN_ID:
            table[_rgb_key(*lab.color)] = lab.id
    return table


COLOUR_TO_ID = _colour_to_id()


def train_id_mask_to_ids(mask: np.ndarray, where: str) -> np.ndarray:
    """A BDD100K trainId mask -> Cityscapes ids; values other than 0..18 and 255 are an error."""
    values = np.unique(mask)
    bad = [int(v) for v in values if not (0 <= int(v) < NUM_TRAIN_IDS or int(v) == IGNORE_TRAIN_ID)]
    if bad:
        raise LabelError(f"{where}: values {bad[:10]} are not BDD100K trainIds (0..{NUM_TRAIN_IDS - 1}, 255 ignore)")
    return from_train_ids(mask)


def colormap_to_ids(rgb: np.ndarray, where: str) -> np.ndarray:
    """A colormap (HxWx3 uint8) -> Cityscapes ids; a colour outside the trainId palette is an error."""
    keys = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    uniq, inverse = np.unique(keys, return_inverse=True)
    unknown = [int(k) for k in uniq if int(k) not in COLOUR_TO_ID]
    if unknown:
        shown = [((k >> 16) & 255, (k >> 8) & 255, k & 255) for k in unknown[:5]]
        raise LabelError(f"{where}: colours {shown} are not Cityscapes trainId colours"
                         f" ({len(unknown)} unknown colour(s))")
    ids = np.array([COLOUR_TO_ID[int(k)] for k in uniq], np.uint8)
    return ids[inverse.reshape(keys.shape)]


class BDD100KSource(LayoutSource):
    name = "bdd100k"

    def __init__(self, root: str | os.PathLike, split: str = "train", label_kind: LabelKind = "auto"):
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise FileNotFoundError(f"BDD100K root {self.root} is not a directory")
        self.image_dir = self.root / "images" / "10k" / split
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"{self.image_dir}: no BDD100K images for split {split!r}")
        self.label_kind = self._pick_kind(label_kind)
        self.label_dir = self.root / "labels" / "sem_seg" / self.label_kind / split

    def _pick_kind(self, label_kind: LabelKind) -> str:
        sem_seg = self.root / "labels" / "sem_seg"
        if label_kind == "auto":
            for kind in ("masks", "colormaps"):
                if (sem_seg / kind / self.split).is_dir():
                    return kind
            raise FileNotFoundError(
                f"{sem_seg}: neither masks/{self.split} nor colormaps/{self.split} exists"
                " (BDD100K ships no labels for the test split)")
        if label_kind not in ("masks", "colormaps"):
            raise ValueError(f"label_kind must be 'auto', 'masks' or 'colormaps', got {label_kind!r}")
        if not (sem_seg / label_kind / self.split).is_dir():
            raise FileNotFoundError(f"{sem_seg / label_kind / self.split}: no BDD100K {label_kind}")
        return label_kind

    def list_items(self) -> list[Item]:
        return paired_items(self.image_dir, self.label_dir, id_prefix=f"bdd100k/{self.split}", source=self.name,
                            image_suffixes=IMAGE_SUFFIXES, default_image_suffix=".jpg")

    def read_item(self, item: Item) -> Layout:
        image = read_image(item["image"])
        label_path = item["label"]
        if self.label_kind == "masks":
            label = train_id_mask_to_ids(read_label_png(label_path), label_path)
        else:
            label = colormap_to_ids(read_image(label_path), label_path)
        check_same_size(image, label, f"{item['image']} / {label_path}")
        return Layout(
            layout_id=item["item_id"], source=self.name, label=label, instance=None, image=image,
            split=self.split,
            meta={"dataset": "bdd100k", "label_kind": self.label_kind,
                  "image": os.path.relpath(item["image"], self.root),
                  "label": os.path.relpath(label_path, self.root)},
        )
