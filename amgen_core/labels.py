"""Cityscapes label space, taken from cityscapesscripts (never copied by hand).

Label maps everywhere in amgen are HxW uint8 Cityscapes *ids* (0..33). Instance maps
follow the Cityscapes convention: ``id * 1000 + k`` for things, the plain id for stuff.
"""
from __future__ import annotations

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CS_LABELS

IGNORE_TRAIN_ID = 255
VALID_IDS: frozenset[int] = frozenset(l.id for l in _CS_LABELS if l.id >= 0)
NUM_IDS = max(VALID_IDS) + 1  # 34
THING_IDS: frozenset[int] = frozenset(l.id for l in _CS_LABELS if l.id >= 0 and l.hasInstances)
NAMES: dict[int, str] = {l.id: l.name for l in _CS_LABELS if l.id >= 0}
NAME_TO_ID: dict[str, int] = {l.name: l.id for l in _CS_LABELS if l.id >= 0}

# Lookup tables indexed by id (uint8 range so any byte indexes safely).
PALETTE = np.zeros((256, 3), np.uint8)
ID_TO_TRAIN_ID = np.full(256, IGNORE_TRAIN_ID, np.uint8)
for _l in _CS_LABELS:
    if _l.id >= 0:
        PALETTE[_l.id] = _l.color
        if 0 <= _l.trainId < 255:
            ID_TO_TRAIN_ID[_l.id] = _l.trainId

TRAIN_ID_TO_ID = np.zeros(256, np.uint8)  # 255 (ignore) -> 0 (unlabeled)
for _l in _CS_LABELS:
    if _l.id >= 0 and 0 <= _l.trainId < 255:
        TRAIN_ID_TO_ID[_l.trainId] = _l.id
NUM_TRAIN_IDS = int(ID_TO_TRAIN_ID[ID_TO_TRAIN_ID != IGNORE_TRAIN_ID].max()) + 1  # 19


class LabelError(ValueError):
    """A label map that cannot be used: unknown ids, wrong shape or dtype."""


def check_label_ids(label: np.ndarray, where: str = "label map") -> np.ndarray:
    """Return ``label`` as uint8 ids, or raise naming ``where`` and the unknown ids."""
    arr = np.asarray(label)
    if arr.ndim != 2:
        raise LabelError(f"{where}: expected a 2-D label map, got shape {arr.shape}")
    if arr.size == 0:
        raise LabelError(f"{where}: empty label map")
    present = np.unique(arr)
    unknown = [int(v) for v in present if int(v) not in VALID_IDS]
    if unknown:
        raise LabelError(f"{where}: unknown Cityscapes label ids {unknown[:10]} (valid: 0..{NUM_IDS - 1})")
    return arr.astype(np.uint8, copy=False)


def colorize(label: np.ndarray) -> np.ndarray:
    """HxW ids -> HxWx3 uint8 Cityscapes colours (what the structure net sees)."""
    return PALETTE[np.asarray(label, dtype=np.uint8)]


def to_train_ids(label: np.ndarray) -> np.ndarray:
    return ID_TO_TRAIN_ID[np.asarray(label, dtype=np.uint8)]


def from_train_ids(train_ids: np.ndarray) -> np.ndarray:
    return TRAIN_ID_TO_ID[np.asarray(train_ids, dtype=np.uint8)]
