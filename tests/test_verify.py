import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from amgen_core.image_io import decode_png, encode_png
from connectors.parquet_sink import MANIFEST_NAME, file_sha256, write_shard
from connectors.verify import verify_dataset
from test_sink_fixtures import H, W, make_rows, write_small_dataset

S0 = "data/train-00000-of-00002.parquet"
S1 = "data/train-00001-of-00002.parquet"


@pytest.fixture
def out(tmp_path):
    write_small_dataset(tmp_path / "out", n_shards=2, rows_per_shard=3, scores=True)
    return tmp_path / "out"


def _replace_cell(path, column, row, png):
    """Rewrite a shard with one image cell swapped (what a buggy writer could produce)."""
    t = pq.read_table(path)
    cells = t.column(column).to_pylist()
    cells[row] = {"bytes": png, "path": cells[row]["path"]}
    t = t.set_column(t.schema.get_field_index(column), t.schema.field(column), pa.array(cells, t.schema.field(column).type))
    pq.write_table(t, path, row_group_size=2)


def _fix_manifest_sha(out, name):
    man = json.loads((out / MANIFEST_NAME).read_text())
    for e in man["shards"]:
        if e["name"] == name:
            e["sha256"] = file_sha256(out / name)
    (out / MANIFEST_NAME).write_text(json.dumps(man))


def test_good_output_passes(out):
    rep = verify_dataset(out)
    assert rep.ok, rep.summary()
    assert rep.problems == [] and rep.warnings == []
    assert rep.counts == {"shards": 2, "samples": 6, "errors": 1, "bad_rows": 0}
    assert "OK" in rep.summary()


def test_label_trusted_must_be_the_label_or_unlabeled(tmp_path):
    out = tmp_path / "trusted"
    write_small_dataset(out, n_shards=2, rows_per_shard=3, scores=True, trusted=True)
    rep = verify_dataset(out)
    assert rep.ok, rep.summary()
    t = pq.read_table(out / S0)
    label = decode_png(t.column("label")[2].as_py()["bytes"], "label", "label")
    foreign = np.where(label == 7, 8, 7).astype(np.uint8)  # an id the label does not have there
    _replace_cell(out / S0, "label_trusted", 2, encode_png(foreign))
    _fix_manifest_sha(out, S0)
    rep = verify_dataset(out)
    sid = t.column("sample_id")[2].as_py()
    assert rep.problems == [f"{S0} row 2 (sample_id {sid}): label_trusted has ids that are neither the label's nor 0 (unlabeled)"]


def test_tampered_checksum_is_named(out):
    man = json.loads((out / MANIFEST_NAME).read_text())
    man["shards"][1]["sha256"] = "0" * 64
    (out / MANIFEST_NAME).write_text(json.dumps(man))
    rep = verify_dataset(out)
    assert not rep.ok
    assert any(S1 in p and "sha256" in p for p in rep.problems), rep.problems
    assert not any(S0 in p for p in rep.problems)


def test_rewritten_shard_fails_its_checksum(out):
    write_shard(make_rows(3, seed=99, scores=True), out, 0, 2, optional_columns=["score_miou"])  # other content
    rep = verify_dataset(out)
    assert [p for p in rep.problems if "sha256" in p] and all(S0 in p for p in rep.problems), rep.problems


def test_label_with_wrong_size_names_shard_and_row(out):
    sid = pq.read_table(out / S0).column("sample_id")[1].as_py()
    _replace_cell(out / S0, "label", 1, encode_png(np.full((H // 2, W), 7, np.uint8)))
    _fix_manifest_sha(out, S0)
    rep = verify_dataset(out)
    assert not rep.ok and rep.counts["bad_rows"] == 1
    assert rep.problems == [f"{S0} row 1 (sample_id {sid}): label {H // 2}x{W} does not match image {H}x{W}"]


def test_bad_label_contents(out):
    _replace_cell(out / S1, "label", 0, encode_png(np.full((H, W), 99, np.uint8)))
    _replace_cell(out / S1, "instance", 0, b"\x89PNG\r\n\x1a\n garbage")
    _replace_cell(out / S1, "label", 2, encode_png(np.full((H, W), 7, np.uint16)))
    _fix_manifest_sha(out, S1)
    probs = verify_dataset(out).problems
    assert any(f"{S1} row 0" in p and "[99]" in p for p in probs), probs
    assert any(f"{S1} row 0" in p and "instance" in p and "cannot decode" in p for p in probs), probs
    assert any(f"{S1} row 2" in p and "uint16" in p for p in probs), probs


def test_missing_shard(out):
    (out / S1).unlink()
    rep = verify_dataset(out)
    assert f"missing shard {S1}" in rep.problems
    assert any(S1 in p and "missing on disk" in p for p in rep.problems)
    assert rep.counts["shards"] == 1


def test_label_trusted_must_decode_as_image(tmp_path):
    out = tmp_path / "trusted"
    write_small_dataset(out, n_shards=2, rows_per_shard=3, scores=True, trusted=True)
    t = pq.read_table(out / S0)
    hf = json.loads(t.schema.metadata[b"huggingface"])
    assert hf["info"]["features"]["label_trusted"] == {"_type": "Image"}
    hf["info"]["features"]["label_trusted"] = {"bytes": {"dtype": "binary", "_type": "Value"},
                                               "path": {"dtype": "string", "_type": "Value"}}
    pq.write_table(t.replace_schema_metadata({**t.schema.metadata, b"huggingface": json.dumps(hf).encode()}), out / S0)
    _fix_manifest_sha(out, S0)
    probs = verify_dataset(out).problems
    assert f"{S0}: HF features metadata does not decode ['label_trusted'] as Image" in probs, probs


def test_missing_manifest_card_and_bad_errors_and_strays(out):
    (out / MANIFEST_NAME).unlink()
    (out / "README.md").unlink()
    (out / "errors" / "read.parquet").write_bytes(b"not parquet")
    (out / "data" / "extra.parquet").write_bytes(b"x")
    (out / "data" / ".train-00000-of-00002.parquet.tmp-1").write_bytes(b"x")
    rep = verify_dataset(out)
    text = "\n".join(rep.problems)
    for needle in ("manifest.json: missing", "README.md: missing", "errors/read.parquet: not a readable",
                   "data/extra.parquet: unexpected file"):
        assert needle in text, text
    assert rep.warnings and "temporary" in rep.warnings[0]


def test_schema_problems(tmp_path):
    out = tmp_path / "o"
    write_small_dataset(out, n_shards=1, rows_per_shard=2)
    t = pq.read_table(out / "data/train-00000-of-00001.parquet").drop_columns(["seed"])
    pq.write_table(t.replace_schema_metadata(None), out / "data/train-00000-of-00001.parquet")
    probs = verify_dataset(out).problems
    assert any("column 'seed' missing" in p for p in probs), probs
    assert any("HF features" in p for p in probs), probs
    assert not verify_dataset(tmp_path / "nope").ok
