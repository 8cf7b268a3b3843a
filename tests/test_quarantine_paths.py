"""A quarantine row's ``path`` names the file that failed, for every kind of bad input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from amgen_core.quarantine import blamed_path, item_error_row
from stages.read import list_items, make_source, read_item
from toytown import make_tree


def frame_files(root: Path, stem_index: int = 0) -> tuple[Path, Path]:
    labels = sorted(root.rglob("*_gtFine_labelIds.png"))
    label = labels[stem_index]
    image = Path(str(label).replace("gtFine", "leftImg8bit", 1).replace("_gtFine_labelIds.png", "_leftImg8bit.png"))
    assert image.is_file()
    return image, label


def truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])


def unknown_id(p: Path) -> None:
    a = np.asarray(Image.open(p)).copy()
    a[0, 0] = 200
    Image.fromarray(a).save(p)


def smaller(p: Path) -> None:
    Image.open(p).convert("RGB").resize((32, 16)).save(p)


@pytest.mark.parametrize("damage, which, words", [
    (truncate, "image", "CorruptFileError"),
    (truncate, "label", "CorruptFileError"),
    (unknown_id, "label", "unknown Cityscapes label ids [200]"),
    (smaller, "image", "does not match its label"),
    (Path.unlink, "label", "label file does not exist"),
])
def test_row_path_is_the_failing_file(tmp_path, damage, which, words):
    root = tmp_path / "tree"
    make_tree(root, n=2, seed=3)
    image, label = frame_files(root)
    target = image if which == "image" else label
    damage(target)
    source = make_source("toytown", str(root))
    items = list_items(source)
    rows = [row for _, row in (read_item(source, it) for it in items) if row is not None]
    assert len(rows) == 1, rows
    row = rows[0]
    assert words in row["reason"], row["reason"]
    assert row["path"] == str(target), (row["path"], row["reason"])
    assert row["stage"] == "read" and row["input_id"].endswith(label.name.split("_gtFine")[0].split("/")[-1])


def test_blame_prefers_the_errors_own_path_and_the_longest_prefix():
    item = {"item_id": "a", "source": "s", "path": "/d/x.png", "image": "/d/x.png", "label": "/d/x.png.label.png"}
    assert blamed_path(ValueError("/d/x.png.label.png: bad"), item) == "/d/x.png.label.png"
    err = FileNotFoundError(2, "gone", "/elsewhere/y.png")
    assert blamed_path(err, item) == "/elsewhere/y.png"
    assert blamed_path("something unrelated", item) == "/d/x.png"
    row = item_error_row(item, "read", KeyError("k"))
    assert row == {"input_id": "a", "source": "s", "stage": "read", "reason": "KeyError: 'k'", "path": "/d/x.png"}
