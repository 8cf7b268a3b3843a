"""Stage units without Ray: augment, read (quarantine), group, plan, synthesize, write, resume."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import AugmentConfig
from pipeline.plan import PLAN_FILE, load_plan, make_plan, save_plan
from pipeline.resume import OutputFolderError, finished_shards, prepare_out
from stages.augment import augment_layout, draw_record, record_json, replay
from stages.group import group_samples, load_group, unpack_arrays
from stages.read import list_items, make_source, read_item
from amgen_core.records import Layout
from test_pipeline_fixtures import H, W, break_three, make_toytown, tiny_model_dir


def scene(seed=0, h=H, w=W):
    rng = np.random.default_rng(seed)
    label = np.full((h, w), 23, np.uint8)
    label[h // 2:] = 7
    label[h // 3: h // 2, : w // 2] = 11
    inst = label.astype(np.int32)
    label[h // 2: h // 2 + 6, 5:15] = 26
    inst[h // 2: h // 2 + 6, 5:15] = 26000
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Layout("t0", "test", label, inst, image)


# ---------------------------------------------------------------- augment

def test_augment_is_seeded_recorded_and_replayable():
    cfg = AugmentConfig.model_validate({"ops": [
        {"op": "random_resized_crop", "p": 1.0, "scale": [0.6, 0.8]}, {"op": "zoom_out", "p": 1.0, "scale": [0.8, 0.9]},
        {"op": "hflip", "p": 1.0}, {"op": "brightness_contrast", "p": 1.0}]})
    lay = scene()
    a, rec = augment_layout(lay, cfg, run_seed=0)
    b, rec2 = augment_layout(lay, cfg, run_seed=0)
    assert rec == rec2 and np.array_equal(a.label, b.label) and np.array_equal(a.image, b.image)
    _, rec3 = augment_layout(Layout("t1", "test", lay.label), cfg, run_seed=0)
    assert rec3 != rec, "each target id draws its own parameters"
    assert [s["op"] for s in rec["ops"]] == ["crop", "resize", "zoom_out", "hflip", "brightness_contrast"]
    # The record is plain JSON, and replaying it on the original layout gives exactly the label.
    again = json.loads(record_json(rec))
    lab, inst, _ = replay(again, lay.label, lay.instance)
    assert np.array_equal(lab, a.label) and np.array_equal(inst, a.instance)
    # Paired: masks stay aligned (nearest), the zoom-out border is unlabeled in both maps.
    assert a.label.shape == (H, W) and a.label.dtype == np.uint8 and a.instance.dtype == np.int32
    assert set(np.unique(a.label)) <= set(np.unique(lay.label)) | {0}
    assert ((a.instance // 1000 == a.label) | (a.instance == a.label)).all()
    assert a.label[0, 0] == 0 and a.instance[0, 0] == 0 and (a.label == 0).any()


def test_augment_disabled_and_resize_only():
    lay = scene()
    off = AugmentConfig(enabled=False)
    out, rec = augment_layout(lay, off)
    assert rec["ops"] == [] and np.array_equal(out.label, lay.label)
    small = AugmentConfig(enabled=False, size=(16, 32))
    out, rec = augment_layout(lay, small)
    assert [s["op"] for s in rec["ops"]] == ["resize"] and out.label.shape == (16, 32)
    with pytest.raises(ValueError, match="expects a 32x64 layout"):
        replay(rec, np.zeros((8, 8), np.uint8))


def test_draw_record_ops_do_not_shift_each_other():
    """Changing one op's probability must not change the parameters the others draw."""
    r1 = draw_record([{"op": "hflip", "p": 0.0}, {"op": "random_resized_crop", "p": 1.0, "scale": (0.5, 0.9)}], (H, W), None, 5)
    r2 = draw_record([{"op": "hflip", "p": 1.0}, {"op": "random_resized_crop", "p": 1.0, "scale": (0.5, 0.9)}], (H, W), None, 5)
    assert r1["ops"][0] == r2["ops"][0] and r2["ops"][-1] == {"op": "hflip"}


# ---------------------------------------------------------------- read + quarantine

def test_read_quarantines_each_bad_item(tmp_path):
    root = make_toytown(tmp_path / "toy", 6)
    broken = break_three(root)
    src = make_source("toytown", str(root))
    items = list_items(src)
    assert [i["item_id"] for i in items] == sorted(i["item_id"] for i in items) and len(items) == 6
    assert all({"item_id", "source", "path"} <= set(i) for i in items)
    good, bad = [], {}
    for it in items:
        lay, err = read_item(src, it)
        if lay is None:
            bad[err["input_id"]] = err
        else:
            good.append(lay)
    assert set(bad) == set(broken) and len(good) == 3
    for lid, kind in broken.items():
        e = bad[lid]
        assert e["stage"] == "read" and e["path"] and lid in e["path"]
        word = {"corrupt": "decode", "unknown id": "unknown", "size mismatch": "size"}[kind]
        assert word in e["reason"].lower(), (kind, e["reason"])
    assert list_items(src, limit=2) == items[:2]


# ---------------------------------------------------------------- plan + group

def _targets(n, ex_of):
    return [{"target_id": f"t{i}", "target_item": json.dumps({"item_id": f"t{i}", "path": f"/x/t{i}.png"}),
             "augment": record_json({"v": 1, "in": [H, W], "out": [H, W], "ops": []}),
             "matches": [{"id": e, "score": 0.5} for e in ex_of(i)]} for i in range(n)]


def test_plan_orders_by_exemplar_fixes_shards_and_quarantines_missing(tmp_path):
    ex_items = {f"e{j}": json.dumps({"item_id": f"e{j}"}) for j in range(3)}
    targets = _targets(10, lambda i: [f"e{i % 3}"] if i != 4 else [])
    targets[7]["matches"] = [{"id": "ghost", "score": 1.0}]
    plan = make_plan(targets, ex_items, k=1, seed=0, rows_per_shard=3, config_hash="h" * 64)
    assert plan.num_samples == 8 and plan.num_shards == 3 and plan.shard_sizes() == [3, 3, 2]
    assert [(r["exemplar_id"], r["target_id"]) for r in plan.rows] == sorted((r["exemplar_id"], r["target_id"]) for r in plan.rows)
    assert [r["position"] for r in plan.rows] == list(range(8))
    assert {e["input_id"] for e in plan.errors} == {"t4", "t7"} and all(e["stage"] == "retrieve" for e in plan.errors)
    again = make_plan(targets, ex_items, k=1, seed=0, rows_per_shard=3, config_hash="h" * 64)
    assert [r["sample_id"] for r in again.rows] == [r["sample_id"] for r in plan.rows]
    other = make_plan(targets, ex_items, k=1, seed=1, rows_per_shard=3, config_hash="h" * 64)
    assert {r["seed"] for r in other.rows}.isdisjoint({r["seed"] for r in plan.rows})
    save_plan(plan, tmp_path)
    back = load_plan(tmp_path)
    assert back.rows == plan.rows and back.errors == plan.errors and back.config_hash == plan.config_hash


def test_groups_share_one_exemplar_never_cross_a_shard_and_respect_batch_size():
    ex_items = {f"e{j}": json.dumps({"item_id": f"e{j}"}) for j in range(2)}
    plan = make_plan(_targets(11, lambda i: ["e0"] if i < 9 else ["e1"]), ex_items, k=1, seed=0,
                     rows_per_shard=5, config_hash="x")
    groups = group_samples(plan.rows, batch_size=3)
    assert sum(len(g["members"]) for g in groups) == 11
    for g in groups:
        assert 1 <= len(g["members"]) <= 3
        rows = [r for r in plan.rows if r["sample_id"] in {m["sample_id"] for m in g["members"]}]
        assert {r["shard"] for r in rows} == {g["shard"]} and {r["exemplar_id"] for r in rows} == {g["exemplar_id"]}
    # A shard's groups are the same whether it is grouped alone (a resume) or with the others.
    alone = group_samples(plan.shard_rows(1), batch_size=3)
    assert alone == [g for g in groups if g["shard"] == 1]
    with pytest.raises(ValueError):
        group_samples(plan.rows, 0)


# ---------------------------------------------------------------- synthesize

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def test_synthesizer_one_bank_per_group_and_bad_sample_is_quarantined(tmp_path, tiny_dir):
    from amgen_core.image_io import decode_png
    from stages.group import pack_arrays
    from stages.synthesize import Synthesizer

    s = Synthesizer({"path": str(tiny_dir), "steps": 2, "guidance_scale": 2.0, "mode": "am_adapter",
                     "granularity": "class", "dtype": "float32"}, device="cpu", torch_threads=1)
    ex = scene(1)
    labels = [scene(i).label for i in range(3)]
    members = [{"sample_id": f"s{i}", "target_id": f"t{i}", "seed": 10 + i, "augment": "{}", "position": i} for i in range(3)]
    group = {"shard": 0, "exemplar_id": "ex", "members": members}
    arrays = {"exemplar_image": ex.image, "exemplar_label": ex.label,
              **{f"label_{i}": lab for i, lab in enumerate(labels)}}
    rows = s.synthesize_group(group, pack_arrays(arrays))
    assert [r["error"] for r in rows] == ["", "", ""] and [r["bank_new"] for r in rows] == [True, False, False]
    assert s.pipe.bank_cache.misses == 1
    img = decode_png(rows[0]["image"], kind="rgb")
    assert img.shape == (H, W, 3) and np.array_equal(decode_png(rows[1]["label"], kind="label"), labels[1])
    # Same group again: the bank comes from the actor's cache, the pixels are identical.
    rows2 = s.synthesize_group(group, pack_arrays(arrays))
    assert s.pipe.bank_cache.misses == 1 and not any(r["bank_new"] for r in rows2)
    assert [r["image"] for r in rows2] == [r["image"] for r in rows]
    # One target of a size the model cannot take: that sample is an error row, the others come out.
    arrays["label_1"] = np.full((H + 2, W), 7, np.uint8)
    rows3 = s.synthesize_group(group, pack_arrays(arrays))
    assert rows3[0]["error"] == "" and rows3[2]["error"] == "" and rows3[1]["image"] == b""
    err = json.loads(rows3[1]["error"])
    assert err["stage"] == "synthesize" and err["sample_id"] == "s1" and "size" in err["reason"]
    # The others still ran as one batch: exactly what that group without the bad sample gives.
    without = {"shard": 0, "exemplar_id": "ex", "members": [members[0], members[2]]}
    arrays_without = {"exemplar_image": ex.image, "exemplar_label": ex.label, "label_0": labels[0], "label_1": labels[2]}
    rows4 = s.synthesize_group(without, pack_arrays(arrays_without))
    assert rows3[0]["image"] == rows4[0]["image"] and rows3[2]["image"] == rows4[1]["image"]


def test_load_group_quarantines_unusable_exemplar(tmp_path):
    from stages.read import source_spec
    from pipeline.config import SourceConfig

    root = make_toytown(tmp_path / "toy", 5)
    broken = break_three(root)
    spec = source_spec(SourceConfig(kind="toytown", root=str(root)))
    src = make_source("toytown", str(root))
    items = {i["item_id"]: i for i in list_items(src)}
    good = [k for k in items if k not in broken]
    bad_ex = next(iter(broken))
    rec = record_json({"v": 1, "in": [H, W], "out": [H, W], "ops": [{"op": "hflip"}]})
    member = {"sample_id": "s0", "target_id": good[0], "target_item": json.dumps(items[good[0]]), "augment": rec,
              "seed": 1, "position": 0}
    ok = load_group({"shard": 0, "exemplar_id": good[1], "exemplar_item": json.dumps(items[good[1]]),
                     "members": [member]}, spec, spec)
    arrays = unpack_arrays(ok["payload"])
    assert json.loads(ok["error"]) == [] and np.array_equal(arrays["label_0"], read_item(src, items[good[0]])[0].label[:, ::-1])
    bad = load_group({"shard": 0, "exemplar_id": bad_ex, "exemplar_item": json.dumps(items[bad_ex]),
                      "members": [member]}, spec, spec)
    errs = json.loads(bad["error"])
    assert bad["payload"] == b"" and len(errs) == 1 and errs[0]["stage"] == "exemplar" and bad_ex in errs[0]["reason"]


# ---------------------------------------------------------------- write + resume

def _sample_row(i, shard, err=None, model="m@1"):
    from amgen_core.image_io import encode_png

    lay = scene(i)
    return {"sample_id": f"s{i}", "shard": shard, "position": i, "target_id": f"t{i}", "exemplar_id": "e",
            "image": encode_png(lay.image), "label": encode_png(lay.label), "instance": b"", "seed": i,
            "augment": "{}", "model": model, "error": json.dumps(err) if err else "", "bank_new": False}


def test_shard_writer_writes_complete_shards_only(tmp_path):
    from stages.write import ModelMismatchError, ShardWriter

    written = []
    w = ShardWriter(tmp_path, {0: ["s0", "s1"], 1: ["s2", "s3"]}, 2, "c" * 64, on_shard=lambda st, s: written.append(s))
    assert w.add(_sample_row(0, 0)) is None and not (tmp_path / "data").exists()
    w.add(_sample_row(2, 1))
    err = {"input_id": "t3", "source": None, "stage": "synthesize", "reason": "boom", "path": None, "sample_id": "s3"}
    st = w.add(_sample_row(3, 1, err=err))
    assert st is not None and st.rows == 1 and written == [1]
    assert pq.read_table(tmp_path / "errors" / "shard-00001.parquet").to_pylist()[0]["reason"] == "boom"
    assert w.add(_sample_row(2, 1)) is None, "a duplicate delivery is ignored"
    with pytest.raises(RuntimeError, match="did not plan it"):
        w.add(_sample_row(9, 0))
    with pytest.raises(ModelMismatchError):
        w.add(_sample_row(1, 0, model="other@2"))
    assert finished_shards(tmp_path, 2) == {1} and w.pending() == [0]


def test_prepare_out_refuses_another_config_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    assert prepare_out(out, "a" * 64) == "new"
    save_plan(make_plan([], {}, k=1, seed=0, rows_per_shard=2, config_hash="a" * 64), out)
    assert prepare_out(out, "a" * 64) == "resume"
    with pytest.raises(OutputFolderError, match="config hash aaaaaaaaaaaa.*bbbbbbbbbbbb"):
        prepare_out(out, "b" * 64)
    (out / "keep.txt").write_text("not ours")
    assert prepare_out(out, "b" * 64, overwrite=True) == "overwrite"
    assert not (out / PLAN_FILE).exists() and (out / "keep.txt").exists()


# ---------------------------------------------------------------- score

def tiny_segmenter(path):
    import torch

    from evaluation.segmenter import Segmenter, SegmenterConfig

    torch.manual_seed(0)
    return Segmenter(SegmenterConfig(widths=(4, 8), image_size=(H, W))).save_pretrained(path)


def test_scorer_adds_miou_and_refuses_a_missing_segmenter(tmp_path):
    from amgen_core.labels import to_train_ids
    from stages.score import ScoreUnavailableError, Scorer, check_scorer, sample_miou

    seg = tiny_segmenter(tmp_path / "seg")
    assert check_scorer(str(seg)) == seg
    with pytest.raises(ScoreUnavailableError, match="score.segmenter: no usable segmenter"):
        check_scorer(str(tmp_path / "nothing"))
    lay = scene(3)
    assert sample_miou(to_train_ids(lay.label), lay.label) == 1.0
    rows = [_sample_row(0, 0), _sample_row(1, 0, err={"input_id": "t1", "stage": "x", "reason": "y"}), _sample_row(2, 0)]
    for r in rows[1:2]:
        r["image"] = r["label"] = b""
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    scores = Scorer(str(seg))(batch)["score_miou"]
    assert np.isnan(scores[1]) and all(0.0 <= scores[i] <= 1.0 for i in (0, 2))
    pred = Scorer(str(seg)).model.predict(scene(0).image[None])[0]
    assert scores[0] == pytest.approx(sample_miou(pred, scene(0).label))
