"""Cityscapes connector: toy-town trees read back exactly, polygon JSON, clear per-item errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from amgen_core.labels import NAME_TO_ID, LabelError
from connectors.cityscapes import (CityscapesSource, CorruptFileError, MissingFileError, MissingImageError,
                                   MissingLabelError, SizeMismatchError, rasterize_polygons)
from amgen_core.image_io import SizeMismatchError as AnySizeMismatch
from toytown import make_scene, make_tree

ROAD, CAR, PERSON, SKY = (NAME_TO_ID[n] for n in ("road", "car", "person", "sky"))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tt")
    make_tree(root, 10, seed=1)
    return root


def test_toytown_tree_reads_back_exactly(tree):
    src = CityscapesSource(tree, "train")
    layouts = list(src)
    assert len(src) == len(layouts) == 10
    assert len({lay.meta["city"] for lay in layouts}) >= 2          # mixed domains -> several cities
    for lay in layouts:
        index = lay.meta["index"]
        layout, look, _, image = make_scene(1, index)
        assert lay.source == "cityscapes" and lay.split == "train"
        assert lay.layout_id == f"toytown-{look.domain}_000000_{index:06d}"
        assert lay.label.dtype == np.uint8 and np.array_equal(lay.label, layout.label)
        assert lay.instance.dtype == np.int32 and np.array_equal(lay.instance, layout.instance)
        assert lay.image.dtype == np.uint8 and np.array_equal(lay.image, image)
        assert lay.meta["domain"] == look.domain and lay.meta["city"] == f"toytown-{look.domain}"
        assert lay.meta["path"].endswith(f"{lay.layout_id}_gtFine_labelIds.png")


def test_filters_limit_rows_and_labels_only(tree):
    all_items = CityscapesSource(tree).list_items()
    city = all_items[0].city
    some = CityscapesSource(tree, cities=[city]).list_items()
    assert some and all(it.city == city for it in some)
    assert [it.layout_id for it in CityscapesSource(tree, limit=3).list_items()] == [it.layout_id for it in all_items[:3]]
    src = CityscapesSource(tree, with_images=False)
    lay = src.read_item(all_items[0].to_row())                      # items ship as plain dict rows
    assert lay.image is None and lay.layout_id == all_items[0].layout_id
    with pytest.raises(MissingFileError, match="atlantis"):
        CityscapesSource(tree, cities=["atlantis"]).list_items()
    with pytest.raises(MissingFileError, match="gtFine/val"):
        CityscapesSource(tree, "val").list_items()
    with pytest.raises(MissingFileError, match="does not exist"):
        CityscapesSource(tree / "nowhere").list_items()


def _polygons(w=64, h=32):
    return {"imgWidth": w, "imgHeight": h, "objects": [
        {"label": "sky", "polygon": [[0, 0], [64, 0], [64, 16], [0, 16]]},
        {"label": "road", "polygon": [[0, 16], [64, 16], [64, 32], [0, 32]]},
        {"label": "car", "polygon": [[4, 18], [20, 18], [20, 28], [4, 28]]},
        {"label": "car", "polygon": [[14, 20], [30, 20], [30, 30], [14, 30]]},   # on top of the first car
        {"label": "cargroup", "polygon": [[40, 18], [50, 18], [50, 24], [40, 24]]},
        {"label": "person", "polygon": [[54, 10], [58, 10], [58, 26], [54, 26]]},
        {"label": "license plate", "polygon": [[6, 26], [8, 26], [8, 27], [6, 27]]},   # id -1: not drawn
    ]}


def _polygon_tree(root, objects=None, image_size=(32, 64)):
    gt = root / "gtFine" / "train" / "polyville"
    im = root / "leftImg8bit" / "train" / "polyville"
    gt.mkdir(parents=True)
    im.mkdir(parents=True)
    stem = "polyville_000001_000002"
    (gt / f"{stem}_gtFine_polygons.json").write_text(json.dumps(objects or _polygons()))
    Image.fromarray(np.full((*image_size, 3), 90, np.uint8)).save(im / f"{stem}_leftImg8bit.png")
    return stem


def test_polygon_json_is_rasterized_with_cityscapesscripts(tmp_path):
    stem = _polygon_tree(tmp_path)
    (lay,) = list(CityscapesSource(tmp_path))
    assert lay.layout_id == stem and lay.label.shape == (32, 64) and lay.meta["city"] == "polyville"
    assert "domain" not in lay.meta
    assert lay.label[5, 5] == SKY and lay.label[31, 60] == ROAD
    assert lay.instance[22, 8] == CAR * 1000 + 0                       # first car
    assert lay.instance[25, 18] == CAR * 1000 + 1                      # second car, drawn over the first
    assert lay.instance[20, 45] == CAR and lay.label[20, 45] == CAR     # a group has no instance index
    assert lay.instance[15, 56] == PERSON * 1000
    assert lay.label[26, 7] == CAR                                     # the license plate is not drawn
    label, instance = rasterize_polygons(tmp_path / "gtFine/train/polyville" / f"{stem}_gtFine_polygons.json")
    assert np.array_equal(label, lay.label) and np.array_equal(instance, lay.instance)


def test_polygon_errors_name_the_file(tmp_path):
    bad = _polygons()
    bad["objects"].append({"label": "dragon", "polygon": [[0, 0], [2, 0], [2, 2]]})
    _polygon_tree(tmp_path / "a", bad)
    with pytest.raises(LabelError, match=r"polyville_000001_000002_gtFine_polygons\.json.*dragon"):
        list(CityscapesSource(tmp_path / "a"))
    stem = _polygon_tree(tmp_path / "b")
    path = tmp_path / "b/gtFine/train/polyville" / f"{stem}_gtFine_polygons.json"
    path.write_text("{not json")
    with pytest.raises(CorruptFileError, match="polygons.json"):
        list(CityscapesSource(tmp_path / "b"))
    _polygon_tree(tmp_path / "c", image_size=(30, 64))
    with pytest.raises(SizeMismatchError, match="leftImg8bit.png"):
        list(CityscapesSource(tmp_path / "c"))


def test_bad_items_fail_one_by_one_with_the_file_named(tree, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(tree, root)
    items = {it.layout_id: it for it in CityscapesSource(root).list_items()}
    stems = sorted(items)
    gt = lambda stem, suf: root / "gtFine/train" / items[stem].city / f"{stem}{suf}"      # noqa: E731
    img = lambda stem: root / "leftImg8bit/train" / items[stem].city / f"{stem}_leftImg8bit.png"   # noqa: E731
    gt(stems[0], "_gtFine_labelIds.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")           # corrupt PNG
    data = img(stems[1]).read_bytes()
    img(stems[1]).write_bytes(data[: len(data) // 2])                                         # truncated
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(img(stems[2]))                      # size mismatch
    gt(stems[3], "_gtFine_labelIds.png").unlink()                                             # image, no label
    img(stems[4]).unlink()                                                                    # label, no image
    Image.fromarray(np.full((64, 128), 250, np.uint8)).save(gt(stems[5], "_gtFine_labelIds.png"))  # unknown id
    inst = np.asarray(Image.open(gt(stems[6], "_gtFine_instanceIds.png"))).astype(np.uint16)
    inst[0, 0] = 26000 if inst[0, 0] != 26000 else 24000
    Image.fromarray(inst).save(gt(stems[6], "_gtFine_instanceIds.png"))                      # disagrees

    src = CityscapesSource(root)
    expect = {0: (CorruptFileError, "labelIds.png"), 1: (CorruptFileError, "leftImg8bit.png"),
              2: (SizeMismatchError, "leftImg8bit.png"), 3: (MissingLabelError, "leftImg8bit.png"),
              4: (MissingImageError, "labelIds.png"), 5: (LabelError, r"labelIds.png.*\[250\]"),
              6: (ValueError, r"instanceIds.png.*disagrees")}
    listed = {it.layout_id: it for it in src.list_items()}
    assert set(listed) == set(stems)                     # bad items are listed, so they can be quarantined
    good = 0
    for i, stem in enumerate(stems):
        if i in expect:
            cls, pattern = expect[i]
            with pytest.raises(cls, match=pattern) as err:
                src.read_item(listed[stem])
            assert stem in str(err.value)
        else:
            src.read_item(listed[stem])
            good += 1
    assert good == len(stems) - len(expect)
    assert issubclass(SizeMismatchError, AnySizeMismatch) and issubclass(MissingLabelError, FileNotFoundError)
