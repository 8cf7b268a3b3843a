"""The writer actor's contract with the driver (as a plain object, without Ray): rows in, only
counts and the stats of finished shards out; duplicates from retried tasks are not counted twice;
a mixed model or the crash hook stop it with a message the driver raises; an increment's shards
get stable names."""
from __future__ import annotations

import json

import pytest

from pipeline.shard_writers import ShardWriterActor, raise_problem
from stages.write import ModelMismatchError
from test_stages import _sample_row


def test_the_writer_returns_stats_not_samples_and_counts_each_sample_once(tmp_path):
    w = ShardWriterActor(str(tmp_path), {0: ["s0", "s1"], 1: ["s2"]}, 2, "c" * 64, (), None)
    first = w.add([_sample_row(0, 0), _sample_row(2, 1)])
    assert set(first) == {"taken", "synthesized", "quarantined", "banks_new", "model_seconds", "model_cpu_seconds",
                          "model", "completed", "problem"}
    assert all(not isinstance(v, (bytes, bytearray)) for v in first.values())
    done = json.loads(first["completed"])
    assert (first["taken"], [d["name"] for d in done]) == (2, ["data/train-00001-of-00002.parquet"])
    assert done[0]["sha256"] and done[0]["rows"] == 1
    again = w.add([_sample_row(0, 0), _sample_row(1, 0)])  # a retried task delivers s0 again
    assert (again["taken"], again["synthesized"]) == (1, 1) and len(json.loads(again["completed"])) == 1
    assert w.pending() == [] and (tmp_path / "data" / "train-00000-of-00002.parquet").is_file()


def test_a_mixed_model_and_the_crash_hook_come_back_as_problems(tmp_path):
    w = ShardWriterActor(str(tmp_path), {0: ["s0", "s1"]}, 1, "c" * 64, (), "toy@1")
    res = w.add([_sample_row(0, 0, model="other@2")])
    assert res["taken"] == 0 and res["problem"].startswith("ModelMismatchError: ")
    with pytest.raises(ModelMismatchError, match="other@2"):
        raise_problem(res["problem"])
    stop = ShardWriterActor(str(tmp_path / "b"), {0: ["s0"], 1: ["s1"]}, 2, "c" * 64, (), None, stop_after=1)
    res = stop.add([_sample_row(0, 0), _sample_row(1, 1)])
    assert len(json.loads(res["completed"])) == 1 and "injected failure after 1 shard" in res["problem"]
    assert stop.pending() == [1]


def test_an_increments_shards_get_stable_names(tmp_path):
    w = ShardWriterActor(str(tmp_path), {2: ["s0"]}, {0: 2, 1: 2, 2: None}, "c" * 64, (), None)
    res = w.add([_sample_row(0, 2)])
    assert [d["name"] for d in json.loads(res["completed"])] == ["data/train-00002.parquet"]
