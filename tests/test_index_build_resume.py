"""Streaming and resumable index builds (connectors/index_staging.py, stages.retrieve.build_exemplar_index_parts)."""
import json
import weakref

import numpy as np
import pytest
from typer.testing import CliRunner

import stages.retrieve as retrieve
from amgen_core.records import Layout
from connectors.index_staging import IndexBuilder, staging_dir
from connectors.index_store import ShardedIndex
from stages.retrieve import build_exemplar_index, build_exemplar_index_parts

IDS = np.array([7, 8, 11, 21, 23, 24, 26], np.uint8)   # road, sidewalk, building, vegetation, sky, person, car


class Killed(BaseException):
    """Stands for SIGKILL / Ctrl-C: not an Exception, so nothing on the way swallows it."""


def layout(i: int) -> Layout:
    rng = np.random.default_rng(i)
    label = IDS[rng.integers(0, len(IDS), (4, 8))].repeat(4, 0).repeat(4, 1)
    return Layout(layout_id=f"lay-{i:04d}", source="toytown", label=label, meta={"domain": ("day", "night")[i % 2]})


def make_parts(n_parts: int, per_part: int, calls: list[int], kill_in: int | None = None):
    def part(p: int):
        calls.append(p)
        for j in range(per_part):
            if p == kill_in and j == per_part // 2:
                raise Killed(f"killed in part {p}")
            yield layout(p * per_part + j)
    return [lambda p=p: part(p) for p in range(n_parts)]


IVF = {"ivf_threshold": 20, "nlist": 8, "nprobe": 2, "seed": 3}


def files_of(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_killed_build_resumes_from_sealed_parts_and_equals_a_clean_build(tmp_path):
    clean, _ = build_exemplar_index_parts(make_parts(4, 30, []), tmp_path / "clean", 3, **IVF)
    out = tmp_path / "idx"
    calls: list[int] = []
    with pytest.raises(Killed):
        build_exemplar_index_parts(make_parts(4, 30, calls, kill_in=2), out, 3, resume=True, **IVF)
    assert calls == [0, 1, 2] and not out.exists()
    sealed = sorted(p.name for p in staging_dir(out).glob("part-*.json"))
    assert sealed == ["part-00000.json", "part-00001.json"]          # the killed part is not sealed

    calls.clear()
    index, stats = build_exemplar_index_parts(make_parts(4, 30, calls), out, 3, resume=True, **IVF)
    assert calls == [2, 3] and stats.parts_resumed == 2 and len(index) == 120
    assert not staging_dir(out).exists()
    assert files_of(out) == files_of(tmp_path / "clean")              # same bytes as one uninterrupted run
    q = retrieve.embed_layouts([layout(i).label for i in range(5)])
    assert np.array_equal(index.search(q, 7).rows, clean.search(q, 7).rows)


def test_another_input_does_not_resume_and_restart_starts_over(tmp_path):
    out = tmp_path / "idx"
    with pytest.raises(Killed):
        build_exemplar_index_parts(make_parts(3, 10, [], kill_in=1), out, 1, resume=True)
    calls: list[int] = []
    build_exemplar_index_parts(make_parts(3, 10, calls), out, 1, resume=True, fingerprint={"root": "elsewhere"})
    assert calls == [0, 1, 2]                                         # other fingerprint: nothing reused
    with pytest.raises(Killed):
        build_exemplar_index_parts(make_parts(3, 10, [], kill_in=1), out, 1, resume=True)
    calls.clear()
    build_exemplar_index_parts(make_parts(3, 10, calls), out, 1, resume=False)
    assert calls == [0, 1, 2] and len(ShardedIndex.load(out)) == 30


@pytest.mark.parametrize("codec", ["flat", "pq8x4fs"])
def test_killed_shard_writing_keeps_finished_shards(tmp_path, codec):
    x = np.random.default_rng(0).normal(size=(400, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"v{i}" for i in range(400)]
    labels = np.random.default_rng(1).integers(0, 30, (400, 4, 8)).astype(np.uint8)
    ShardedIndex.build(x, ids, None, tmp_path / "clean", 4, labels=labels, codec=codec, **IVF)

    def stage(out):
        b = IndexBuilder(out, fingerprint={"t": 1}, resume=True)
        if not b.parts_done:
            for lo in range(0, 400, 150):
                b.add(x[lo:lo + 150], ids[lo:lo + 150], None, labels[lo:lo + 150])
                b.seal()
        return b

    def kill_after_two(done, total):
        if done == 2:
            raise Killed("killed while writing shards")

    out = tmp_path / "idx"
    with pytest.raises(Killed):
        stage(out).finish(4, workers=1, progress=kill_after_two, codec=codec, **IVF)
    work = staging_dir(out) / "index"
    done = sorted(p.name[:11] for p in work.glob("*.done.json"))   # the pool may finish one more
    assert done[:2] == ["shard-00000", "shard-00001"] and len(done) < 4 and (work / "quantizer.faiss").is_file()
    kept = {f"{name}.faiss": (work / f"{name}.faiss").stat().st_mtime_ns for name in done}

    seen: list[int] = []
    index = stage(out).finish(4, workers=1, progress=lambda done, total: seen.append(done), codec=codec, **IVF)
    assert seen == list(range(len(kept), 5))                         # finished shards counted as done
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept   # and not rewritten
    assert files_of(out) == files_of(tmp_path / "clean")
    assert index.kind == "ivf" and len(index) == 400 and np.array_equal(index.label(399), labels[399])
    assert index.codec == codec


def test_label_maps_stream_through_one_embedding_batch(tmp_path, monkeypatch):
    """At most one embedding batch of label maps (full or small) is alive at any time."""
    monkeypatch.setattr(retrieve, "THUMB_BATCH", 16)
    live = {"maps": 0, "thumbs": 0}
    peak = {"maps": 0, "thumbs": 0}

    def track(arr, kind):
        live[kind] += 1
        peak[kind] = max(peak[kind], live[kind])
        weakref.finalize(arr, lambda: live.__setitem__(kind, live[kind] - 1))
        return arr

    thumb = retrieve.index_thumb
    monkeypatch.setattr(retrieve, "index_thumb", lambda label, size: track(thumb(label, size), "thumbs"))

    def layouts():
        for i in range(300):
            lay = layout(i)
            lay.label = track(lay.label.copy(), "maps")
            yield lay

    index, stats = build_exemplar_index(layouts(), tmp_path / "idx", 2)
    assert stats.count == 300 and len(index) == 300
    assert peak["maps"] <= 16 + 2, peak          # the batch plus the layout in hand
    assert peak["thumbs"] <= 16, peak
    assert np.array_equal(index.label(299), thumb(layout(299).label, retrieve.DEFAULT_RERANK_SIZE))


def test_builder_rejects_mixed_dims_and_duplicate_ids(tmp_path):
    b = IndexBuilder(tmp_path / "idx")
    b.add(np.ones((2, 4), np.float32), ["a", "b"])
    with pytest.raises(ValueError, match="vectors of dim 3 after dim 4"):
        b.add(np.ones((1, 3), np.float32), ["c"])
    b.seal()
    b.add(np.ones((1, 4), np.float32), ["a"])
    with pytest.raises(ValueError, match="duplicate id 'a'"):
        b.finish(1)
    with pytest.raises(ValueError, match="no layouts to index"):
        IndexBuilder(tmp_path / "empty").finish(1)


def test_cli_build_resumes_after_a_kill(tmp_path, monkeypatch):
    import pipeline.cli_index as cli_index
    from pipeline.cli import app
    from toytown import make_tree

    root = tmp_path / "toy"
    make_tree(root, 12, seed=3, height=32, width=64)
    runner = CliRunner()
    args = ["index", "build", "--source", "toytown", "--root", str(root), "--part-size", "5", "--shards", "2"]
    assert runner.invoke(app, args + ["--out", str(tmp_path / "clean")]).exit_code == 0

    read = cli_index.read_layouts
    calls = []

    def dies_in_third_part(src, items, errors, limit):
        calls.append(len(items))
        if len(calls) == 3:
            raise RuntimeError("killed")   # CliRunner lets a BaseException through
        return read(src, items, errors, limit)

    monkeypatch.setattr(cli_index, "read_layouts", dies_in_third_part)
    out = tmp_path / "idx"
    res = runner.invoke(app, args + ["--out", str(out)])
    assert res.exit_code != 0 and not out.exists() and len(list(staging_dir(out).glob("part-*.json"))) == 2
    calls.clear()
    monkeypatch.setattr(cli_index, "read_layouts", lambda *a: (calls.append(len(a[1])), read(*a))[1])
    res = runner.invoke(app, args + ["--out", str(out)])
    assert res.exit_code == 0, res.output
    assert calls == [2] and "2 part(s) resumed" in res.output        # only the last part (items 10-11) is read
    assert ShardedIndex.load(out).ids.tolist() == ShardedIndex.load(tmp_path / "clean").ids.tolist()
    assert json.loads((out / "manifest.json").read_text())["count"] == 12
