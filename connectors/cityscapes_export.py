"""Export an amgen output folder as a Cityscapes-format tree, for segmenters that expect one.

    DEST/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png
    DEST/gtFine/{split}/{city}/{stem}_gtFine_labelIds.png        uint8 Cityscapes ids
    DEST/gtFine/{split}/{city}/{stem}_gtFine_instanceIds.png     uint16, only for samples with instances
    DEST/gtFine/{split}/{city}/{stem}_gtFine_color.png           the Cityscapes palette
    DEST/gtFine/{split}/{city}/{stem}_gtFine_labelTrainIds.png   what most training code reads (optional)
    DEST/amgen_export_{split}.json                               stem -> sample_id, shard, row

Stems follow Cityscapes' ``{city}_{seq:06d}_{frame:06d}`` with seq = shard index and frame = row,
so the tree is deterministic and every frame traces back to its sample.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from amgen_core.labels import check_label_ids, colorize, to_train_ids
from amgen_core.image_io import PNG_SIGNATURE, check_same_size, decode_image_bytes, encode_png, write_bytes_atomic
from connectors.parquet_sink import DATA_DIR, SHARD_RE

_CITY_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")


class ExportError(ValueError):
    """An output folder that cannot be exported, or a destination that is in the way."""


@dataclass
class ExportStats:
    frames: int
    with_instance: int
    dest: str
    index_path: str


def _shards(out_dir: Path) -> list[tuple[int, Path]]:
    data = out_dir / DATA_DIR
    shards = sorted((int(m[1]), p) for p in data.glob("*.parquet") if (m := SHARD_RE.match(p.name))) \
        if data.is_dir() else []
    if not shards:
        raise FileNotFoundError(f"{data}: no train-KKKKK-of-NNNNN.parquet shards to export")
    return shards


def export_cityscapes(out_dir: str | os.PathLike, dest: str | os.PathLike, *, split: str = "train",
                      city: str = "amgen", train_ids: bool = True, color: bool = True,
                      overwrite: bool = False) -> ExportStats:
    """Write every sample of ``out_dir`` into a Cityscapes tree under ``dest``; returns counts."""
    out_dir, dest = Path(out_dir), Path(dest)
    if not city or set(city) - _CITY_OK:
        raise ExportError(f"city {city!r}: use letters, digits and '-' (Cityscapes splits stems on '_')")
    img_dir = dest / "leftImg8bit" / split / city
    gt_dir = dest / "gtFine" / split / city
    if not overwrite and any(d.is_dir() and any(d.iterdir()) for d in (img_dir, gt_dir)):
        raise ExportError(f"{dest}: {split}/{city} already holds files (pass overwrite=True to replace them)")
    frames, with_instance = [], 0
    for index, path in _shards(out_dir):
        pf = pq.ParquetFile(path)
        row = 0
        for batch in pf.iter_batches(columns=["sample_id", "image", "label", "instance"], batch_size=100):
            for rec in batch.to_pylist():
                stem = f"{city}_{index:06d}_{row:06d}"
                where = f"{path.name} row {row} (sample_id {rec['sample_id']})"
                with_instance += _export_frame(rec, where, img_dir, gt_dir, stem, train_ids, color)
                frames.append({"stem": stem, "sample_id": rec["sample_id"], "shard": path.name, "row": row})
                row += 1
    index_path = dest / f"amgen_export_{split}.json"
    body = {"source": str(out_dir), "split": split, "city": city, "frames": frames}
    write_bytes_atomic(index_path, (json.dumps(body, indent=1) + "\n").encode())
    return ExportStats(frames=len(frames), with_instance=with_instance, dest=str(dest), index_path=str(index_path))


def _export_frame(rec: dict, where: str, img_dir: Path, gt_dir: Path, stem: str,
                  train_ids: bool, color: bool) -> bool:
    image_bytes = rec["image"]["bytes"] if rec.get("image") else None
    label_bytes = rec["label"]["bytes"] if rec.get("label") else None
    if not image_bytes or not label_bytes:
        raise ExportError(f"{where}: image or label has no bytes")
    image = decode_image_bytes(image_bytes, f"{where} image", "rgb")
    label = check_label_ids(decode_image_bytes(label_bytes, f"{where} label", "label"), f"{where} label")
    check_same_size(image, label, where)
    # PNG images are copied as stored; anything else (e.g. JPEG bytes) is re-encoded losslessly.
    write_bytes_atomic(img_dir / f"{stem}_leftImg8bit.png",
                       image_bytes if image_bytes[:8] == PNG_SIGNATURE else encode_png(image), fsync=False)
    write_bytes_atomic(gt_dir / f"{stem}_gtFine_labelIds.png", encode_png(label), fsync=False)
    if color:
        write_bytes_atomic(gt_dir / f"{stem}_gtFine_color.png", encode_png(colorize(label)), fsync=False)
    if train_ids:
        write_bytes_atomic(gt_dir / f"{stem}_gtFine_labelTrainIds.png", encode_png(to_train_ids(label)), fsync=False)
    inst_cell = rec.get("instance")
    if not inst_cell or not inst_cell.get("bytes"):
        return False
    instance = decode_image_bytes(inst_cell["bytes"], f"{where} instance", "label")
    check_same_size(instance, label, where, "instance and label")
    write_bytes_atomic(gt_dir / f"{stem}_gtFine_instanceIds.png", encode_png(instance.astype("int32")), fsync=False)
    return True
