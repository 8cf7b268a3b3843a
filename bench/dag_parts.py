"""The DAG's per-sample work outside the model, part by part, without Ray: process CPU time of each
stage callable of pass 2 on toy-town samples.

Parts: ``load`` (stages.group.load_group: read the target and exemplar, replay the augmentation,
pack the arrays), ``unpack`` (the model actor's unpacking), ``png`` (stages.sample_rows.encode_pngs:
image, label and instance of every sample; the target's own toy-town photo stands in for the
model's output, so that zlib sees natural pixels), ``write`` (the writer actor: sink rows, Parquet,
sha256, label pixel counts). ``actor_ms_per_sample``: the part that runs on the model actor's
thread, besides the model: unpack (the PNGs are encoded in the load task since issue 22; before,
the actor encoded them too: ``actor_ms_per_sample_if_it_encoded``). Ray's own costs (tasks,
transfers, the driver's executor loop) are not here: bench/pipeline_efficiency.py measures the
whole. Last line: one JSON object.

The box is shared: every part runs ``--reps`` times and keeps its least CPU time.

    python bench/dag_parts.py [--n 256] [--size 64x128] [--batch 8] [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def planned_rows(cfg, items: list[dict], h: int, w: int, rows_per_shard: int) -> list[dict]:
    """Plan-like rows: every target with its recorded augmentation; exemplars shared by runs of 4
    targets (so that groups hold several members, as retrieval makes them)."""
    from stages.augment import draw_record, record_json
    from stages.read import item_json

    rows = []
    for i, it in enumerate(items):
        ex = items[(i // 4 * 4 + 4) % len(items)]
        rows.append({"shard": i // rows_per_shard, "exemplar_id": str(ex["item_id"]), "exemplar_item": item_json(ex),
                     "sample_id": f"s{i:06d}", "target_id": str(it["item_id"]), "target_item": item_json(it),
                     "augment": record_json(draw_record(cfg.augment.ops, (h, w), None, i)), "seed": i,
                     "position": i % rows_per_shard})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--size", default="64x128", help="HxW of the toy-town scenes (the demo's)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rows-per-shard", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3, help="passes over the samples; each part keeps its least")
    args = ap.parse_args()
    h, w = (int(x) for x in args.size.lower().split("x"))

    from pipeline.config import config_from_dict
    from pipeline.shard_writers import ShardWriterActor
    from stages.augment import _cached_transform
    from stages.group import group_samples, load_group, unpack_arrays
    from stages.read import cached_source, list_items, read_item, source_from_config, source_spec
    from stages.sample_rows import SAMPLE_COLUMNS, encode_pngs
    from toytown import make_tree

    work = Path(tempfile.mkdtemp(prefix="amgen-parts-"))
    make_tree(work / "toytown", args.n, seed=0, height=h, width=w)
    cfg = config_from_dict({"source": {"kind": "toytown", "root": str(work / "toytown")}}, where="bench/dag_parts.py")
    items = list_items(source_from_config(cfg.source), None)
    groups = group_samples(planned_rows(cfg, items, h, w, args.rows_per_shard), args.batch)
    spec = source_spec(cfg.source)
    cpu: dict[str, float] = {}

    def timed(part: str, fn, *a):
        t = time.process_time()
        out = fn(*a)
        cpu[part] = cpu.get(part, 0.0) + time.process_time() - t
        return out

    photos = {str(it["item_id"]): read_item(cached_source(spec), it)[0].image for it in items}
    best: dict[str, float] = {}
    for rep in range(args.reps):
        cpu.clear()
        _cached_transform.cache_clear()  # every pass replays as a fresh worker does
        rows: dict[str, list] = {k: [] for k in SAMPLE_COLUMNS}
        for g in groups:
            loaded = timed("load", load_group, g, spec, spec)
            arrays = timed("unpack", unpack_arrays, loaded["payload"])
            for i, m in enumerate(json.loads(loaded["group"])["members"]):
                row = {"sample_id": m["sample_id"], "shard": g["shard"], "position": m["position"],
                       "target_id": m["target_id"], "exemplar_id": g["exemplar_id"], "image": photos[m["target_id"]],
                       "label": arrays[f"label_{i}"], "instance": arrays.get(f"instance_{i}"), "seed": m["seed"],
                       "augment": m["augment"], "model": "toy@bench", "error": "", "bank_new": False,
                       "seconds": 0.0, "cpu_seconds": 0.0}
                for k in SAMPLE_COLUMNS:
                    rows[k].append(row[k])
        timed("png", encode_pngs, rows)
        expected: dict[int, list[str]] = {}
        for sid, shard in zip(rows["sample_id"], rows["shard"]):
            expected.setdefault(int(shard), []).append(sid)
        writer = ShardWriterActor(str(work / f"out{rep}"), expected, len(expected), "0" * 64, (), None)
        as_rows = [{k: rows[k][i] for k in SAMPLE_COLUMNS} for i in range(len(rows["sample_id"]))]
        done = timed("write", writer.add, as_rows)
        assert done["taken"] == args.n and not writer.pending()
        best = {p: min(v, best.get(p, v)) for p, v in cpu.items()}
    cpu.update(best)

    def ms(part: str) -> float:
        return round(1000 * cpu[part] / args.n, 3)

    result = {f"{p}_ms_per_sample": ms(p) for p in cpu}
    result.update({
        "total_ms_per_sample": round(sum(result.values()), 3),
        "actor_ms_per_sample": ms("unpack"),
        "actor_ms_per_sample_if_it_encoded": round(ms("unpack") + ms("png"), 3),
        "samples": args.n, "groups": len(groups), "size": [h, w], "batch_size": args.batch, "reps": args.reps,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    })
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
