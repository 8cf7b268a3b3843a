import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from amgen_core.labels import LabelError
from amgen_core.image_io import SizeMismatchError, decode_png
from connectors.parquet_sink import (
    ERROR_SCHEMA, SAMPLE_SCHEMA, SinkError, read_errors, read_manifest, shard_path, shard_stats_from_file,
    write_manifest, write_shard,
)
from test_sink_fixtures import H, W, make_rows, write_small_dataset


def _load(*args, tmp_path, **kw):
    import datasets
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    return datasets.load_dataset(*args, cache_dir=str(tmp_path / "hf_cache"), split="train", **kw)


@pytest.mark.parametrize("how", ["data_dir", "folder"])
def test_load_dataset_decodes_image_label_instance(tmp_path, how):
    import datasets
    out = tmp_path / "out"
    write_small_dataset(out, scores=True)
    if how == "data_dir":
        ds = _load("parquet", data_dir=str(out / "data"), tmp_path=tmp_path)
    else:
        ds = _load(str(out), tmp_path=tmp_path)
    assert len(ds) == 6  # the errors/ parquet is not picked up as data
    for col in ("image", "label", "instance"):
        assert isinstance(ds.features[col], datasets.Image)
    rows = {r["sample_id"]: r for r in make_rows(3, seed=0, start=0, scores=True) + make_rows(3, seed=1, start=3, scores=True)}
    for rec in ds:
        want = rows[rec["sample_id"]]
        assert rec["image"].mode == "RGB" and np.array_equal(np.asarray(rec["image"]), want["image"])
        label = np.asarray(rec["label"])
        assert label.dtype == np.uint8 and np.array_equal(label, want["label"])
        if want["instance"] is None:
            assert rec["instance"] is None
        else:
            inst = np.asarray(rec["instance"])
            assert inst.dtype == np.uint16 and np.array_equal(inst, want["instance"])
        assert json.loads(rec["augment"]) == want["augment"]
        assert rec["score_miou"] == want["score_miou"]
        assert rec["model"] == "toy@0123abcd" and rec["seed"] == want["seed"]


def test_shard_bytes_are_deterministic_and_order_free(tmp_path):
    rows = make_rows(5, seed=3)
    a = write_shard(rows, tmp_path / "a", 0, 1)
    b = write_shard(rows[::-1], tmp_path / "b", 0, 1)
    assert a.sha256 == b.sha256
    assert (tmp_path / "a" / a.name).read_bytes() == (tmp_path / "b" / b.name).read_bytes()
    # A fresh interpreter (other hash seed, other allocation) writes the same bytes.
    code = ("import sys; sys.path.insert(0, 'tests'); from test_sink_fixtures import make_rows;"
            "from connectors.parquet_sink import write_shard;"
            f"print(write_shard(make_rows(5, seed=3), {str(tmp_path / 'c')!r}, 0, 1).sha256)")
    env = dict(os.environ, PYTHONHASHSEED="123")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(__file__)), check=True)
    assert res.stdout.strip().splitlines()[-1] == a.sha256
    meta = pq.read_metadata(tmp_path / "a" / a.name)
    assert set(meta.metadata) == {b"ARROW:schema", b"huggingface"}


def test_shard_layout_stats_and_row_groups(tmp_path):
    rows = make_rows(7)
    st = write_shard(rows, tmp_path, 2, 4, row_group_size=3)
    assert st.name == "data/train-00002-of-00004.parquet" and (tmp_path / st.name).is_file()
    pf = pq.ParquetFile(tmp_path / st.name)
    assert pf.metadata.num_rows == 7 and st.row_groups == pf.metadata.num_row_groups == 3
    assert pf.schema_arrow.equals(SAMPLE_SCHEMA, check_metadata=False)
    ids = pf.read(columns=["sample_id"]).column(0).to_pylist()
    assert ids == sorted(ids)
    want = np.bincount(np.concatenate([r["label"].ravel() for r in rows]), minlength=34)
    assert st.label_pixels == want.tolist() and sum(st.label_pixels) == 7 * H * W
    again = shard_stats_from_file(tmp_path / st.name)
    assert (again.sha256, again.rows, again.label_pixels, again.index, again.total) == (
        st.sha256, st.rows, st.label_pixels, 2, 4)
    assert sorted(os.listdir(tmp_path / "data")) == [os.path.basename(st.name)]  # no temp leftovers


def test_bytes_input_is_stored_as_is(tmp_path):
    from amgen_core.image_io import encode_png
    row = make_rows(1)[0]
    png = encode_png(row["image"])
    row["image"] = png
    row["label"] = {"bytes": encode_png(row["label"]), "path": None}
    write_shard([row], tmp_path, 0, 1)
    cell = pq.read_table(shard_path(tmp_path, 0, 1)).column("image")[0].as_py()
    assert cell["bytes"] == png and cell["path"] == "s00000_image.png"


@pytest.mark.parametrize("mutate, err, match", [
    (lambda r: r.update(label=np.full((H, W), 99, np.uint8)), LabelError, r"s00000 label.*\[99\]"),
    (lambda r: r.update(label=np.zeros((H, W + 2), np.uint8)), SizeMismatchError, "s00000"),
    (lambda r: r.update(extra=1), SinkError, r"unexpected columns \['extra'\]"),
    (lambda r: r.pop("seed"), SinkError, r"missing columns \['seed'\]"),
    (lambda r: r.update(augment="{not json"), SinkError, "augment"),
    (lambda r: r.update(score_other=0.5), SinkError, "score_other"),
])
def test_bad_rows_fail_and_leave_no_shard(tmp_path, mutate, err, match):
    rows = make_rows(2)
    mutate(rows[0])
    with pytest.raises(err, match=match):
        write_shard(rows, tmp_path, 0, 1)
    assert not (tmp_path / "data").exists() or os.listdir(tmp_path / "data") == []


def test_argument_checks(tmp_path):
    with pytest.raises(SinkError, match="row_group_size"):
        write_shard(make_rows(1), tmp_path, 0, 1, row_group_size=101)
    with pytest.raises(SinkError, match="index"):
        write_shard(make_rows(1), tmp_path, 3, 3)
    dup = make_rows(2)
    dup[1]["sample_id"] = dup[0]["sample_id"]
    with pytest.raises(SinkError, match="duplicate"):
        write_shard(dup, tmp_path, 0, 1)
    with pytest.raises(SinkError, match="shards"):
        write_manifest(tmp_path, {"counts": {}})


def test_errors_manifest_and_card(tmp_path):
    stats = write_small_dataset(tmp_path)
    errs = read_errors(tmp_path)
    assert errs == [{"input_id": "bad/item", "source": "toy", "stage": "read",
                     "reason": "ValueError: x.png: cannot decode", "path": "x.png"}]
    assert pq.read_schema(tmp_path / "errors" / "read.parquet").equals(ERROR_SCHEMA, check_metadata=False)
    man = read_manifest(tmp_path)
    assert [s["sha256"] for s in man["shards"]] == [s.sha256 for s in stats]
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["task_categories"] == ["image-segmentation"]
    assert header["configs"][0]["data_files"][0]["path"] == "data/train-*"
    feats = {f["name"]: f["dtype"] for f in header["dataset_info"]["features"]}
    assert feats["image"] == feats["label"] == feats["instance"] == "image"
    assert "| 26 | car | 13 | vehicle |" in text and "license" in header
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    # label PNGs are 8-bit single channel as written
    cell = pq.read_table(tmp_path / stats[0].name).column("label")[0].as_py()
    assert decode_png(cell["bytes"]).dtype == np.uint8


def test_an_all_quarantined_shard_is_empty_but_loadable(tmp_path):
    from connectors.parquet_sink import write_dataset_card, write_errors
    from connectors.verify import verify_dataset
    s0 = write_shard(make_rows(2), tmp_path, 0, 2)
    s1 = write_shard([], tmp_path, 1, 2)
    assert (s1.rows, s1.row_groups) == (0, 0)  # a 0-row row group would break datasets' reader
    write_errors([], tmp_path, "empty")
    write_dataset_card(tmp_path, {"num_samples": 2, "num_shards": 2})
    write_manifest(tmp_path, {"shards": [s0, s1]})
    assert verify_dataset(tmp_path).ok
    assert len(_load(str(tmp_path), tmp_path=tmp_path)) == 2
    assert read_errors(tmp_path) == []
