import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from amgen_core.labels import colorize, to_train_ids
from connectors.cityscapes import CityscapesSource
from connectors.cityscapes_export import ExportError, export_cityscapes
from amgen_core.image_io import read_image, read_label_png
from test_sink_fixtures import make_rows, write_small_dataset


def test_export_reads_back_through_the_cityscapes_connector(tmp_path):
    write_small_dataset(tmp_path / "out", n_shards=2, rows_per_shard=3)
    want = {r["sample_id"]: r for r in make_rows(3, seed=0, start=0) + make_rows(3, seed=1, start=3)}
    st = export_cityscapes(tmp_path / "out", tmp_path / "cs")
    assert st.frames == 6 and st.with_instance == 4
    index = {f["stem"]: f for f in json.loads((tmp_path / "cs" / "amgen_export_train.json").read_text())["frames"]}
    src = CityscapesSource(tmp_path / "cs", "train")
    layouts = list(src)
    assert len(layouts) == 6 and sorted(l.layout_id for l in layouts) == sorted(index)
    gt = tmp_path / "cs" / "gtFine" / "train" / "amgen"
    for lay in layouts:
        row = want[index[lay.layout_id]["sample_id"]]
        assert np.array_equal(lay.label, row["label"])
        assert np.array_equal(lay.image, row["image"])
        if row["instance"] is None:
            assert lay.instance is None
        else:
            assert np.array_equal(lay.instance, row["instance"])
            assert Image.open(gt / f"{lay.layout_id}_gtFine_instanceIds.png").mode.startswith("I;16")
        assert np.array_equal(read_image(gt / f"{lay.layout_id}_gtFine_color.png"), colorize(row["label"]))
        assert np.array_equal(read_label_png(gt / f"{lay.layout_id}_gtFine_labelTrainIds.png"),
                              to_train_ids(row["label"]))
    assert "amgen_000001_000002" in index  # shard 1, row 2


def test_export_is_deterministic_and_refuses_to_clobber(tmp_path):
    write_small_dataset(tmp_path / "out", n_shards=1, rows_per_shard=2)
    export_cityscapes(tmp_path / "out", tmp_path / "a")
    export_cityscapes(tmp_path / "out", tmp_path / "b")
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert files_a == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)
    with pytest.raises(ExportError, match="already holds"):
        export_cityscapes(tmp_path / "out", tmp_path / "a")
    export_cityscapes(tmp_path / "out", tmp_path / "a", overwrite=True)
    with pytest.raises(ExportError, match="city"):
        export_cityscapes(tmp_path / "out", tmp_path / "c", city="bad_city")
    with pytest.raises(FileNotFoundError, match="no train-"):
        export_cityscapes(tmp_path / "nothing", tmp_path / "d")


def test_bad_label_in_output_is_named(tmp_path):
    write_small_dataset(tmp_path / "out", n_shards=1, rows_per_shard=2)
    shard = tmp_path / "out" / "data" / "train-00000-of-00001.parquet"
    t = pq.read_table(shard)
    cells = t.column("label").to_pylist()
    cells[1]["bytes"] = b"garbage"
    t = t.set_column(t.schema.get_field_index("label"), "label", pa.array(cells, t.schema.field("label").type))
    pq.write_table(t, shard)
    with pytest.raises(ValueError, match="train-00000-of-00001.parquet row 1"):
        export_cityscapes(tmp_path / "out", tmp_path / "cs")
