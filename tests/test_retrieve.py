import json

import numpy as np
import pytest

from amgen_core.labels import NAME_TO_ID
from connectors.index_store import ShardedIndex
from stages.embed import EMBED_VERSION, embed_layouts
from amgen_core.records import Layout
from stages.retrieve import Retriever, RetrieveStage, build_exemplar_index, class_iou, resize_nearest

ROAD, SKY, CAR, PERSON, BUILDING, VEG = (NAME_TO_ID[n] for n in ("road", "sky", "car", "person", "building", "vegetation"))
UNLABELED = NAME_TO_ID["unlabeled"]


def scene(horizon=14, cars=(), side=BUILDING, people=(), h=32, w=64):
    lab = np.full((h, w), ROAD, np.uint8)
    lab[:horizon] = SKY
    lab[horizon - 5:horizon, :20] = side
    for x in cars:
        lab[horizon + 6:horizon + 12, x:x + 10] = CAR
    for x in people:
        lab[horizon + 2:horizon + 12, x:x + 2] = PERSON
    return lab


def test_class_iou_known_values():
    a = np.full((8, 8), ROAD, np.uint8)
    a[:4] = SKY
    b = np.full((8, 8), ROAD, np.uint8)
    b[:6] = SKY
    assert class_iou(a, a[None])[0] == pytest.approx(1.0)
    assert class_iou(a, b[None])[0] == pytest.approx((4 / 6 + 2 / 4) / 2)      # sky 2/3, road 1/2
    c = b.copy()
    c[7, 0] = CAR                                 # a class in one map only scores 0 and counts
    assert class_iou(a, c[None])[0] == pytest.approx((4 / 6 + (2 * 8 - 1) / (4 * 8) + 0) / 3)
    void = np.full((8, 8), UNLABELED, np.uint8)   # void pixels count for nobody
    assert class_iou(void, void[None])[0] == 0.0
    half = a.copy()
    half[:, :4] = UNLABELED
    assert class_iou(half, a[None])[0] == pytest.approx(0.5)


def test_resize_nearest_keeps_ids():
    lab = np.arange(16, dtype=np.uint8).reshape(4, 4)
    small = resize_nearest(lab, (2, 2))
    assert small.tolist() == [[5, 7], [13, 15]]
    assert resize_nearest(lab, (4, 4)) is lab


@pytest.fixture()
def gallery(tmp_path):
    """Distinct scenes plus three near-copies of one of them; domains alternate day/night."""
    labels = [scene(12 + i % 6, cars=[(7 * i) % 50], side=(BUILDING, VEG)[i % 2]) for i in range(24)]
    labels += [scene(14, cars=[20, 40], people=[5])] * 3          # copies of one scene ...
    labels.append(scene(14, cars=[20, 40], people=[6]))            # ... and a near-copy
    ids = [f"ex{i:03d}" for i in range(len(labels))]
    meta = [{"domain": ("day", "night")[i % 2]} for i in range(len(labels))]
    arr = np.stack(labels)
    index = ShardedIndex.build(embed_layouts(arr), ids, meta, tmp_path / "idx", 3, labels=arr,
                               embedding_version=EMBED_VERSION)
    return index, arr, ids, meta


def test_top1_is_the_exact_iou_best_and_self_is_excluded(gallery):
    index, arr, ids, _ = gallery
    r = Retriever(index, k=1, candidates=16)
    for i in (0, 5, 13):
        best = r.query(arr[i], target_id=ids[i])[0]
        assert best.exemplar_id != ids[i]
        others = [j for j in range(len(ids)) if j != i]
        ious = class_iou(arr[i], arr[others])
        assert best.score == pytest.approx(ious.max())
        assert best.exemplar_id == min(ids[others[j]] for j in np.flatnonzero(ious == ious.max()))
    assert r.query(arr[5])[0].exemplar_id == ids[5]               # no target id: itself is allowed
    assert r.query(arr[5], exclude_ids=[[ids[5]]])[0].exemplar_id != ids[5]


def test_metadata_filter(gallery):
    index, arr, ids, meta = gallery
    r = Retriever(index, k=3, candidates=16, filters={"domain": "night"})
    got = r.query(arr[0], target_id=ids[0])
    assert len(got) == 3 and all(m.meta["domain"] == "night" for m in got)
    day = r.query(arr[0], target_id=ids[0], filters={"domain": "day"})
    assert all(m.meta["domain"] == "day" for m in day)


def test_diverse_top_k_avoids_near_copies(gallery):
    index, arr, ids, _ = gallery
    target = scene(14, cars=[20, 40], people=[5])
    plain = Retriever(index, k=3, candidates=16, diversity=0.0, duplicate_threshold=1.01).query(target)
    assert [m.exemplar_id for m in plain] == ["ex024", "ex025", "ex026"]   # the copies, ties by id
    diverse = Retriever(index, k=3, candidates=16, diversity=0.3).query(target)
    assert diverse[0].exemplar_id == "ex024"
    picked = [int(m.exemplar_id[2:]) for m in diverse]
    emb = embed_layouts(arr[picked])
    sims = emb @ emb.T
    assert sims[np.triu_indices(3, 1)].max() < 0.98                        # no near-copies
    assert len({arr[p].tobytes() for p in picked}) == 3


def test_deterministic_and_label_lookup(gallery):
    index, arr, ids, _ = gallery
    lookup = {i: np.repeat(np.repeat(a, 2, 0), 2, 1) for i, a in zip(ids, arr)}   # full-size maps
    a = Retriever(index, k=4, candidates=20).query_batch(list(arr[:6]), ids[:6])
    b = Retriever(index, lookup.__getitem__, k=4, candidates=20).query_batch(list(arr[:6]), ids[:6])
    assert [[m.exemplar_id for m in row] for row in a] == [[m.exemplar_id for m in row] for row in b]
    assert np.allclose([[m.score for m in row] for row in a], [[m.score for m in row] for row in b])


def test_retrieve_stage_on_a_batch(gallery, tmp_path):
    index, arr, ids, _ = gallery
    stage = RetrieveStage(str(index.path), k=2, candidates=8)
    batch = {"layout_id": np.array(ids[:4], dtype=object), "label": arr[:4]}
    out = stage(batch)
    assert out["exemplar_id"].tolist() != ids[:4] and all(out["exemplar_id"])
    assert out["exemplar_score"].dtype == np.float32
    matches = [json.loads(s) for s in out["exemplar_matches"]]
    assert all(len(m) == 2 and m[0]["id"] == e for m, e in zip(matches, out["exemplar_id"]))
    with_emb = stage({**batch, "embedding": embed_layouts(arr[:4])})
    assert with_emb["exemplar_id"].tolist() == out["exemplar_id"].tolist()


def test_build_exemplar_index_from_layouts(tmp_path):
    layouts = [Layout(f"toy/{i}", "toytown", scene(10 + i % 8, cars=[i * 3 % 50]), split="train",
                      image=None if i == 3 else np.zeros((32, 64, 3), np.uint8),
                      meta={"domain": "night" if i % 4 == 0 else "day", "boxes": [1, 2]}) for i in range(20)]
    seen = []
    index, stats = build_exemplar_index(layouts, tmp_path / "idx", 2, require_image=True, on_layout=seen.append)
    assert (stats.count, stats.skipped, stats.shards, stats.kind) == (19, 1, 2, "flat") and len(seen) == 20
    assert index.meta(0) == {"source": "toytown", "split": "train", "domain": "night"}   # scalars only
    assert index.label(0).shape == (32, 64)
    r = Retriever(tmp_path / "idx", k=1)                        # opens the folder itself
    assert r.query(layouts[0].label, target_id="toy/0")[0].exemplar_id != "toy/0"
    with pytest.raises(ValueError, match="no layouts to index"):
        build_exemplar_index([], tmp_path / "none")
