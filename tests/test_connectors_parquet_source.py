import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from amgen_core.labels import LabelError
from amgen_core.image_io import SizeMismatchError, encode_png
from connectors.parquet_source import ParquetSource
from test_sink_fixtures import make_rows, write_small_dataset


def test_reads_an_amgen_output_back(tmp_path):
    write_small_dataset(tmp_path, n_shards=2, rows_per_shard=3)
    src = ParquetSource(tmp_path)
    assert len(src.files) == 2  # data/ only: errors/ is not layouts
    want = {r["sample_id"]: r for r in make_rows(3, seed=0, start=0) + make_rows(3, seed=1, start=3)}
    items = src.list_items()
    assert [it["item_id"] for it in items] == [f"parquet/{sid}" for sid in sorted(want)]
    layouts = list(src)
    for lay in layouts:
        sid = lay.meta["sample_id"]
        assert np.array_equal(lay.label, want[sid]["label"]) and lay.label.dtype == np.uint8
        assert np.array_equal(lay.image, want[sid]["image"])
        if want[sid]["instance"] is None:
            assert lay.instance is None
        else:
            assert lay.instance.dtype == np.int32 and np.array_equal(lay.instance, want[sid]["instance"])
        assert lay.meta["exemplar_id"] == want[sid]["exemplar_id"] and lay.meta["seed"] == want[sid]["seed"]
    # random access (the read stage reads items out of order)
    lay = src.read_item(items[4])
    assert lay.layout_id == items[4]["item_id"]


def _plain_parquet(path, labels, images=None, paths=None):
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cols = {"label": pa.array([{"bytes": encode_png(l), "path": None} for l in labels], struct)}
    if images is not None:
        cols["image"] = pa.array([None if im is None else {"bytes": None, "path": p}
                                  for im, p in zip(images, paths)], struct)
    pq.write_table(pa.table(cols), path)


def test_any_parquet_with_image_structs_and_path_only_cells(tmp_path):
    labels = [np.full((4, 6), 7, np.uint8), np.full((4, 6), 26, np.uint8)]
    img = np.full((4, 6, 3), 9, np.uint8)
    (tmp_path / "a.png").write_bytes(encode_png(img))
    _plain_parquet(tmp_path / "x.parquet", labels, images=[img, None], paths=["a.png", None])
    src = ParquetSource(tmp_path / "x.parquet")
    items = src.list_items()
    assert [it["item_id"] for it in items] == ["parquet/x/0", "parquet/x/1"]
    a, b = src.read_item(items[0]), src.read_item(items[1])
    assert np.array_equal(a.image, img) and b.image is None and b.label[0, 0] == 26


def test_bad_rows_raise_naming_file_and_row(tmp_path):
    _plain_parquet(tmp_path / "bad.parquet", [np.full((4, 6), 77, np.uint8)])
    src = ParquetSource(tmp_path / "bad.parquet")
    with pytest.raises(LabelError, match=r"bad.parquet row 0 label.*\[77\]"):
        src.read_item(src.list_items()[0])
    img = np.zeros((5, 6, 3), np.uint8)
    (tmp_path / "b.png").write_bytes(encode_png(img))
    _plain_parquet(tmp_path / "mis.parquet", [np.zeros((4, 6), np.uint8)], images=[img], paths=["b.png"])
    src = ParquetSource(tmp_path / "mis.parquet")
    with pytest.raises(SizeMismatchError, match="mis.parquet row 0"):
        src.read_item(src.list_items()[0])
    pq.write_table(pa.table({"x": [1]}), tmp_path / "nolabel.parquet")
    with pytest.raises(ValueError, match="nolabel.parquet.*'label'"):
        ParquetSource(tmp_path / "nolabel.parquet")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ParquetSource(tmp_path / "nowhere")
