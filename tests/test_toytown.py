"""Toy-town generator: determinism, label space, appearance independence, ground truth (speed: bench/toytown_speed.py)."""
from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest

from amgen_core.labels import NAME_TO_ID, THING_IDS, check_label_ids
from toytown import (DOMAINS, N_SLOTS, Appearance, make_scene, make_tree, make_triples, read_triples,
                                render, sample_appearance, sample_layout, write_triples)
from toytown.triples import match_vehicles

VEHICLES = [NAME_TO_ID[n] for n in ("car", "truck", "bus")]


def _scene(seed: int, domain=None, h=64, w=128):
    rng = np.random.default_rng(seed)
    layout = sample_layout(rng, h, w)
    look = sample_appearance(rng, domain)
    return layout, look, render(layout, look, seed)


def _tree_digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_scene_is_deterministic_to_the_byte():
    a, b = _scene(7), _scene(7)
    assert a[0].label.tobytes() == b[0].label.tobytes()
    assert a[0].instance.tobytes() == b[0].instance.tobytes()
    assert a[2].tobytes() == b[2].tobytes()
    assert a[0].meta == b[0].meta
    assert _scene(8)[2].tobytes() != a[2].tobytes()


@pytest.mark.parametrize("size", [(64, 128), (32, 64), (96, 80)])
def test_layouts_use_cityscapes_ids_and_instance_convention(size):
    seen: set[int] = set()
    for seed in range(40):
        layout, _, image = _scene(seed, h=size[0], w=size[1])
        label, inst = layout.label, layout.instance
        assert label.shape == size and label.dtype == np.uint8 and inst.dtype == np.int32
        assert image.shape == (*size, 3) and image.dtype == np.uint8
        check_label_ids(label, "toy-town")
        things = inst >= 1000
        assert np.array_equal(np.where(things, inst // 1000, inst), label)       # id*1000+k or plain id
        assert set(np.unique(label[things]).tolist()) <= set(THING_IDS)
        assert not (set(np.unique(label[~things]).tolist()) & set(THING_IDS))    # no thing without an instance
        seen |= set(np.unique(label).tolist())
    wanted = {"sky", "building", "road", "sidewalk", "vegetation", "terrain", "pole", "traffic sign", "car", "person"}
    assert {NAME_TO_ID[n] for n in wanted} <= seen
    if size == (64, 128):
        assert {NAME_TO_ID[n] for n in ("truck", "bus", "traffic light", "wall", "fence")} <= seen


def test_things_are_numbered_far_to_near_and_nearer_ones_occlude():
    checked = 0
    for seed in range(60):
        layout, _, _ = _scene(seed)
        objs = layout.meta["objects"]
        for cls in VEHICLES + [NAME_TO_ID["person"]]:
            mine = [o for o in objs if o["cls"] == cls]
            assert [o["id"] % 1000 for o in mine] == list(range(len(mine)))
            assert [o["s"] for o in mine] == sorted(o["s"] for o in mine)            # s small = far
        for o in objs:                       # every recorded instance overlaps the image
            y0, x0, y1, x1 = o["box"]
            assert y1 > 0 and x1 > 0 and y0 < 64 and x0 < 128
        # a bus drawn over a farther thing hides it where they overlap
        for i, j in itertools.combinations(range(len(objs)), 2):
            far, near = objs[i], objs[j]
            y0, x0 = max(far["box"][0], near["box"][0], 0), max(far["box"][1], near["box"][1], 0)
            y1, x1 = min(far["box"][2], near["box"][2]), min(far["box"][3], near["box"][3])
            if y1 > y0 and x1 > x0 and near["cls"] == NAME_TO_ID["bus"]:   # a bus fills its box
                assert not (layout.instance[y0:y1, x0:x1] == far["id"]).any()
                checked += 1
    assert checked >= 3


def _class_means(image, label):
    return {int(c): image[label == c].reshape(-1, 3).mean(0) for c in np.unique(label)}


def test_one_appearance_on_two_layouts_gives_the_same_class_colours():
    rng = np.random.default_rng(3)
    look = sample_appearance(rng, "day")
    la, lb = sample_layout(rng), sample_layout(rng)
    ma, mb = _class_means(render(la, look, 1), la.label), _class_means(render(lb, look, 2), lb.label)
    stuff = [c for c in ma if c in mb and c < 24 and (la.label == c).sum() > 40 and (lb.label == c).sum() > 40]
    assert len(stuff) >= 4
    for c in stuff:
        assert np.abs(ma[c] - mb[c]).max() < 20, (c, ma[c], mb[c])
    # the same layout in another appearance looks different
    other = sample_appearance(rng, "day")
    mo = _class_means(render(la, other, 1), la.label)
    diffs = [np.abs(ma[c] - mo[c]).max() for c in stuff]
    assert np.mean(diffs) > 25, diffs


def test_vehicle_colour_follows_its_slot():
    rng = np.random.default_rng(11)
    look = sample_appearance(rng, "day")
    for seed in range(30):
        layout = sample_layout(np.random.default_rng(seed))
        image = render(layout, look, seed)
        for o in layout.meta["objects"]:
            if o["cls"] == NAME_TO_ID["car"]:
                px = image[layout.instance == o["id"]].astype(float)
                if len(px) < 60:
                    continue
                paint = look.vehicle_slots[(o["id"] % 1000) % N_SLOTS] * look.gain * look.tint * 255
                # the median pixel is body paint (glass, lights and tyres are the minority)
                assert np.abs(np.median(px, 0) - paint).max() < 25
                return
    pytest.fail("no large car in 30 scenes")


def test_domains_change_the_light():
    rng = np.random.default_rng(5)
    layout = sample_layout(rng)
    means = {d: render(layout, sample_appearance(np.random.default_rng(1), d), 0).mean() for d in DOMAINS}
    assert means["night"] < 0.6 * means["day"]
    fog = render(layout, sample_appearance(np.random.default_rng(1), "fog"), 0).astype(float)
    day = render(layout, sample_appearance(np.random.default_rng(1), "day"), 0).astype(float)
    assert fog.std() < day.std()                     # fog: low contrast
    with pytest.raises(ValueError, match="domain"):
        sample_appearance(rng, "rain")


def test_appearance_round_trips_through_json():
    look = sample_appearance(np.random.default_rng(2), "night")
    back = Appearance.from_dict(look.to_dict())
    layout = sample_layout(np.random.default_rng(4))
    assert render(layout, look, 9).tobytes() == render(layout, back, 9).tobytes()


def test_triples_ground_truth_and_round_trip(tmp_path):
    triples = list(make_triples(12, seed=5))
    assert [t.triple_id for t in triples] == [f"{i:06d}" for i in range(12)]
    assert list(make_triples(3, seed=5, start=10))[0].target_image.tobytes() == triples[10].target_image.tobytes()
    mapped = 0
    for t in triples:
        gt = render(t.target_layout, t.appearance, t.seeds["target"])
        assert gt.tobytes() == t.target_image.tobytes()
        ex = render(t.exemplar_layout, t.appearance, t.seeds["exemplar"])
        assert ex.tobytes() == t.exemplar_image.tobytes()
        for tid, eid in t.instance_map.items():
            assert (t.target_instance == tid).any() and (t.exemplar_instance == eid).any()
            assert tid // 1000 in VEHICLES and eid // 1000 in VEHICLES
            assert (tid % 1000) % N_SLOTS == (eid % 1000) % N_SLOTS
            mapped += 1
    assert mapped >= 5
    n = write_triples(tmp_path / "a", triples)
    write_triples(tmp_path / "b", make_triples(12, seed=5))
    assert n == 12 and _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    back = list(read_triples(tmp_path / "a"))
    for a, b in zip(triples, back, strict=True):
        for name in ("exemplar_image", "exemplar_label", "exemplar_instance", "target_label", "target_instance",
                     "target_image"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and np.array_equal(x, y), name
        assert a.instance_map == b.instance_map and a.domain == b.domain
        assert render(b.target_layout, b.appearance, b.seeds["target"]).tobytes() == a.target_image.tobytes()


def test_match_vehicles_prefers_same_slot_same_class():
    ex = np.full((4, 8), 7, np.int32)
    ex[0, :2] = 26003            # car slot 3
    ex[1, :3] = 27011            # truck slot 3 (larger)
    ex[2, :2] = 26001
    tg = np.full((4, 8), 7, np.int32)
    tg[0, :2] = 26011            # car slot 3 -> the car, not the larger truck
    tg[1, :2] = 28003            # bus slot 3 -> no bus: the largest same-slot vehicle
    tg[2, :2] = 26002            # slot 2 absent in the exemplar
    assert match_vehicles(tg, ex) == {26011: 26003, 28003: 27011}


def test_tree_is_deterministic_and_scene_i_does_not_depend_on_n(tmp_path):
    make_tree(tmp_path / "a", 6, seed=3)
    make_tree(tmp_path / "b", 6, seed=3)
    make_tree(tmp_path / "c", 9, seed=3)
    da, db, dc = _tree_digest(tmp_path / "a"), _tree_digest(tmp_path / "b"), _tree_digest(tmp_path / "c")
    assert da == db
    assert len([k for k in da if k.endswith("_leftImg8bit.png")]) == 6
    shared = {k: v for k, v in da.items() if not k.startswith("toytown_")}
    assert all(dc[k] == v for k, v in shared.items())
    layout, look, _, image = make_scene(3, 4)
    city = f"toytown-{look.domain}"
    stem = f"{city}_000000_000004"
    from PIL import Image
    got = np.asarray(Image.open(tmp_path / "a" / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png"))
    assert np.array_equal(got, image)


def test_render_needs_no_meta_and_checks_shapes():
    layout, look, full = _scene(12, "day")
    from toytown import ToyLayout
    bare = render(ToyLayout(layout.label, layout.instance, {}), look, 12)
    assert bare.shape == full.shape and bare.dtype == np.uint8
    sky = layout.label == NAME_TO_ID["sky"]
    assert np.abs(bare[sky].astype(int) - full[sky].astype(int)).mean() < 12     # same colours, less detail
    with pytest.raises(ValueError, match="same HxW"):
        render(ToyLayout(layout.label, layout.instance[:10], {}), look, 0)


def test_make_tree_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="domain"):
        make_tree(tmp_path, 1, domain="rain")
    with pytest.raises(ValueError, match="city_prefix"):
        make_tree(tmp_path, 1, city_prefix="bad_name")
    with pytest.raises(ValueError, match="seed"):
        make_tree(tmp_path, 1, seed=-1)
