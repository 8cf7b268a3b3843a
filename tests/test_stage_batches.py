"""The plan and synthesis passes' batch callables, without Ray: each stage's batch function gives
what its per-item functions give, quarantined rows included, and the run's index build writes the
same bytes as `amgen index build`'s."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import AugmentConfig, SourceConfig
from stages.augment import augment_layout, read_and_augment_batch, record_json
from stages.embed import EMBED_DIM, EmbedStage, layout_embedding
from stages.group import GROUP_COLUMNS, load_group, load_groups_batch
from stages.read import item_json, list_items, make_source, read_item, source_spec
from stages.retrieve import (INDEX_ROW_COLUMNS, PlanRetrieveStage, build_exemplar_index, exemplar_meta, index_rows_batch,
                             index_thumb, write_exemplar_index)
from test_pipeline_fixtures import break_three, make_toytown

AUG = AugmentConfig.model_validate({"ops": [{"op": "random_resized_crop", "p": 0.7, "scale": [0.7, 1.0]},
                                            {"op": "hflip", "p": 0.5}]})


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = make_toytown(tmp_path_factory.mktemp("batches") / "toy", 8)
    broken = break_three(root)
    src = make_source("toytown", str(root))
    items = list_items(src)
    return {"root": root, "broken": broken, "src": src, "items": items,
            "spec": source_spec(SourceConfig(kind="toytown", root=str(root))),
            "batch": {"item": np.array([item_json(it) for it in items], dtype=object)}}


def _index_from_rows(out, tree):
    cols = index_rows_batch(tree["batch"], tree["spec"])
    good = [i for i, e in enumerate(cols["error"]) if not e]
    write_exemplar_index([cols["layout_id"][i] for i in good], np.stack([cols["embedding"][i] for i in good]),
                         [cols["thumb"][i] for i in good], [json.loads(cols["meta"][i]) for i in good], out, 1, seed=0)
    return cols


def test_read_and_augment_batch_quarantines_bad_items_and_augments_the_rest(tree):
    cols = read_and_augment_batch(tree["batch"], tree["spec"], AUG, run_seed=3)
    assert tuple(cols) == ("layout_id", "item", "augment", "error", "label")
    for lid, raw, rec, err, label in zip(*cols.values()):
        if lid in tree["broken"]:
            e = json.loads(err)
            assert e["stage"] == "read" and e["input_id"] == lid and rec == "" and label.shape == (1, 1)
            continue
        lay, _ = read_item(tree["src"], json.loads(raw))
        lay.image = None
        want, want_rec = augment_layout(lay, AUG, 3)
        assert err == "" and rec == record_json(want_rec) and np.array_equal(label, want.label)
    assert {lid for lid, e in zip(cols["layout_id"], cols["error"]) if e} == set(tree["broken"])


def test_embed_stage_skips_quarantined_rows_and_matches_one_by_one(tree):
    cols = read_and_augment_batch(tree["batch"], tree["spec"], AUG, run_seed=0)
    labels = np.empty(len(cols["label"]), dtype=object)
    labels[:] = cols["label"]
    out = EmbedStage(error_column="error")({**cols, "label": labels})
    emb = out["embedding"]
    assert emb.shape == (len(labels), EMBED_DIM) and emb.dtype == np.float32
    for vec, lab, err in zip(emb, cols["label"], cols["error"]):
        # bit for bit what the per-map function gives: the plan (and its bytes) do not depend on batching
        assert np.array_equal(vec, np.zeros(EMBED_DIM, np.float32) if err else layout_embedding(lab))


def test_index_rows_batch_keeps_what_the_index_needs(tree):
    cols = index_rows_batch(tree["batch"], tree["spec"])
    assert tuple(cols) == INDEX_ROW_COLUMNS
    for lid, err, emb, thumb, meta in zip(*cols.values()):
        if lid in tree["broken"]:
            assert json.loads(err)["stage"] == "exemplar" and meta == "{}"
            continue
        lay, _ = read_item(tree["src"], next(it for it in tree["items"] if it["item_id"] == lid))
        assert err == "" and np.array_equal(emb, layout_embedding(lay.label))
        assert np.array_equal(thumb, index_thumb(lay.label)) and json.loads(meta) == exemplar_meta(lay)


def test_run_index_and_cli_index_are_one_builder(tree, tmp_path):
    _index_from_rows(tmp_path / "run", tree)
    good = [read_item(tree["src"], it)[0] for it in tree["items"] if it["item_id"] not in tree["broken"]]
    build_exemplar_index(good, tmp_path / "cli", 1, seed=0)
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "cli").iterdir()) and len(files) >= 3
    for name in files:
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes(), name


def test_plan_retrieve_stage_skips_quarantined_rows_and_never_matches_self(tree, tmp_path):
    _index_from_rows(tmp_path / "idx", tree)
    cols = read_and_augment_batch(tree["batch"], tree["spec"], AUG, run_seed=0)
    batch = EmbedStage(error_column="error")(cols)
    out = PlanRetrieveStage(str(tmp_path / "idx"), k=2, candidates=4, diversity=0.3, filters={}, exclude_self=True)(batch)
    assert tuple(out) == ("layout_id", "item", "augment", "error", "matches")
    for lid, err, matches in zip(out["layout_id"], out["error"], out["matches"]):
        if err:
            assert matches == ""
            continue
        ids = [m["id"] for m in json.loads(matches)]
        assert len(ids) == 2 and lid not in ids and not set(ids) & set(tree["broken"])


def test_load_groups_batch_is_load_group_per_row(tree):
    items = {it["item_id"]: it for it in tree["items"]}
    good = [k for k in items if k not in tree["broken"]]
    rec = record_json({"v": 1, "in": [32, 64], "out": [32, 64], "ops": []})
    groups = [{"shard": 0, "exemplar_id": ex, "exemplar_item": item_json(items[ex]),
               "members": [{"sample_id": f"s{i}", "target_id": t, "target_item": item_json(items[t]), "augment": rec,
                            "seed": i, "position": i} for i, t in enumerate(good[2:4])]}
              for ex in (good[0], next(iter(tree["broken"])))]
    cols = load_groups_batch({"group": np.array([json.dumps(g) for g in groups], dtype=object)},
                             tree["spec"], tree["spec"])
    assert tuple(cols) == GROUP_COLUMNS
    for j, g in enumerate(groups):
        assert {k: cols[k][j] for k in GROUP_COLUMNS} == load_group(g, tree["spec"], tree["spec"])
    assert cols["payload"][1] == b"" and len(json.loads(cols["error"][1])) == 2
