"""Small, deterministic sample rows and a complete tiny output folder, shared by the sink/verify/export tests."""
import numpy as np

from connectors.parquet_sink import (
    DatasetCardInfo, error_row, write_dataset_card, write_errors, write_manifest, write_shard,
)

H, W = 16, 32
CLASSES = np.array([7, 8, 11, 21, 23, 24, 26], np.uint8)  # road sidewalk building vegetation sky person car


def make_rows(n, seed=0, start=0, scores=False, trusted=False):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = CLASSES[rng.integers(0, len(CLASSES), (H, W))]
        inst = label.astype(np.int32)
        things = np.isin(label, [24, 26])
        inst[things] = label[things].astype(np.int32) * 1000 + (i % 3)
        row = dict(sample_id=f"s{start + i:05d}", target_id=f"t{start + i}", exemplar_id=f"e{i % 2}",
                   image=rng.integers(0, 256, (H, W, 3), dtype=np.uint8), label=label,
                   instance=inst if i % 2 == 0 else None, seed=start + i,
                   augment={"hflip": bool(i % 2), "scale": 1.0}, model="toy@0123abcd", config_hash="cfg42")
        if scores:
            row["score_miou"] = None if i == 0 else 0.25 * (i % 4)
        if trusted:  # the label with its left third left out
            row["label_trusted"] = label.copy()
            row["label_trusted"][:, : W // 3] = 0
        rows.append(row)
    return rows


def write_small_dataset(out, n_shards=2, rows_per_shard=3, scores=False, trusted=False):
    optional_cols = (["score_miou"] if scores else []) + (["label_trusted"] if trusted else [])
    stats = [write_shard(make_rows(rows_per_shard, seed=k, start=k * rows_per_shard, scores=scores, trusted=trusted),
                         out, k, n_shards, row_group_size=2, optional_columns=optional_cols)
             for k in range(n_shards)]
    write_errors([error_row("bad/item", "read", ValueError("x.png: cannot decode"), source="toy", path="x.png")],
                 out, "read")
    pixels = np.sum([s.label_pixels for s in stats], axis=0).tolist()
    write_dataset_card(out, DatasetCardInfo(num_samples=n_shards * rows_per_shard, num_shards=n_shards,
                                            num_errors=1, optional_columns=optional_cols, label_pixels=pixels,
                                            model="toy@0123abcd", config_hash="cfg42", sources=["toy-town"]))
    write_manifest(out, {"shards": stats, "counts": {"samples": n_shards * rows_per_shard, "errors": 1},
                         "model": "toy@0123abcd"})
    return stats
