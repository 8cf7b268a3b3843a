"""Resume over damage: a finished shard that is missing, unreadable or whose sha256 differs from the
manifest is moved aside and listed to be made again (the e2e rerun is in test_pipeline_e2e.py)."""
from __future__ import annotations

import time

from connectors.parquet_sink import MANIFEST_NAME, shard_path
from pipeline.resume import DAMAGED_DIR, audit_shards
from test_sink_fixtures import write_small_dataset

FIXED_CLOCK = lambda: time.gmtime(0)  # noqa: E731


def test_sound_shards_are_done_with_the_manifest_stats(tmp_path):
    stats = write_small_dataset(tmp_path, n_shards=3)
    audit = audit_shards(tmp_path, 3)
    assert audit.done == {0, 1, 2} and audit.remade == []
    assert [audit.stats[i].sha256 for i in range(3)] == [s.sha256 for s in stats]
    assert not (tmp_path / DAMAGED_DIR).exists()


def test_truncated_shard_is_moved_aside_and_remade(tmp_path):
    write_small_dataset(tmp_path, n_shards=3)
    p = shard_path(tmp_path, 1, 3)
    original = p.read_bytes()
    p.write_bytes(original[: len(original) // 2])
    audit = audit_shards(tmp_path, 3, clock=FIXED_CLOCK)
    assert audit.done == {0, 2} and set(audit.stats) == {0, 2}
    (r,) = audit.remade
    assert r.shard == 1 and r.name == "data/train-00001-of-00003.parquet" and "sha256 differs" in r.reason
    moved = tmp_path / r.moved_to
    assert r.moved_to == f"{DAMAGED_DIR}/19700101T000000Z/train-00001-of-00003.parquet"
    assert moved.read_bytes() == original[: len(original) // 2] and not p.exists()


def test_deleted_shard_is_listed_as_missing(tmp_path):
    write_small_dataset(tmp_path, n_shards=3)
    shard_path(tmp_path, 2, 3).unlink()
    audit = audit_shards(tmp_path, 3)
    assert audit.done == {0, 1}
    assert [(r.shard, r.reason, r.moved_to) for r in audit.remade] == [(2, "missing", None)]


def test_without_a_manifest_an_unreadable_shard_is_damaged(tmp_path):
    write_small_dataset(tmp_path, n_shards=2)
    (tmp_path / MANIFEST_NAME).unlink()
    shard_path(tmp_path, 0, 2).write_bytes(b"not parquet at all")
    audit = audit_shards(tmp_path, 2, clock=FIXED_CLOCK)
    assert audit.done == {1} and audit.stats[1].rows == 3
    (r,) = audit.remade
    assert r.shard == 0 and r.reason.startswith("unreadable (") and (tmp_path / r.moved_to).is_file()


def test_a_damaged_manifest_does_not_hide_a_sound_shard(tmp_path):
    write_small_dataset(tmp_path, n_shards=2)
    (tmp_path / MANIFEST_NAME).write_text("{ truncated")
    audit = audit_shards(tmp_path, 2)
    assert audit.done == {0, 1} and audit.remade == []
