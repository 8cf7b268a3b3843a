"""The quality gate (``gate.enabled``): off, nothing changes; on, samples the judge scores under the
threshold leave the shards for ``filtered/`` with their scores, the card and the manifest count them
by reason, a crashed run resumes to the same bytes, and verify knows the table."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
from ray.util.annotations import RayDeprecationWarning

from pipeline.config import config_from_dict, config_hash
from test_pipeline_fixtures import file_digests, make_toytown, run_tree, tiny_model_dir

N_TARGETS = 12


def test_gate_off_keeps_the_config_hash_of_every_older_run():
    """The hash is in every sample row: unchanged hash, unchanged bytes. The golden value is the
    hash this config had before the gate existed (commit dea2fd9)."""
    tree = {"source": {"kind": "toytown", "root": "/no/such/toy"}, "model": {"path": "/no/such/model", "steps": 2}}
    golden = "5fb7189bc22d791fcc86aa88e0a5973c1e0ac40e1ae393c32cb56d78a33102f8"
    assert config_hash(config_from_dict(tree)) == golden
    assert config_hash(config_from_dict({**tree, "gate": {"enabled": False, "threshold": 0.9}})) == golden
    assert config_hash(config_from_dict({**tree, "gate": {"enabled": True}})) != golden
    # A gate without label_trusted keeps the hash it had before that key (commit b3bef11).
    gated = "a087959b8c91d6aba8ca08af4ad8c0dbff02ba1e6041e8650c44e734f6332311"
    assert config_hash(config_from_dict({**tree, "gate": {"enabled": True, "label_trusted": False}})) == gated
    assert config_hash(config_from_dict({**tree, "gate": {"enabled": True, "label_trusted": True}})) != gated


def test_gate_reason_and_config_errors():
    from pipeline.config import ConfigError
    from stages.gate import gate_reason

    assert gate_reason(0.5, 0.3) == "" and gate_reason(0.3, 0.3) == ""
    assert gate_reason(0.29, 0.3) == "below_threshold" and gate_reason(float("nan"), 0.3) == "unscored"
    with pytest.raises(ConfigError, match="gate.threshold"):
        config_from_dict({"source": {"root": "x"}, "gate": {"threshold": 1.5}})
    with pytest.raises(ConfigError, match="gate.metric"):
        config_from_dict({"source": {"root": "x"}, "gate": {"metric": "psnr"}})


def test_thing_metric_scores_the_objects_and_falls_back_to_all_classes():
    """judge_thing_miou: a rendering that draws the road but not the layout's car scores 0, where
    the all-class mean gives it half; a scene without things scores as judge_miou."""
    from amgen_core.labels import NAME_TO_ID
    from evaluation.metrics import mean_iou
    from stages.gate import GateScorer, thing_miou
    from stages.score import sample_confusion

    label = np.full((4, 8), NAME_TO_ID["road"], np.uint8)
    label[1:3, 2:5] = NAME_TO_ID["car"]
    no_car = np.zeros((4, 8), np.uint8)  # trainId 0 = road everywhere
    cm = sample_confusion(no_car, label)
    assert thing_miou(cm) == 0.0 and 0.4 < mean_iou(cm) < 0.6
    drawn = sample_confusion(np.where(label == NAME_TO_ID["car"], 13, 0).astype(np.uint8), label)
    assert thing_miou(drawn) == 1.0
    road_only = sample_confusion(no_car, np.full((4, 8), NAME_TO_ID["road"], np.uint8))
    assert thing_miou(road_only) == mean_iou(road_only) == 1.0
    gate = object.__new__(GateScorer)  # the columns only: no judge loaded
    gate.metric = "judge_thing_miou"
    gate.label_trusted, gate.threshold = False, 0.5
    cols = gate._columns({0: cm, 2: drawn}, 3, {}, {0: label, 2: label})  # row 1: quarantined, not judged
    assert cols["gate_score"][0] == 0.0 and cols["gate_score"][2] == 1.0 and np.isnan(cols["gate_score"][1])
    assert list(cols["gate_reason"]) == ["below_threshold", "", ""]  # the quarantined row passes to errors/
    assert cols["score_miou"][0] == mean_iou(cm)  # the score stage's column is unchanged
    with pytest.raises(ValueError, match="judge_thing_miou"):
        GateScorer(None, 1, metric="psnr")


def test_trusted_label_leaves_out_the_pixels_the_judge_reads_as_another_class():
    """A car the rendering did not draw (the judge sees road there) leaves label_trusted; the road
    the judge agrees with stays, and pixels the label already ignores stay as they were."""
    from amgen_core.image_io import decode_png
    from amgen_core.labels import NAME_TO_ID
    from stages.gate import GateScorer, trusted_label
    from stages.score import sample_confusion

    road, car = NAME_TO_ID["road"], NAME_TO_ID["car"]
    label = np.full((4, 8), road, np.uint8)
    label[1:3, 2:5] = car
    label[0, 0] = NAME_TO_ID["ego vehicle"]  # trainId 255 in the label itself
    pred = np.zeros((4, 8), np.uint8)  # trainId 0 (road) everywhere
    pred[3, 7] = 8  # vegetation where the label says road
    want = label.copy()
    want[1:3, 2:5] = 0
    want[3, 7] = 0
    assert np.array_equal(trusted_label(label, pred), want)
    gate = object.__new__(GateScorer)
    gate.metric, gate.label_trusted, gate.threshold = "judge_miou", True, 0.0
    cols = gate._columns({0: sample_confusion(pred, label)}, 2, {0: pred}, {0: label})
    assert np.array_equal(decode_png(cols["label_trusted"][0], "t", "label"), want)
    assert cols["label_trusted"][1] == b""  # unscored: the gate filters it, no shard gets it
    gate.threshold = 1.0  # the sample scores under it: filtered, so no label_trusted is encoded
    assert gate._columns({0: sample_confusion(pred, label)}, 1, {0: pred}, {0: label})["label_trusted"][0] == b""


def test_eval_segmenter_trains_on_label_trusted_where_the_dataset_has_it(tmp_path):
    from connectors.parquet_source import ParquetSource
    from pipeline.cli_eval import trained_label_column
    from test_sink_fixtures import write_small_dataset

    write_small_dataset(tmp_path / "plain", n_shards=1, rows_per_shard=2)
    write_small_dataset(tmp_path / "trusted", n_shards=1, rows_per_shard=2, trusted=True)
    assert trained_label_column(tmp_path / "plain") == "label"
    assert trained_label_column(tmp_path / "trusted") == "label_trusted"
    src = ParquetSource(tmp_path / "trusted", label_column="label_trusted")
    layout = src.read_item(src.list_items()[0])
    assert (layout.label[:, :layout.label.shape[1] // 3] == 0).all()  # what the fixture left out


def test_writer_sends_marked_rows_to_filtered_and_clears_a_stale_table(tmp_path):
    from connectors.filtered_sink import FILTERED_SCHEMA, filtered_counts
    from stages.write import ShardWriter
    from test_stages import _sample_row

    rows = [_sample_row(i, 0) for i in range(4)]
    for r, reason, score in zip(rows, ["", "below_threshold", "", "unscored"], [0.8, 0.1, 0.5, np.nan]):
        r.update(gate_reason=reason, gate_score=score, gate_metric="judge_miou", gate_threshold=0.3)
    w = ShardWriter(tmp_path, {0: [r["sample_id"] for r in rows]}, 1, "h" * 8)
    for r in rows:
        w.add(r)
    kept = pq.read_table(tmp_path / "data" / "train-00000-of-00001.parquet")
    assert sorted(kept["sample_id"].to_pylist()) == sorted(r["sample_id"] for r in rows if not r["gate_reason"])
    table = pq.read_table(tmp_path / "filtered" / "shard-00000.parquet")
    assert table.schema.names == FILTERED_SCHEMA.names
    got = {r["sample_id"]: r for r in table.to_pylist()}
    assert {sid: (g["reason"], g["gate_score"]) for sid, g in got.items()} == {
        rows[1]["sample_id"]: ("below_threshold", 0.1), rows[3]["sample_id"]: ("unscored", None)}
    assert all(g["image"]["bytes"] and g["label"]["bytes"] and g["gate_threshold"] == 0.3 for g in got.values())
    assert filtered_counts(tmp_path) == {"below_threshold": 1, "unscored": 1}
    # The same shard made again with nothing filtered leaves no table of the earlier attempt.
    w = ShardWriter(tmp_path, {0: [r["sample_id"] for r in rows]}, 1, "h" * 8)
    for r in rows:
        w.add({**r, "gate_reason": ""})
    assert not (tmp_path / "filtered" / "shard-00000.parquet").exists() and filtered_counts(tmp_path) == {}


# ----------------------------------------------------------------------------- through Ray


def road_judge(path):
    """A tiny judge that sees road everywhere: a sample's score is its road IoU over its classes,
    which differs from layout to layout (a random tiny judge scores every sample 0)."""
    import torch

    from evaluation.segmenter import Segmenter
    from test_stages import tiny_segmenter

    model = Segmenter.from_pretrained(tiny_segmenter(path))
    with torch.no_grad():
        model.head.bias[0] = 100.0  # trainId 0: road
    return model.save_pretrained(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import ray

    base = tmp_path_factory.mktemp("gate")
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield {"base": base, "tree": make_toytown(base / "toy", N_TARGETS), "model": tiny_model_dir(base / "model"),
               "seg": str(road_judge(base / "seg"))}
    finally:
        ray.shutdown()


def run(world, out, fail_after_shards=None, **sections):
    from pipeline.run import run_pipeline

    sections.setdefault("score", {}).update(segmenter=world["seg"])
    cfg = config_from_dict(run_tree(world["tree"], world["model"], out, **sections))
    return run_pipeline(cfg, fail_after_shards=fail_after_shards)


@pytest.fixture(scope="module")
def scored(world):
    """Every sample's judge score, from a run that scores but does not gate."""
    out = world["base"] / "scored"
    run(world, out, score={"enabled": True})
    return {r["sample_id"]: r["score_miou"] for p in sorted((out / "data").glob("*.parquet"))
            for r in pq.read_table(p, columns=["sample_id", "score_miou"]).to_pylist()}


def split_threshold(scores: dict) -> float:
    """A threshold between two distinct scores near the middle: some samples fall under it, some not."""
    values = np.unique(list(scores.values()))
    assert len(values) > 1, f"the tiny judge gives every sample the same score {values}"
    k = len(values) // 2
    return float((values[k - 1] + values[k]) / 2)


def test_gate_filters_exactly_the_low_scores_and_counts_them(world, scored):
    from connectors.verify import verify_dataset

    threshold = split_threshold(scored)
    low = {sid for sid, v in scored.items() if v < threshold}
    assert 0 < len(low) < N_TARGETS
    out = world["base"] / "gated"
    with warnings.catch_warnings():
        # The scorers are plain Ray actors (pipeline/scoring_actors.py): no deprecated Ray Data argument.
        warnings.simplefilter("error", RayDeprecationWarning)
        s = run(world, out, score={"enabled": True}, gate={"enabled": True, "threshold": threshold})
    kept = {r["sample_id"]: r["score_miou"] for p in sorted((out / "data").glob("*.parquet"))
            for r in pq.read_table(p, columns=["sample_id", "score_miou"]).to_pylist()}
    filtered = [r for p in sorted((out / "filtered").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert {r["sample_id"] for r in filtered} == low and set(kept) == set(scored) - low
    assert all(r["gate_score"] == pytest.approx(scored[r["sample_id"]]) and r["reason"] == "below_threshold"
               for r in filtered)
    assert all(v >= threshold for v in kept.values())
    assert (s.written, s.filtered, s.filtered_by_reason) == (N_TARGETS - len(low), len(low), {"below_threshold": len(low)})
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["filtered"] == len(low) and counts["filtered_by_reason"] == {"below_threshold": len(low)}
    assert counts["gate"]["threshold"] == threshold
    assert f"{len(low)} sample(s) filtered (below_threshold: {len(low)})" in (out / "README.md").read_text()
    report = verify_dataset(out)
    assert report.ok, report.summary()
    assert report.counts["filtered"] == len(low)
    # verify notices a filtered table that disagrees with the manifest.
    copy = world["base"] / "gated_copy"
    shutil.copytree(out, copy)
    victim = sorted((copy / "filtered").glob("*.parquet"))[0]
    table = pq.read_table(victim)
    pq.write_table(table.slice(0, table.num_rows - 1), victim)
    assert any("counts.filtered" in p for p in verify_dataset(copy).problems)


def test_label_trusted_is_the_label_where_the_judge_agrees_and_datasets_loads_it(world, scored):
    """The road judge sees road everywhere: each kept sample's label_trusted is its label's road
    (and its already-ignored pixels), 0 elsewhere; the column is an Image to HF datasets, the card
    names it, and verify checks it."""
    import datasets

    from amgen_core.image_io import decode_png
    from amgen_core.labels import IGNORE_TRAIN_ID, NAME_TO_ID, to_train_ids
    from connectors.verify import verify_dataset

    out = world["base"] / "trusted"
    s = run(world, out, gate={"enabled": True, "threshold": 0.0, "label_trusted": True})
    assert s.written == N_TARGETS and s.filtered == 0
    rows = [r for p in sorted((out / "data").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(rows) == N_TARGETS
    for r in rows:
        label = decode_png(r["label"]["bytes"], "label", "label")
        trusted = decode_png(r["label_trusted"]["bytes"], "label_trusted", "label")
        keep = (label == NAME_TO_ID["road"]) | (to_train_ids(label) == IGNORE_TRAIN_ID)
        assert np.array_equal(trusted, np.where(keep, label, 0))
    assert any((decode_png(r["label_trusted"]["bytes"], "t", "label") == 0).any() for r in rows)
    ds = datasets.load_dataset("parquet", data_dir=str(out / "data"), split="train")
    assert isinstance(ds.features["label_trusted"], datasets.Image)
    assert "`label_trusted`" in (out / "README.md").read_text()
    report = verify_dataset(out)
    assert report.ok, report.summary()


def test_gate_off_writes_no_filtered_table_and_no_gate_counts(world, scored):
    out = world["base"] / "scored"
    assert not (out / "filtered").exists()
    assert "filtered" not in json.loads((out / "manifest.json").read_text())["counts"]
    assert "quality gate" not in (out / "README.md").read_text()


def test_gated_run_resumes_after_a_crash_to_the_same_bytes_and_counts(world, scored):
    whole = world["base"] / "gated"  # made by the test above, with these same sections
    if not (whole / "manifest.json").is_file():
        pytest.skip("needs test_gate_filters_exactly_the_low_scores_and_counts_them")
    sections = {"score": {"enabled": True}, "gate": {"enabled": True, "threshold": split_threshold(scored)}}
    first = json.loads((whole / "manifest.json").read_text())["counts"]
    crashed = world["base"] / "gated_crashed"
    with pytest.raises(RuntimeError, match="injected failure after 1 shard"):
        run(world, crashed, fail_after_shards=1, **json.loads(json.dumps(sections)))
    resumed = run(world, crashed, **json.loads(json.dumps(sections)))
    assert resumed.mode == "resume" and resumed.shards_skipped == 1
    assert file_digests(crashed) == file_digests(whole)
    assert sorted(p.name for p in (crashed / "filtered").iterdir()) == sorted(p.name for p in (whole / "filtered").iterdir())
    for p in (whole / "filtered").glob("*.parquet"):
        assert (crashed / "filtered" / p.name).read_bytes() == p.read_bytes()
    again = run(world, crashed, **json.loads(json.dumps(sections)))  # nothing to do: the counts come from disk
    assert again.synthesized == 0
    assert (again.filtered, again.filtered_by_reason) == (first["filtered"], first["filtered_by_reason"])
    assert json.loads((crashed / "manifest.json").read_text())["counts"]["filtered"] == first["filtered"]
