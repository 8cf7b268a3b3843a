import json

import numpy as np
import pytest
from PIL import Image

from amgen_core.labels import NAME_TO_ID, LabelError
from connectors.folder import FolderSource, LabelTableError

H, W = 8, 12


def make_folder(root, n=2, colour=False):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    masks = {}
    for i in range(n):
        m = np.zeros((H, W), np.uint8)
        m[H // 2:] = 1
        m[:2, :3] = 255
        masks[f"im{i}"] = m
        Image.fromarray(np.full((H, W, 3), 10 * i, np.uint8)).save(root / "images" / f"im{i}.png")
        if colour:
            rgb = np.zeros((H, W, 3), np.uint8)
            rgb[m == 1] = (255, 0, 0)
            rgb[m == 255] = (0, 0, 255)
            Image.fromarray(rgb).save(root / "masks" / f"im{i}.png")
        else:
            Image.fromarray(m).save(root / "masks" / f"im{i}.png")
    return masks


def test_yaml_table_by_name_and_id(tmp_path):
    masks = make_folder(tmp_path)
    table = tmp_path / "table.yaml"
    table.write_text("0: road\n1: 26\n255: unlabeled\n")
    layouts = list(FolderSource(tmp_path, table))
    assert [l.layout_id for l in layouts] == ["folder/im0", "folder/im1"]
    want = np.choose(masks["im0"] == 1, [NAME_TO_ID["road"], NAME_TO_ID["car"]]).astype(np.uint8)
    want[masks["im0"] == 255] = 0
    assert np.array_equal(layouts[0].label, want) and layouts[0].label.dtype == np.uint8
    assert layouts[1].image[0, 0, 0] == 10


def test_json_table_with_colour_keys(tmp_path):
    make_folder(tmp_path, colour=True)
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"#000000": "road", "#ff0000": "person", "#0000ff": "sky"}))
    lay = FolderSource(tmp_path, table).read_item(FolderSource(tmp_path, table).list_items()[0])
    assert set(np.unique(lay.label)) == {NAME_TO_ID["road"], NAME_TO_ID["person"], NAME_TO_ID["sky"]}


def test_unknown_mask_value_names_file_and_values(tmp_path):
    make_folder(tmp_path)
    src = FolderSource(tmp_path, {0: "road", 1: "car"})
    with pytest.raises(LabelError, match=r"masks/im0\.png.*\[255\]"):
        src.read_item(src.list_items()[0])


def test_bad_tables_are_rejected(tmp_path):
    make_folder(tmp_path)
    with pytest.raises(LabelTableError, match="carr"):
        FolderSource(tmp_path, {0: "carr"})
    with pytest.raises(LabelTableError, match="40"):
        FolderSource(tmp_path, {0: 40})
    with pytest.raises(LabelTableError, match="mixes"):
        FolderSource(tmp_path, {0: "road", "#ffffff": "sky"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(LabelTableError, match="bad.yaml"):
        FolderSource(tmp_path, bad)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        FolderSource(tmp_path, tmp_path / "nope.yaml")
