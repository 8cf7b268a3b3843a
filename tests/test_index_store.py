import json

import numpy as np
import pytest

from connectors.index_store import IndexFormatError, IndexNotFoundError, ShardedIndex

D = 24


def unit_vectors(n, seed=0, d=D):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(x, q, k, allowed=None):
    scores = q @ x.T
    if allowed is not None:
        scores[:, ~allowed] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(len(x)), scores.shape), -scores), axis=-1)[:, :k]
    return order, np.take_along_axis(scores, order, 1)


@pytest.fixture(scope="module")
def data():
    x = unit_vectors(300)
    ids = [f"ex-{i:04d}" for i in range(300)]
    meta = [{"domain": ("day", "night", "fog")[i % 3], "split": "train"} for i in range(300)]
    return x, ids, meta


def test_flat_index_is_exact_on_small_data(tmp_path, data):
    x, ids, meta = data
    index = ShardedIndex.build(x, ids, meta, tmp_path / "idx", 1)
    assert index.kind == "flat" and len(index) == 300
    q = unit_vectors(20, seed=1)
    hits = index.search(q, 10)
    rows, scores = brute_force(x, q, 10)
    assert np.array_equal(hits.rows, rows)
    assert np.allclose(hits.scores, scores, atol=1e-5)
    assert hits.ids[0] == [ids[r] for r in rows[0]]


def test_sharded_equals_unsharded_for_flat(tmp_path, data):
    x, ids, meta = data
    one = ShardedIndex.build(x, ids, meta, tmp_path / "one", 1)
    many = ShardedIndex.build(x, ids, meta, tmp_path / "many", 7)
    assert many.num_shards == 7 and len(many) == 300
    q = unit_vectors(25, seed=2)
    a, b = one.search(q, 15), many.search(q, 15)
    assert np.array_equal(a.rows, b.rows)
    assert np.allclose(a.scores, b.scores, atol=1e-6)
    fa = one.search(q, 5, filters={"domain": "fog"}, exclude_ids=[ids[:3]] * 25)
    fb = many.search(q, 5, filters={"domain": "fog"}, exclude_ids=[ids[:3]] * 25)
    assert fa.ids == fb.ids


def test_exclude_self_still_returns_k(tmp_path, data):
    x, ids, meta = data
    index = ShardedIndex.build(x, ids, meta, tmp_path / "idx", 3)
    hits = index.search(x[:10], 4)
    assert [h[0] for h in hits.ids] == ids[:10]          # each vector is its own best match
    hits = index.search(x[:10], 4, exclude_ids=ids[:10])
    for i, got in enumerate(hits.ids):
        assert ids[i] not in got and len(got) == 4
    rows, _ = brute_force(x, x[:10], 5)
    assert hits.rows.tolist() == [r[1:].tolist() for r in rows]
    with pytest.raises(ValueError, match="one entry per query"):
        index.search(x[:10], 4, exclude_ids=ids[:3])


def test_metadata_filters_dict_list_and_callable(tmp_path, data):
    x, ids, meta = data
    index = ShardedIndex.build(x, ids, meta, tmp_path / "idx", 4)
    q = unit_vectors(12, seed=3)
    night = np.array([m["domain"] == "night" for m in meta])
    hits = index.search(q, 8, filters={"domain": "night"})
    rows, _ = brute_force(x, q, 8, allowed=night)
    assert np.array_equal(hits.rows, rows)
    assert all(meta[r]["domain"] == "night" for r in hits.rows.ravel())
    two = index.search(q, 8, filters={"domain": ["day", "fog"]})
    assert all(meta[r]["domain"] in ("day", "fog") for r in two.rows.ravel())
    call = index.search(q, 8, filters=lambda m: m["domain"] == "night")
    assert np.array_equal(call.rows, hits.rows)
    none = index.search(q, 3, filters={"domain": "snow"})
    assert none.ids == [[]] * 12 and (none.rows == -1).all()


def test_ivf_shards_share_one_quantizer_and_are_exact_at_full_probe(tmp_path):
    x = unit_vectors(2000, seed=4)
    ids = [f"v{i}" for i in range(2000)]
    meta = [{"i": i} for i in range(2000)]
    index = ShardedIndex.build(x, ids, meta, tmp_path / "ivf", 4, ivf_threshold=100, nlist=16, nprobe=4)
    assert index.kind == "ivf" and index.nlist == 16 and index.nprobe == 4
    manifest = json.loads((tmp_path / "ivf" / "manifest.json").read_text())
    assert manifest["kind"] == "ivf" and manifest["nprobe"] == 4 and len(manifest["shards"]) == 4
    q = unit_vectors(30, seed=5)
    rows, _ = brute_force(x, q, 10)
    assert np.array_equal(index.search(q, 10, nprobe=16).rows, rows)   # all lists probed: exact
    approx = index.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx.rows, rows)])
    assert 0.3 < recall < 1.0                                             # nprobe really limits the scan
    mask = np.arange(2000) % 2 == 0
    even = index.search(q, 10, nprobe=16, filters=lambda m: m["i"] % 2 == 0)
    rows_even, _ = brute_force(x, q, 10, allowed=mask)
    assert np.array_equal(even.rows, rows_even)


def test_save_load_round_trip(tmp_path, data):
    x, ids, meta = data
    labels = np.random.default_rng(0).integers(0, 34, (300, 8, 16)).astype(np.uint8)
    built = ShardedIndex.build(x, ids, meta, tmp_path / "idx", 3, labels=labels, embedding_version="t1")
    loaded = ShardedIndex.load(tmp_path / "idx", expected_dim=D, embedding_version="t1")
    q = unit_vectors(9, seed=6)
    assert np.array_equal(built.search(q, 6).rows, loaded.search(q, 6).rows)
    assert loaded.ids.tolist() == ids
    assert loaded.meta(299) == meta[299]
    assert np.array_equal(loaded.label(150), labels[150])
    assert loaded.row_of("ex-0123") == 123 and loaded.row_of("nope") is None
    assert not list(tmp_path.glob(".idx.*"))                  # no temporary folder left behind
    ShardedIndex.build(x[:50], ids[:50], meta[:50], tmp_path / "idx", 2)   # rebuild replaces it
    assert len(ShardedIndex.load(tmp_path / "idx")) == 50


def test_damaged_side_arrays_name_their_file(tmp_path, data):
    x, ids, meta = data
    labels = np.zeros((300, 8, 16), np.uint8)
    ShardedIndex.build(x, ids, meta, tmp_path / "idx", 2, labels=labels)
    (side,) = sorted((tmp_path / "idx").glob("*.npy"))[:1]
    np.save(side, np.zeros((3, 8, 16), np.uint8))                     # a shard's label maps, wrong count
    with pytest.raises(IndexFormatError, match=rf"{side.name}: corrupt shard \(checksum"):
        ShardedIndex.load(tmp_path / "idx")
    # without the checksums, the file's own shape and bytes are checked
    with pytest.raises(IndexFormatError, match=rf"{side.name}: expected \(\d+, h, w\) uint8, got \(3, 8, 16\)"):
        ShardedIndex.load(tmp_path / "idx", verify=False)
    side.write_bytes(b"not an npy file")
    with pytest.raises(IndexFormatError, match=rf"{side.name}: unreadable label maps"):
        ShardedIndex.load(tmp_path / "idx", verify=False)


def test_clear_errors_on_bad_index_dirs(tmp_path, data):
    x, ids, meta = data
    with pytest.raises(IndexNotFoundError, match="index folder not found"):
        ShardedIndex.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexNotFoundError, match="manifest.json: manifest not found"):
        ShardedIndex.load(tmp_path / "empty")
    ShardedIndex.build(x, ids, meta, tmp_path / "idx", 2, embedding_version="v1")
    with pytest.raises(IndexFormatError, match="dimension mismatch: index has dim=24, expected 660"):
        ShardedIndex.load(tmp_path / "idx", expected_dim=660)
    with pytest.raises(IndexFormatError, match="embedding version mismatch"):
        ShardedIndex.load(tmp_path / "idx", embedding_version="v2")
    shard = tmp_path / "idx" / "shard-00001.faiss"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2:] = b"\0" * (len(blob) - len(blob) // 2)
    shard.write_bytes(bytes(blob[: len(blob) // 3]))
    with pytest.raises(IndexFormatError, match="shard-00001.faiss: corrupt shard"):
        ShardedIndex.load(tmp_path / "idx")
    with pytest.raises(IndexFormatError, match="shard-00001.faiss: corrupt shard"):
        ShardedIndex.load(tmp_path / "idx", verify=False)    # faiss itself refuses the bytes
    shard.unlink()
    with pytest.raises(IndexFormatError, match="shard-00001.faiss: shard file missing"):
        ShardedIndex.load(tmp_path / "idx")
    (tmp_path / "idx" / "manifest.json").write_text("{not json")
    with pytest.raises(IndexFormatError, match="unreadable manifest"):
        ShardedIndex.load(tmp_path / "idx")


def test_build_rejects_bad_input_and_foreign_folders(tmp_path, data):
    x, ids, meta = data
    with pytest.raises(ValueError, match="duplicate id 'ex-0000'"):
        ShardedIndex.build(x[:3], [ids[0]] * 3, None, tmp_path / "a", 1)
    with pytest.raises(ValueError, match="2 ids for 3 vectors"):
        ShardedIndex.build(x[:3], ids[:2], None, tmp_path / "a", 1)
    with pytest.raises(ValueError, match="NaN"):
        ShardedIndex.build(np.full((3, D), np.nan, np.float32), ids[:3], None, tmp_path / "a", 1)
    user = tmp_path / "photos"
    user.mkdir()
    (user / "holiday.jpg").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="not an amgen index"):
        ShardedIndex.build(x, ids, meta, user, 2)
    assert (user / "holiday.jpg").read_bytes() == b"keep me"
    index = ShardedIndex.build(x, ids, meta, tmp_path / "ok", 1)
    with pytest.raises(ValueError, match=r"queries must be \(nq, 24\)"):
        index.search(np.zeros((2, 5), np.float32), 3)


def test_same_input_gives_the_same_bytes(tmp_path):
    x = unit_vectors(3000, seed=7)
    ids = [f"v{i}" for i in range(3000)]
    meta = [{"domain": "day"}] * 3000
    for name in ("a", "b"):
        ShardedIndex.build(x, ids, meta, tmp_path / name, 3, ivf_threshold=100, nlist=32, seed=1)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir()) and "manifest.json" in files
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_post_filter_path_used_on_gpu_matches_the_selector(tmp_path, data):
    """On GPU filters are applied after an over-fetched search; force that path on CPU shards."""
    x, ids, meta = data
    index = ShardedIndex.build(x, ids, meta, tmp_path / "idx", 3)
    q = unit_vectors(10, seed=8)
    want = index.search(q, 6, filters={"domain": "fog"}, exclude_ids=[ids[:50]] * 10)
    index.device = "cuda"          # shards stay CPU objects; only the search strategy changes
    got = index.search(q, 6, filters={"domain": "fog"}, exclude_ids=[ids[:50]] * 10)
    assert got.ids == want.ids and all(len(g) == 6 for g in got.ids)


def test_cuda_without_gpu_is_a_clear_error(tmp_path, data):
    import faiss

    x, ids, meta = data
    ShardedIndex.build(x, ids, meta, tmp_path / "idx", 1)
    if faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is visible")
    with pytest.raises(RuntimeError, match="faiss sees no GPU"):
        ShardedIndex.load(tmp_path / "idx", device="cuda")
    assert ShardedIndex.load(tmp_path / "idx", device="auto").device == "cpu"


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_bitmap_selector_wrapper_gives_what_the_raw_pointer_gave(tmp_path, kind):
    """faiss.IDSelectorBitmap(bits) (the wrapper, which keeps ``bits`` alive) against the old
    IDSelectorBitmap(n_rows, swig_ptr(bits)): same hits, bit for bit, at a partial probe too."""
    import faiss

    x = unit_vectors(1200, seed=6)
    index = ShardedIndex.build(x, [f"v{i}" for i in range(1200)], [{"i": i} for i in range(1200)],
                               tmp_path / kind, 3, ivf_threshold=100 if kind == "ivf" else 10_000, nlist=16, nprobe=3)
    assert index.kind == kind
    q = unit_vectors(20, seed=7)
    mask = np.random.default_rng(8).random(1200) < 0.3
    for p, (part, lo, count) in enumerate(index._parts):
        bits = np.packbits(mask[lo:lo + count], bitorder="little")
        old_sel = faiss.IDSelectorBitmap(count, faiss.swig_ptr(bits))
        params = faiss.SearchParametersIVF(nprobe=3) if kind == "ivf" else faiss.SearchParameters()
        params.sel = old_sel
        want_d, want_i = part.search(q, 25, params=params)
        got_d, got_rows = index._search_part(p, q, 25, mask, 3)
        assert np.array_equal(got_rows, np.where(want_i >= 0, want_i + lo, -1))
        assert np.array_equal(got_d, want_d)
        assert mask[got_rows[got_rows >= 0]].all() and (got_rows >= 0).sum() > 0


def test_ivf_shards_are_merged_for_search_and_give_the_unsharded_results(tmp_path):
    """One shard or five: the same quantizer and the same lists, so the same hits at a partial probe."""
    x = unit_vectors(3000, seed=9)
    ids = [f"v{i}" for i in range(3000)]
    one = ShardedIndex.build(x, ids, None, tmp_path / "one", 1, ivf_threshold=100, nlist=32, nprobe=4)
    five = ShardedIndex.build(x, ids, None, tmp_path / "five", 5, ivf_threshold=100, nlist=32, nprobe=4)
    assert five.num_shards == 5 and len(five._parts) == 1 and len(five) == 3000
    q = unit_vectors(40, seed=10)
    a, b = one.search(q, 10), five.search(q, 10)
    assert np.array_equal(a.rows, b.rows) and np.allclose(a.scores, b.scores, atol=1e-6)
    assert five.ids.tolist() == ids


def test_default_probe_counts_unchanged_up_to_1024_lists_and_sqrt_beyond():
    from connectors.index_store import default_nlist, default_nprobe

    assert [default_nprobe(n) for n in (16, 256, 512, 1024)] == [8, 8, 8, 16]
    assert default_nlist(1_000_000) == 4096 and default_nprobe(4096) == 32 and default_nprobe(16384) == 64


def test_pq_fast_scan_codec_reranks_exactly_and_keeps_filters_and_shards(tmp_path):
    """codec pq<M>x4fs: 4-bit PQ codes in the lists, full vectors beside them for the exact rerank.
    Scores are exact inner products; all lists probed with a wide rerank gives the exact top-k; the
    filter still runs inside the scan; 1 or 4 shards give the same hits; it reloads from disk."""
    x = unit_vectors(3000, seed=11)
    ids = [f"v{i}" for i in range(3000)]
    meta = [{"i": i} for i in range(3000)]
    four = ShardedIndex.build(x, ids, meta, tmp_path / "pq4", 4, ivf_threshold=100, nlist=16, nprobe=4,
                              codec="pq12x4fs", rerank=4)
    one = ShardedIndex.build(x, ids, meta, tmp_path / "pq1", 1, ivf_threshold=100, nlist=16, nprobe=4,
                             codec="pq12x4fs", rerank=4)
    manifest = json.loads((tmp_path / "pq4" / "manifest.json").read_text())
    assert manifest["codec"] == "pq12x4fs" and manifest["rerank"] == 4
    assert all(s["vectors"] and "vectors" in s["sha256"] for s in manifest["shards"])
    assert four.codec == "pq12x4fs" and four.rerank == 4 and len(four._parts) == 1
    q = unit_vectors(40, seed=12)
    hits = four.search(q, 10)
    assert np.allclose(hits.scores, np.einsum("qkd,qd->qk", x[hits.rows], q), atol=1e-5)   # exact re-scoring
    assert np.array_equal(hits.rows, one.search(q, 10).rows)                               # shards change nothing
    rows, _ = brute_force(x, q, 10)
    four.rerank = 300
    assert np.array_equal(four.search(q, 10, nprobe=16).rows, rows)    # everything probed and re-scored: exact
    four.rerank = 4
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(hits.rows, rows)])
    assert 0.3 < recall < 1.0
    even = four.search(q, 10, filters=lambda m: m["i"] % 2 == 0)
    assert (even.rows % 2 == 0).all() and (even.rows >= 0).all()
    again = ShardedIndex.load(tmp_path / "pq4")
    assert again.codec == "pq12x4fs" and np.array_equal(again.search(q, 10).rows, hits.rows)
    assert np.array_equal(ShardedIndex.load(tmp_path / "pq4", rerank=300).search(q, 10, nprobe=16).rows, rows)


def test_pq_codec_is_checked(tmp_path):
    from connectors.index_store import pq_subquantizers

    x = unit_vectors(500, seed=13)
    ids = [f"v{i}" for i in range(500)]
    assert pq_subquantizers("flat") is None and pq_subquantizers("pq220x4fs", 660) == 220
    for bad in ("pq7x4fs", "pq12x8", "sq8"):   # 7 does not divide 24; 8-bit and other codecs are not offered
        with pytest.raises(ValueError, match="codec"):
            ShardedIndex.build(x, ids, None, tmp_path / bad, 2, ivf_threshold=100, nlist=8, codec=bad)
    ShardedIndex.build(x, ids, None, tmp_path / "ok", 2, ivf_threshold=100, nlist=8, codec="pq6x4fs")
    m = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    (tmp_path / "ok" / m["shards"][1]["vectors"]).unlink()
    with pytest.raises(IndexFormatError, match="vectors"):
        ShardedIndex.load(tmp_path / "ok")
