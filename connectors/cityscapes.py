"""Cityscapes-format source: ``leftImg8bit/`` + ``gtFine/`` trees as ``Layout`` records.

    root/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png
    root/gtFine/{split}/{city}/{stem}_gtFine_labelIds.png      (ids, not trainIds)
    root/gtFine/{split}/{city}/{stem}_gtFine_instanceIds.png   (optional; id*1000+k for things)
    root/gtFine/{split}/{city}/{stem}_gtFine_polygons.json     (used when there is no labelIds PNG:
                                                                rasterized with cityscapesscripts)
    root/gtFine/{split}/{city}/{stem}_toytown.json             (toy-town trees: domain, seeds)

Reading is split in two so a pipeline can quarantine one bad item and go on:
``list_items()`` only looks at file names; ``read_item(item)`` decodes and validates one item
and raises a ``CityscapesError`` (a ValueError; ``.reason`` is a short code) naming the file.
Iterating the source reads every item and stops at the first bad one.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from amgen_core.labels import LabelError, check_label_ids
from amgen_core import image_io
from connectors.source_api import LayoutSource
from amgen_core.domains import DOMAINS
from amgen_core.records import Layout

SOURCE = "cityscapes"
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
INSTANCE_SUFFIX = "_gtFine_instanceIds.png"
POLYGON_SUFFIX = "_gtFine_polygons.json"
TOYTOWN_SUFFIX = "_toytown.json"


class CityscapesError(ValueError):
    reason = "bad_item"


class MissingFileError(CityscapesError, FileNotFoundError):
    reason = "missing_file"


class MissingLabelError(MissingFileError):
    reason = "missing_label"


class MissingImageError(MissingFileError):
    reason = "missing_image"


class CorruptFileError(CityscapesError, image_io.CorruptImageError):
    reason = "corrupt_file"


class SizeMismatchError(CityscapesError, image_io.SizeMismatchError):
    reason = "size_mismatch"


@dataclass(frozen=True)
class CityscapesItem:
    """The files of one frame (paths as strings, None when absent): cheap to list and to ship."""
    layout_id: str
    split: str
    city: str
    image: str | None
    label: str | None
    instance: str | None
    polygons: str | None
    sidecar: str | None

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "CityscapesItem":
        return cls(**{k: row.get(k) for k in cls.__dataclass_fields__})


class CityscapesSource(LayoutSource):
    name = SOURCE

    def __init__(self, root: str | os.PathLike, split: str = "train", cities: list[str] | None = None,
                 limit: int | None = None, with_images: bool = True):
        self.root = Path(root)
        self.split = split
        self.cities = None if cities is None else list(cities)
        self.limit = limit
        self.with_images = with_images
        self._items: list[CityscapesItem] | None = None

    # -- listing (file names only) --------------------------------------------------------
    def list_items(self) -> list[CityscapesItem]:
        if self._items is None:
            self._items = self._scan()
        return self._items

    def _scan(self) -> list[CityscapesItem]:
        gt_root = self.root / "gtFine" / self.split
        img_root = self.root / "leftImg8bit" / self.split
        if not self.root.is_dir():
            raise MissingFileError(f"{self.root}: Cityscapes root folder does not exist")
        if not gt_root.is_dir():
            raise MissingFileError(f"{gt_root}: no gtFine/{self.split} folder in the Cityscapes root {self.root}")
        if self.with_images and not img_root.is_dir():
            raise MissingFileError(f"{img_root}: no leftImg8bit/{self.split} folder (pass with_images=False "
                                   "to read labels only)")
        found = sorted({p.name for p in gt_root.iterdir() if p.is_dir()}
                       | ({p.name for p in img_root.iterdir() if p.is_dir()} if self.with_images else set()))
        cities = found
        if self.cities is not None:
            missing = [c for c in self.cities if c not in found]
            if missing:
                raise MissingFileError(f"{gt_root}: cities {missing} not found (have: {', '.join(found[:20])})")
            cities = sorted(self.cities)
        items: list[CityscapesItem] = []
        for city in cities:
            gt = _by_suffix(gt_root / city, (LABEL_SUFFIX, INSTANCE_SUFFIX, POLYGON_SUFFIX, TOYTOWN_SUFFIX))
            im = _by_suffix(img_root / city, (IMAGE_SUFFIX,)) if self.with_images else {}
            for stem in sorted(set(gt) | set(im)):
                files = {**gt.get(stem, {}), **im.get(stem, {})}
                items.append(CityscapesItem(
                    layout_id=stem, split=self.split, city=city,
                    image=files.get(IMAGE_SUFFIX), label=files.get(LABEL_SUFFIX),
                    instance=files.get(INSTANCE_SUFFIX), polygons=files.get(POLYGON_SUFFIX),
                    sidecar=files.get(TOYTOWN_SUFFIX)))
                if self.limit is not None and len(items) >= self.limit:
                    return items
        return items

    # -- reading (decode and validate one item) -------------------------------------------
    def read_item(self, item: CityscapesItem | dict[str, Any]) -> Layout:
        if isinstance(item, dict):
            item = CityscapesItem.from_row(item)
        return read_item(item, with_images=self.with_images)

    def __iter__(self) -> Iterator[Layout]:
        for item in self.list_items():
            yield self.read_item(item)

    def __len__(self) -> int:
        return len(self.list_items())


def _expected_label(item: CityscapesItem) -> str | None:
    """Where the label of an image-only frame should be: leftImg8bit/S/C/X_leftImg8bit.png ->
    gtFine/S/C/X_gtFine_labelIds.png."""
    if item.image is None or not item.image.endswith(IMAGE_SUFFIX):
        return None
    img = Path(item.image)
    root = img.parents[3]
    return str(root / "gtFine" / img.parent.parent.name / img.parent.name / img.name.replace(IMAGE_SUFFIX, LABEL_SUFFIX))


def read_item(item: CityscapesItem, with_images: bool = True) -> Layout:
    """Decode one frame into a Layout; raises a CityscapesError/LabelError naming the file."""
    if item.label is None and item.polygons is None:
        expected = _expected_label(item)
        err = MissingLabelError(f"{expected or item.layout_id}: label file does not exist (no {LABEL_SUFFIX} "
                                f"or {POLYGON_SUFFIX} for {item.image or item.instance or item.layout_id})")
        err.path = expected  # the file that is missing is the one to name in a quarantine row
        raise err
    if with_images and item.image is None:
        raise MissingImageError(f"{item.label or item.polygons}: no {IMAGE_SUFFIX} for {item.layout_id}")
    if item.label is not None:
        label_path = item.label
        label = check_label_ids(_read(label_path, "label"), where=label_path)
        instance = None if item.instance is None else _read(item.instance, "instance").astype(np.int32)
    else:
        label_path = item.polygons
        label, instance = rasterize_polygons(item.polygons)
        if item.instance is not None:          # a real instance PNG beats our rasterization
            instance = _read(item.instance, "instance").astype(np.int32)
    if instance is not None:
        _same_size(instance.shape, label.shape, item.instance or label_path, label_path)
        _check_instances(instance, label, item.instance or label_path)
    image = None
    if with_images:
        image = _read(item.image, "image")
        _same_size(image.shape[:2], label.shape, item.image, label_path)
    meta: dict[str, Any] = {"city": item.city, "path": str(label_path)}
    if item.image is not None:
        meta["image_path"] = str(item.image)
    meta.update(_domain_meta(item))
    return Layout(layout_id=item.layout_id, source=SOURCE, label=label, instance=instance, image=image,
                  split=item.split, meta=meta)


def rasterize_polygons(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``*_gtFine_polygons.json`` -> (label ids uint8, instance ids int32), with cityscapesscripts.

    Objects are drawn in file order (later ones on top), as cityscapesscripts does; groups
    (e.g. "cargroup") get the plain class id. Unknown label names raise LabelError naming the file
    (cityscapesscripts itself would call sys.exit).
    """
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.helpers.labels import name2label
    from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
    from cityscapesscripts.preparation.json2labelImg import createLabelImage

    annotation = Annotation()
    try:
        annotation.fromJsonFile(str(path))
    except FileNotFoundError:
        raise MissingFileError(f"{path}: polygon file does not exist") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptFileError(f"{path}: not a Cityscapes polygon JSON ({type(exc).__name__}: {exc})") from None
    if annotation.imgWidth <= 0 or annotation.imgHeight <= 0:
        raise CorruptFileError(f"{path}: bad image size {annotation.imgWidth}x{annotation.imgHeight}")
    for obj in annotation.objects:
        name = obj.label
        if name not in name2label and name.endswith("group"):
            name = name[: -len("group")]
        if name not in name2label:
            raise LabelError(f"{path}: unknown Cityscapes label name {obj.label!r}")
    try:
        label = np.asarray(createLabelImage(annotation, "ids"), dtype=np.uint8)
        instance = np.asarray(createInstanceImage(annotation, "ids"), dtype=np.int32)
    except (ValueError, TypeError) as exc:
        raise CorruptFileError(f"{path}: cannot rasterize a polygon ({exc})") from None
    return check_label_ids(label, where=str(path)), instance


def _by_suffix(folder: Path, suffixes: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """{stem: {suffix: path}} for the files of ``folder`` that end in one of ``suffixes``."""
    out: dict[str, dict[str, str]] = {}
    if not folder.is_dir():
        return out
    with os.scandir(folder) as entries:
        for e in entries:
            for suf in suffixes:
                if e.name.endswith(suf):
                    out.setdefault(e.name[: -len(suf)], {})[suf] = os.path.join(folder, e.name)
                    break
    return out


def _read(path: str, kind: str) -> np.ndarray:
    """Fully decoded PNG; missing and corrupt files raise errors that name the file and its role."""
    try:
        return image_io.read_image(path) if kind == "image" else image_io.read_label_png(path)
    except FileNotFoundError:
        raise MissingFileError(f"{path}: {kind} file does not exist") from None
    except image_io.CorruptImageError as exc:
        raise CorruptFileError(f"{path}: unreadable {kind} PNG ({exc})") from None


def _same_size(shape: tuple[int, ...], label_shape: tuple[int, ...], path, label_path) -> None:
    if tuple(shape[:2]) != tuple(label_shape[:2]):
        raise SizeMismatchError(f"{path}: size {shape[1]}x{shape[0]} does not match its label "
                                f"{label_path} ({label_shape[1]}x{label_shape[0]}, WxH)")


def _check_instances(instance: np.ndarray, label: np.ndarray, path) -> None:
    """Instance ids must agree with the label map: id // 1000 (things) or the id itself (stuff)."""
    cls = np.where(instance >= 1000, instance // 1000, instance)
    bad = cls != label
    if bad.any():
        y, x = map(int, np.argwhere(bad)[0])
        raise CityscapesError(f"{path}: instance id {int(instance[y, x])} at (y={y}, x={x}) disagrees with "
                              f"label id {int(label[y, x])} ({int(bad.sum())} pixels disagree)")


def _domain_meta(item: CityscapesItem) -> dict[str, Any]:
    """Domain of a toy-town frame: from its sidecar JSON, else from a ``*-{domain}`` city name."""
    if item.sidecar is not None:
        try:
            side = json.loads(Path(item.sidecar).read_text())
        except (OSError, ValueError) as exc:
            raise CorruptFileError(f"{item.sidecar}: unreadable toy-town sidecar ({exc})") from None
        return {k: side[k] for k in ("domain", "seed", "index", "generator") if k in side}
    for domain in DOMAINS:
        if item.city.endswith(f"-{domain}"):
            return {"domain": domain}
    return {}
