"""Group stage: planned samples -> model batches that share one exemplar, and their loading.

A group is a run of consecutive plan rows with the same (shard, exemplar), at most ``batch_size``
long. Groups never cross a shard, so a shard's batches -- and so its bytes -- are the same
whether it is synthesized alone (a resume) or with every other shard.

``load_groups_batch`` is the CPU step in front of the model actors: it re-reads each target by its item
descriptor, replays its recorded augmentation, reads the exemplar, and packs everything into one
row (arrays in an ``.npz`` payload), so the actors only compute.
"""
from __future__ import annotations

import io
import json
from typing import Any, Iterable

import numpy as np

from amgen_core.quarantine import sample_error_row
from stages.augment import replay
from stages.read import batch_columns, cached_source, error_row, read_item

GROUP_COLUMNS = ("group", "payload", "error")


def group_samples(plan_rows: Iterable[dict[str, Any]], batch_size: int) -> list[dict[str, Any]]:
    """Plan rows (in plan order) -> group descriptors: {shard, exemplar_id, exemplar_item, members}."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = None
    for r in plan_rows:
        key = (int(r["shard"]), str(r["exemplar_id"]))
        if cur is None or (cur["shard"], cur["exemplar_id"]) != key or len(cur["members"]) >= batch_size:
            cur = {"shard": key[0], "exemplar_id": key[1], "exemplar_item": r["exemplar_item"], "members": []}
            groups.append(cur)
        cur["members"].append({k: r[k] for k in ("sample_id", "target_id", "target_item", "augment", "seed", "position")})
    return groups


def pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack_arrays(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def load_group(group: dict[str, Any], target_spec: str, exemplar_spec: str) -> dict[str, Any]:
    """One group descriptor -> {group (JSON), payload (npz bytes), error (JSON list of error rows)}.

    Members that fail to load become error rows and drop out of the payload; an exemplar that fails
    to load turns every member into an error row (there is nothing to synthesize from).
    """
    targets, exemplars = cached_source(target_spec), cached_source(exemplar_spec)
    errors: list[dict] = []
    ok_members, labels, instances = [], [], []
    ex_item = json.loads(group["exemplar_item"])
    ex, ex_err = read_item(exemplars, ex_item, stage="exemplar")
    if ex is not None and ex.image is None:
        ex, ex_err = None, error_row(ex_item, "exemplar", "exemplar has no image")
    for m in group["members"]:
        if ex is None:
            errors.append(sample_error_row(m, "exemplar", f"exemplar {group['exemplar_id']} unusable: {ex_err['reason']}",
                                        ex_err.get("path")))
            continue
        item = json.loads(m["target_item"])
        lay, err = read_item(targets, item, stage="synthesize")
        if lay is None:
            errors.append(sample_error_row(m, "synthesize", err["reason"], err.get("path")))
            continue
        try:
            label, inst, _ = replay(m["augment"], lay.label, lay.instance)
        except ValueError as e:
            errors.append(sample_error_row(m, "augment", f"{type(e).__name__}: {e}", item.get("path")))
            continue
        ok_members.append(m)
        labels.append(label)
        instances.append(inst)
    arrays: dict[str, np.ndarray] = {}
    if ok_members:
        arrays["exemplar_image"] = ex.image
        arrays["exemplar_label"] = ex.label
        if ex.instance is not None:
            arrays["exemplar_instance"] = ex.instance
        for i, (lab, inst) in enumerate(zip(labels, instances)):
            arrays[f"label_{i}"] = lab
            if inst is not None:
                arrays[f"instance_{i}"] = inst
    desc = dict(group, members=ok_members)
    return {"group": json.dumps(desc, sort_keys=True), "payload": pack_arrays(arrays) if ok_members else b"",
            "error": json.dumps(errors)}


def load_groups_batch(batch: dict[str, Any], target_spec: str, exemplar_spec: str) -> dict[str, list]:
    """Ray Data batch function (numpy format): a batch of group descriptors -> loaded group rows."""
    rows = [load_group(json.loads(g), target_spec, exemplar_spec) for g in batch["group"]]
    return batch_columns(rows, GROUP_COLUMNS)
