import json

import pytest
from typer.testing import CliRunner

from connectors.index_store import ShardedIndex
from pipeline.cli import app
from pipeline.cli_index import parse_filters

runner = CliRunner()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    from toytown import make_tree

    root = tmp_path_factory.mktemp("toy")
    make_tree(root, 12, seed=3, height=32, width=64)
    return root


def labels_of(root):
    return sorted((root / "gtFine" / "train").rglob("*_gtFine_labelIds.png"))


def test_build_then_query_with_filter_and_exclusion(tree, tmp_path):
    out = tmp_path / "idx"
    res = runner.invoke(app, ["index", "build", "--source", "toytown", "--root", str(tree), "--out", str(out),
                              "--shards", "2"])
    assert res.exit_code == 0, res.output
    assert "12 layouts" in res.output and "2 shard(s), flat" in res.output
    index = ShardedIndex.load(out)
    assert len(index) == 12 and index.num_shards == 2 and index.has_labels

    target = labels_of(tree)[0]
    own_id = target.name.replace("_gtFine_labelIds.png", "")
    res = runner.invoke(app, ["index", "query", "--index", str(out), "--label", str(target), "--k", "3", "--json"])
    assert res.exit_code == 0, res.output
    hits = json.loads(res.stdout.strip().splitlines()[-1])
    assert hits[0]["id"] == own_id and hits[0]["iou"] == 1.0 and len(hits) == 3

    domain = index.meta(index.row_of(own_id))["domain"]
    res = runner.invoke(app, ["index", "query", "--index", str(out), "--label", str(target), "--k", "2",
                              "--exclude", own_id, "--filter", f"domain={domain}", "--json"])
    hits = json.loads(res.stdout.strip().splitlines()[-1])
    assert hits and all(h["id"] != own_id and h["meta"]["domain"] == domain for h in hits)

    res = runner.invoke(app, ["index", "query", "--index", str(out), "--label", str(target), "--k", "2"])
    assert res.exit_code == 0 and "class IoU" in res.output


def test_unreadable_inputs_are_skipped_and_counted(tree, tmp_path):
    import shutil

    bad = tmp_path / "tree"
    shutil.copytree(tree, bad)
    labels_of(bad)[1].write_bytes(b"not a png")
    res = runner.invoke(app, ["index", "build", "--source", "cityscapes", "--root", str(bad),
                              "--out", str(tmp_path / "idx")])
    assert res.exit_code == 0, res.output
    assert "11 layouts" in res.output and "1 unreadable" in res.output
    assert len(ShardedIndex.load(tmp_path / "idx")) == 11


def test_clear_errors(tree, tmp_path):
    res = runner.invoke(app, ["index", "query", "--index", str(tmp_path / "none"), "--label",
                              str(labels_of(tree)[0])])
    assert res.exit_code == 2 and "index folder not found" in res.output
    res = runner.invoke(app, ["index", "build", "--source", "toytown", "--root", str(tmp_path / "nowhere"),
                              "--out", str(tmp_path / "idx")])
    assert res.exit_code == 2 and "nowhere" in res.output
    res = runner.invoke(app, ["index", "build", "--source", "kitti", "--root", str(tree), "--out", str(tmp_path / "i")])
    assert res.exit_code != 0 and "kitti" in res.output


def test_build_with_the_pq_codec(tmp_path):
    """--codec pq<M>x4fs: IVF shards of PQ fast-scan codes with an exact rerank; a bad codec is refused."""
    from toytown import make_tree

    tree = tmp_path / "toy"
    make_tree(tree, 40, seed=4, height=32, width=64)
    out = tmp_path / "pq"
    res = runner.invoke(app, ["index", "build", "--source", "toytown", "--root", str(tree), "--out", str(out),
                              "--shards", "2", "--ivf-threshold", "10", "--nlist", "2", "--codec", "pq220x4fs",
                              "--rerank", "4"])
    assert res.exit_code == 0, res.output
    assert "pq220x4fs, rerank x4" in res.output
    index = ShardedIndex.load(out)
    assert index.kind == "ivf" and index.codec == "pq220x4fs" and index.rerank == 4
    target = labels_of(tree)[0]
    res = runner.invoke(app, ["index", "query", "--index", str(out), "--label", str(target), "--k", "3", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])[0]["iou"] == 1.0
    res = runner.invoke(app, ["index", "build", "--source", "toytown", "--root", str(tree), "--out",
                              str(tmp_path / "bad"), "--codec", "pq7x4fs"])
    assert res.exit_code == 2 and "divide" in res.output


def test_parse_filters():
    assert parse_filters(["domain=night", "year=2020", "domain=fog"]) == {"domain": ["night", "fog"], "year": 2020}
    assert parse_filters(None) is None
    with pytest.raises(Exception, match="key=value"):
        parse_filters(["domain"])


def test_build_from_parquet(tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from amgen_core.image_io import encode_png

    rows = []
    for i in range(6):
        lab = np.full((32, 64), 7, np.uint8)
        lab[: 10 + i] = 23
        img = np.full((32, 64, 3), 40 * i, np.uint8)
        rows.append({"sample_id": f"s{i}", "image": {"bytes": encode_png(img), "path": None},
                     "label": {"bytes": encode_png(lab), "path": None}, "domain": ("day", "night")[i % 2]})
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "train-00000-of-00001.parquet")
    res = runner.invoke(app, ["index", "build", "--source", "parquet", "--root", str(tmp_path),
                              "--out", str(tmp_path / "idx"), "--shards", "2"])
    assert res.exit_code == 0, res.output
    index = ShardedIndex.load(tmp_path / "idx")
    assert len(index) == 6 and index.meta(1)["domain"] == "night"


def test_build_from_bdd100k_and_folder_trees_through_the_run_registry(tmp_path):
    """`amgen index build` opens sources through the registry `amgen run` reads with: every kind works."""
    from connectors.registry import SOURCE_KINDS
    from pipeline.cli_index import SOURCES
    from test_connectors_bdd100k import make_tree as make_bdd
    from test_connectors_folder import make_folder

    assert tuple(SOURCES) == SOURCE_KINDS and {"bdd100k", "folder"} <= set(SOURCES)
    make_bdd(tmp_path / "bdd", n=3)
    res = runner.invoke(app, ["index", "build", "--source", "bdd100k", "--root", str(tmp_path / "bdd"),
                              "--out", str(tmp_path / "idx_bdd")])
    assert res.exit_code == 0, res.output
    assert len(ShardedIndex.load(tmp_path / "idx_bdd")) == 3

    make_folder(tmp_path / "fold", n=2)
    table = tmp_path / "table.yaml"
    table.write_text("0: road\n1: 26\n255: unlabeled\n")
    res = runner.invoke(app, ["index", "build", "--source", "folder", "--root", str(tmp_path / "fold"),
                              "--option", f"label_table={table}", "--out", str(tmp_path / "idx_folder")])
    assert res.exit_code == 0, res.output
    assert len(ShardedIndex.load(tmp_path / "idx_folder")) == 2

    res = runner.invoke(app, ["index", "build", "--source", "folder", "--root", str(tmp_path / "fold"),
                              "--out", str(tmp_path / "idx_none")])
    assert res.exit_code == 2 and "label_table" in res.output
