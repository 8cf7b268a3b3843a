import numpy as np
import pytest

from amgen_core.labels import LabelError, NAME_TO_ID
from stages.embed import EMBED_DIM, EMBED_VERSION, EmbedStage, embed_layouts, layout_embedding

ROAD, SKY, CAR, BUILDING = (NAME_TO_ID[n] for n in ("road", "sky", "car", "building"))


def street(h=32, w=64, horizon=12, car_x=None):
    lab = np.full((h, w), ROAD, np.uint8)
    lab[:horizon] = SKY
    lab[horizon - 4:horizon, : w // 2] = BUILDING
    if car_x is not None:
        lab[horizon + 6:horizon + 12, car_x:car_x + 10] = CAR
    return lab


def test_dimension_norm_dtype_and_version():
    v = layout_embedding(street())
    assert v.shape == (EMBED_DIM,) == (660,)
    assert v.dtype == np.float32
    assert np.isclose(np.linalg.norm(v), 1.0, atol=1e-6)
    assert "grid4x8" in EMBED_VERSION


def test_deterministic_and_batch_matches_single():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 34, (5, 32, 64)).astype(np.uint8)
    a = embed_layouts(labels)
    b = embed_layouts(labels.copy())
    assert np.array_equal(a, b)
    for i in range(5):
        assert np.allclose(a[i], layout_embedding(labels[i]), atol=1e-7)
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-6)


def test_mixed_sizes_keep_order_and_area_pooling_is_scale_free():
    small = street(car_x=20)
    big = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)   # same layout at 64x128
    out = embed_layouts([small, street(car_x=40), big])
    assert np.allclose(out[0], out[2], atol=1e-6)
    assert not np.allclose(out[0], out[1])


def test_grid_sees_geometry_the_histogram_cannot():
    left, right = street(car_x=5), street(car_x=49)       # same class histogram, car moved
    same = layout_embedding(left) @ layout_embedding(left)
    moved = layout_embedding(left) @ layout_embedding(right)
    other = layout_embedding(left) @ layout_embedding(np.full((32, 64), SKY, np.uint8))
    assert np.isclose(same, 1.0, atol=1e-6)
    assert other < moved < same


def test_bad_labels_raise_clear_errors():
    with pytest.raises(LabelError, match="unknown Cityscapes label id 200"):
        layout_embedding(np.full((32, 64), 200, np.uint8))
    with pytest.raises(LabelError, match="2-D"):
        layout_embedding(np.zeros((2, 32, 64), np.uint8))
    with pytest.raises(LabelError, match="smaller than"):
        layout_embedding(np.zeros((2, 3), np.uint8))


def test_embed_stage_on_a_batch_dict():
    batch = {"layout_id": np.array(["a", "b"]), "label": np.stack([street(), street(car_x=3)])}
    out = EmbedStage()(batch)
    assert out["embedding"].shape == (2, EMBED_DIM)
    assert np.allclose(out["embedding"][1], layout_embedding(street(car_x=3)))
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = street(), street(64, 128, 24)
    assert EmbedStage()({"label": ragged})["embedding"].shape == (2, EMBED_DIM)
    with pytest.raises(KeyError, match="'label'"):
        EmbedStage()({"image": batch["label"]})
