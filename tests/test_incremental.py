"""Incremental runs for schedules: a rerun over a source that grew plans and synthesizes only the
new targets, appends their shards under stable names, and never rewrites a finished shard."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pipeline.config import config_from_dict
from test_pipeline_fixtures import H, W, file_digests, make_toytown, run_tree, tiny_model_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_a_grown_source_adds_only_its_new_samples_in_new_shards(tmp_path, ray_local):
    import datasets
    from toytown import make_tree

    from pipeline.cli import app
    from pipeline.run import run_pipeline

    tree, model, out = make_toytown(tmp_path / "toy", 32), tiny_model_dir(tmp_path / "model"), tmp_path / "out"
    cfg = config_from_dict(run_tree(tree, model, out), where=str(tmp_path / "cfg.yaml"))
    first = run_pipeline(cfg)
    assert (first.mode, first.synthesized, first.shards) == ("new", 32, 8)
    before = file_digests(out)

    make_tree(tree, 16, seed=0, height=H, width=W, start=32)  # the scheduled source gained 16 scenes
    grown = run_pipeline(cfg)
    assert (grown.mode, grown.synthesized, grown.shards_written, grown.shards_skipped) == ("increment", 16, 4, 8)
    after = file_digests(out)
    assert {k: after[k] for k in before} == before, "a finished shard was rewritten"
    new = sorted(set(after) - set(before))
    assert new == [f"data/train-{k:05d}.parquet" for k in range(8, 12)], new  # stable names, after the first 8

    manifest = json.loads((out / "manifest.json").read_text())
    incs = manifest["increments"]
    assert [(i["increment"], i["targets"], i["samples"], i["first_shard"], i["num_shards"]) for i in incs] == \
        [(0, 32, 32, 0, 8), (1, 16, 16, 8, 4)]
    assert incs[0]["exemplars_indexed"] == 32 and incs[1]["exemplars_indexed"] == 48
    assert incs[0]["exemplar_set_sha256"] != incs[1]["exemplar_set_sha256"]
    assert [r["mode"] for r in manifest["runs"]] == ["new", "increment"] and len(manifest["shards"]) == 12
    assert "increments: 0: 32 targets" in (out / "README.md").read_text()
    res = CliRunner().invoke(app, ["verify", str(out)])
    assert res.exit_code == 0, res.output
    # A fresh cache: datasets 5.2 caches a folder by its name and card patterns, not by its files,
    # so an earlier load of any folder named "out" would answer from the cache.
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert len(ds) == 48 and len(set(ds["sample_id"])) == 48

    again = run_pipeline(cfg)  # nothing new: a plain resume that changes no byte
    assert (again.mode, again.synthesized, again.shards_skipped) == ("resume", 0, 12)
    assert file_digests(out) == after
