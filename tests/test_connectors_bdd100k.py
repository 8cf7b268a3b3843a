import numpy as np
import pytest
from PIL import Image

from amgen_core.labels import NAME_TO_ID, PALETTE, TRAIN_ID_TO_ID, LabelError
from connectors.bdd100k import BDD100KSource, COLOUR_TO_ID
from amgen_core.image_io import CorruptImageError, SizeMismatchError

H, W = 16, 32


def _train_id_mask(seed):
    rng = np.random.default_rng(seed)
    m = rng.integers(0, 19, (H, W)).astype(np.uint8)
    m[0, :4] = 255  # ignore
    return m


def make_tree(root, split="train", n=3, colormaps=False, masks=True):
    img_dir = root / "images" / "10k" / split
    img_dir.mkdir(parents=True)
    truth = {}
    for i in range(n):
        stem = f"{i:04x}abcd-{i:08d}"
        Image.fromarray(np.full((H, W, 3), 40 * i, np.uint8)).save(img_dir / f"{stem}.jpg", quality=90)
        m = _train_id_mask(i)
        truth[stem] = m
        if masks:
            d = root / "labels" / "sem_seg" / "masks" / split
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(m).save(d / f"{stem}.png")
        if colormaps:
            d = root / "labels" / "sem_seg" / "colormaps" / split
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(PALETTE[TRAIN_ID_TO_ID[m]]).save(d / f"{stem}.png")
    return truth


def test_masks_map_train_ids_to_cityscapes_ids(tmp_path):
    truth = make_tree(tmp_path)
    src = BDD100KSource(tmp_path, "train")
    items = src.list_items()
    assert [it["item_id"] for it in items] == [f"bdd100k/train/{s}" for s in sorted(truth)]
    layouts = list(src)
    assert len(layouts) == 3
    for lay, stem in zip(layouts, sorted(truth)):
        assert lay.label.dtype == np.uint8 and lay.label.shape == (H, W)
        assert lay.image.shape == (H, W, 3)
        assert np.array_equal(lay.label, TRAIN_ID_TO_ID[truth[stem]])
        assert lay.label[0, 0] == 0  # ignore -> unlabeled
        assert lay.meta["label_kind"] == "masks" and lay.source == "bdd100k"
    # trainId 0 is road (id 7), 13 is car (id 26): spot-check the mapping itself
    assert TRAIN_ID_TO_ID[0] == NAME_TO_ID["road"] and TRAIN_ID_TO_ID[13] == NAME_TO_ID["car"]


def test_colormaps_give_the_same_ids_as_masks(tmp_path):
    make_tree(tmp_path, colormaps=True)
    via_masks = [l.label for l in BDD100KSource(tmp_path, "train", label_kind="masks")]
    via_colours = [l.label for l in BDD100KSource(tmp_path, "train", label_kind="colormaps")]
    for a, b in zip(via_masks, via_colours):
        assert np.array_equal(a, b)
    assert len(COLOUR_TO_ID) == 20  # 19 trainId colours + black


def test_auto_picks_colormaps_when_no_masks(tmp_path):
    make_tree(tmp_path, colormaps=True, masks=False)
    assert BDD100KSource(tmp_path, "train").label_kind == "colormaps"


def test_bad_items_raise_clear_errors_one_by_one(tmp_path):
    make_tree(tmp_path, n=2, colormaps=True)
    mdir = tmp_path / "labels" / "sem_seg" / "masks" / "train"
    cdir = tmp_path / "labels" / "sem_seg" / "colormaps" / "train"
    img_dir = tmp_path / "images" / "10k" / "train"
    stems = sorted(p.stem for p in mdir.glob("*.png"))
    bad = np.zeros((H, W), np.uint8)
    bad[3, 3] = 42
    Image.fromarray(bad).save(mdir / f"{stems[0]}.png")
    col = np.asarray(Image.open(cdir / f"{stems[0]}.png").convert("RGB")).copy()
    col[1, 1] = (1, 2, 3)
    Image.fromarray(col).save(cdir / f"{stems[0]}.png")
    Image.fromarray(np.zeros((H, W + 1), np.uint8)).save(mdir / f"{stems[1]}.png")
    (img_dir / "orphan.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(mdir / "orphan.png")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(mdir / "nolabelimage.png")

    src = BDD100KSource(tmp_path, "train", label_kind="masks")
    items = {it["item_id"].split("/")[-1]: it for it in src.list_items()}
    assert set(items) == {*stems, "orphan", "nolabelimage"}
    with pytest.raises(LabelError, match=rf"{stems[0]}\.png.*\[42\]"):
        src.read_item(items[stems[0]])
    with pytest.raises(SizeMismatchError, match=stems[1]):
        src.read_item(items[stems[1]])
    with pytest.raises(CorruptImageError, match="orphan.jpg"):
        src.read_item(items["orphan"])
    with pytest.raises(FileNotFoundError, match="nolabelimage.jpg"):
        src.read_item(items["nolabelimage"])
    csrc = BDD100KSource(tmp_path, "train", label_kind="colormaps")
    citem = [it for it in csrc.list_items() if stems[0] in it["item_id"]][0]
    with pytest.raises(LabelError, match=r"colormaps.*\(1, 2, 3\)"):
        csrc.read_item(citem)


def test_missing_split_or_labels_is_an_error(tmp_path):
    make_tree(tmp_path)
    with pytest.raises(FileNotFoundError, match="val"):
        BDD100KSource(tmp_path, "val")
    (tmp_path / "images" / "10k" / "test").mkdir()
    with pytest.raises(FileNotFoundError, match="test"):
        BDD100KSource(tmp_path, "test")
