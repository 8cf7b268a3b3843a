"""The shape every layout source shares, so the read stage can quarantine one bad item and go on.

A source splits reading in two: ``list_items()`` is cheap and never opens pixel data; it returns
JSON-able descriptors (plain dicts of str/int, fine to ship through Ray). ``read_item(item)`` does
the decoding and raises a clear, path-naming error for that one item. Every descriptor carries:

- ``item_id``: the layout id the item will get (stable across runs),
- ``source``: the connector name,
- ``path``: the file to blame in an error report.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from amgen_core.records import Layout

Item = dict[str, Any]

# Exceptions that mean "this input is bad" (quarantine it), as opposed to a bug in our code.
# FileNotFoundError, CorruptImageError, SizeMismatchError and LabelError all fall under these.
BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


class LayoutSource:
    """Base class: subclasses implement ``list_items`` and ``read_item``."""

    name: str = "source"

    def list_items(self) -> list[Item]:
        raise NotImplementedError

    def read_item(self, item: Item) -> Layout:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Layout]:
        for item in self.list_items():
            yield self.read_item(item)

    def __len__(self) -> int:
        return len(self.list_items())


def paired_items(image_dir: Path, label_dir: Path, *, id_prefix: str, source: str,
                 image_suffixes: tuple[str, ...], default_image_suffix: str) -> list[Item]:
    """Pair images and label PNGs by file stem.

    The union of stems is listed, so an image without a label (or a label without an image) becomes
    an item whose ``read_item`` fails naming the missing file, instead of silently vanishing.
    """
    images = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() in image_suffixes}
    labels = {p.stem: p for p in label_dir.glob("*.png")}
    items = []
    for stem in sorted(images.keys() | labels.keys()):
        image = images.get(stem, image_dir / f"{stem}{default_image_suffix}")
        label = labels.get(stem, label_dir / f"{stem}.png")
        items.append({"item_id": f"{id_prefix}/{stem}", "source": source,
                      "path": str(image), "image": str(image), "label": str(label)})
    return items
