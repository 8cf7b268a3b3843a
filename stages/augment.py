"""Paired, seeded, recorded augmentation of target layouts (albumentations 2.0.8).

Two steps, so that every output can be checked against its input:
- ``draw_record`` turns the configured ops and a per-target seed into a *record*: plain JSON with
  the concrete parameters that were drawn (crop window, zoom factor, flip, photometric shifts).
- ``replay`` applies a record to a label map (and instance map / image) with albumentations,
  exactly; nothing random is left at that point. ``label == replay(record, target.label)`` holds
  for every written sample.

Only mild geometry is offered (driving layouts do not survive large rotations or warps). Masks use
nearest interpolation; pixels that come from outside the frame are filled with 255 (ignore) and
then mapped to 0 ("unlabeled"), in the label and in the instance map.
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from typing import Any

import albumentations as A
import cv2
import numpy as np

from amgen_core.records import Layout, stable_seed
from stages.read import batch_columns, cached_source, error_row, read_item

RECORD_VERSION = 1
FILL = 255  # ignore while transforming; 255 is never a valid label id nor instance id
UNLABELED = 0


def _spec(op: Any) -> dict[str, Any]:
    """Config op (pydantic model or dict) -> plain dict."""
    return op.model_dump() if hasattr(op, "model_dump") else dict(op)


def identity_record(height: int, width: int) -> dict[str, Any]:
    return {"v": RECORD_VERSION, "in": [height, width], "out": [height, width], "ops": []}


def draw_record(ops: list[Any], in_hw: tuple[int, int], out_hw: tuple[int, int] | None, seed: int) -> dict[str, Any]:
    """Draw concrete parameters for ``ops`` from ``seed``; the result is JSON and fully replayable."""
    h, w = int(in_hw[0]), int(in_hw[1])
    oh, ow = (h, w) if out_hw is None else (int(out_hw[0]), int(out_hw[1]))
    rng = np.random.default_rng(seed)
    crop: dict | None = None
    after: list[dict] = []
    for op in map(_spec, ops):
        fire = rng.random() < op["p"]  # always draw, so one op's p never shifts another's params
        kind = op["op"]
        if kind == "random_resized_crop":
            area = rng.uniform(*op["scale"])
            side = math.sqrt(area)
            ch, cw = max(1, round(h * side)), max(1, round(w * side))
            y0 = int(rng.integers(0, h - ch + 1))
            x0 = int(rng.integers(0, w - cw + 1))
            if fire and (ch, cw) != (h, w):
                crop = {"op": "crop", "x0": x0, "y0": y0, "x1": x0 + cw, "y1": y0 + ch}
        elif kind == "zoom_out":
            s = float(rng.uniform(*op["scale"]))
            if fire and s < 1.0:
                after.append({"op": "zoom_out", "scale": round(s, 6)})
        elif kind == "hflip":
            if fire:
                after.append({"op": "hflip"})
        elif kind == "brightness_contrast":
            b = float(rng.uniform(-op["brightness"], op["brightness"]))
            c = float(rng.uniform(-op["contrast"], op["contrast"]))
            if fire:
                after.append({"op": "brightness_contrast", "brightness": round(b, 6), "contrast": round(c, 6)})
        else:
            raise ValueError(f"unknown augment op {kind!r}")
    steps: list[dict] = []
    if crop is not None:
        steps.append(crop)
    cur = (crop["y1"] - crop["y0"], crop["x1"] - crop["x0"]) if crop else (h, w)
    if cur != (oh, ow):
        steps.append({"op": "resize", "h": oh, "w": ow})
    steps.extend(after)
    return {"v": RECORD_VERSION, "in": [h, w], "out": [oh, ow], "ops": steps}


def _transform(step: dict) -> A.BasicTransform:
    kind = step["op"]
    if kind == "crop":
        return A.Crop(x_min=step["x0"], y_min=step["y0"], x_max=step["x1"], y_max=step["y1"], p=1.0)
    if kind == "resize":
        return A.Resize(step["h"], step["w"], interpolation=cv2.INTER_AREA, mask_interpolation=cv2.INTER_NEAREST, p=1.0)
    if kind == "zoom_out":
        s = step["scale"]
        return A.Affine(scale=(s, s), rotate=0.0, shear=0.0, interpolation=cv2.INTER_LINEAR,
                        mask_interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT,
                        fill=0, fill_mask=FILL, p=1.0)
    if kind == "hflip":
        return A.HorizontalFlip(p=1.0)
    if kind == "brightness_contrast":
        b, c = step["brightness"], step["contrast"]
        return A.RandomBrightnessContrast(brightness_limit=(b, b), contrast_limit=(c, c), p=1.0)
    raise ValueError(f"augment record has an unknown op {kind!r}")


@lru_cache(maxsize=512)
def _cached_transform(step_json: str) -> A.BasicTransform:
    """One step's transform, built once per worker: building an albumentations transform (its
    argument validation) cost more than applying it to a toy layout. Steps have fixed parameters
    and every Compose reseeds its transforms, so a shared one gives the same pixels."""
    return _transform(json.loads(step_json))


def replay(record: dict | str, label: np.ndarray, instance: np.ndarray | None = None,
           image: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Apply a record exactly: returns (label uint8, instance int32 or None, image uint8 or None)."""
    rec = json.loads(record) if isinstance(record, str) else record
    h, w = rec["in"]
    if label.shape != (h, w):
        raise ValueError(f"augment record expects a {h}x{w} layout, got {label.shape[0]}x{label.shape[1]}")
    if not rec["ops"]:
        return (label.copy(), None if instance is None else instance.copy(),
                None if image is None else image.copy())
    masks = [label.astype(np.int32)]
    if instance is not None:
        masks.append(instance.astype(np.int32))
    # albumentations wants an image even for mask-only work; a blank one costs nothing here.
    img = image if image is not None else np.zeros((h, w, 3), np.uint8)
    steps = [_cached_transform(json.dumps(s, sort_keys=True)) for s in rec["ops"]]
    out = A.Compose(steps, seed=0, strict=True)(image=img, masks=masks)
    new_label = np.asarray(out["masks"][0])
    ignore = new_label == FILL
    new_label = np.where(ignore, UNLABELED, new_label).astype(np.uint8)
    new_inst = None
    if instance is not None:
        new_inst = np.where(ignore, UNLABELED, np.asarray(out["masks"][1])).astype(np.int32)
    new_img = None if image is None else np.asarray(out["image"], dtype=np.uint8)
    oh, ow = rec["out"]
    if new_label.shape != (oh, ow):
        raise ValueError(f"augment record promised {oh}x{ow}, replay gave {new_label.shape}")
    return new_label, new_inst, new_img


def augment_layout(layout: Layout, cfg: Any, run_seed: int = 0) -> tuple[Layout, dict]:
    """One target: draw its record from (augment seed, run seed, layout id), apply it, return both."""
    h, w = layout.label.shape
    size = tuple(cfg.size) if cfg.size is not None else None
    if not cfg.enabled:
        rec = identity_record(h, w) if size is None or size == (h, w) else draw_record([], (h, w), size, 0)
    else:
        seed = stable_seed("augment", layout.layout_id, run_seed, base=cfg.seed)
        rec = draw_record(cfg.ops, (h, w), size, seed)
    label, inst, img = replay(rec, layout.label, layout.instance, layout.image)
    out = Layout(layout_id=layout.layout_id, source=layout.source, label=label, instance=inst, image=img,
                 split=layout.split, meta=dict(layout.meta))
    return out, rec


def record_json(record: dict) -> str:
    """The canonical JSON text of a record (what ``sample_id`` and the ``augment`` column hold)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def read_and_augment_batch(batch: dict[str, Any], spec: str, augment: Any, run_seed: int) -> dict[str, list]:
    """Ray Data batch function of the plan pass: item descriptors (JSON) -> read -> augment.

    Keeps labels only (the plan needs where classes are, not pixels; the synthesis pass reads the
    image again). ``spec`` is a ``stages.read.source_spec``; ``augment`` the run's augment settings
    (``pipeline.config.AugmentConfig``). A bad item or an augmentation that cannot apply becomes an
    error row (``error`` holds its JSON) with a 1x1 placeholder label.
    """
    src = cached_source(spec)
    rows = []
    for raw in batch["item"]:
        item = json.loads(raw)
        lay, err = read_item(src, item, stage="read")
        rec = ""
        if lay is not None:
            lay.image = None
            try:
                lay, rec_d = augment_layout(lay, augment, run_seed)
                rec = record_json(rec_d)
            except ValueError as e:
                lay, err = None, error_row(item, "augment", e)
        rows.append({"layout_id": str(item["item_id"]), "item": str(raw), "augment": rec,
                     "error": "" if lay is not None else json.dumps(err),
                     "label": lay.label if lay is not None else np.zeros((1, 1), np.uint8)})
    return batch_columns(rows, ("layout_id", "item", "augment", "error", "label"))
