"""The plan: every sample of a run, decided before any pixel is synthesized.

A plan row is one sample: target, exemplar, the target's augmentation record, seed, its stable
``sample_id`` and its place (``position``, ``shard``). Samples are ordered by (exemplar, target,
rank), so targets that share an exemplar sit next to each other: they land in the same shard and
the same model batch, and the exemplar bank is computed once for all of them.

The plan is stored as ``OUT/plan.parquet`` with the config hash in its metadata; a rerun reads it
back instead of re-planning, which is what makes resume exact.

Increments: when a rerun finds targets the plan has never seen (a scheduled run over a source that
grew), only those are planned and appended (``append_increment``): their samples take the next
positions and new shards, named stably (``train-KKKKK.parquet``); the rows, shards and names of
earlier increments never change. ``increments`` records each one.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from connectors.storage import RemotePath, arrow_target, as_path, publish_atomic

from amgen_core.records import sample_id, stable_seed

PLAN_FILE = "plan.parquet"
PLAN_VERSION = "1"
PLAN_SCHEMA = pa.schema([
    ("position", pa.int64()), ("shard", pa.int64()), ("sample_id", pa.string()),
    ("target_id", pa.string()), ("target_item", pa.string()),
    ("exemplar_id", pa.string()), ("exemplar_item", pa.string()), ("exemplar_rank", pa.int64()),
    ("exemplar_score", pa.float64()), ("augment", pa.string()), ("seed", pa.int64()),
])


class PlanError(ValueError):
    pass


@dataclass
class Plan:
    rows: list[dict[str, Any]]          # in position order
    config_hash: str
    rows_per_shard: int
    errors: list[dict[str, Any]] = field(default_factory=list)   # quarantined while planning
    num_targets: int = 0                # targets that were read and augmented
    increments: list[dict[str, Any]] = field(default_factory=list)  # one record per planning (first included)

    @property
    def num_samples(self) -> int:
        return len(self.rows)

    @property
    def num_shards(self) -> int:
        return int(self.rows[-1]["shard"]) + 1 if self.rows else 0

    @property
    def base_shards(self) -> int:
        """Shards of the first plan (named ``-of-N``); later increments' shards have stable names."""
        return int(self.increments[0]["num_shards"]) if self.increments else self.num_shards

    def shard_total(self, shard: int) -> int | None:
        """The N in the shard's file name, None for an increment's stable name."""
        return self.base_shards if shard < self.base_shards else None

    def shard_totals(self) -> dict[int, int | None]:
        return {s: self.shard_total(s) for s in range(self.num_shards)}

    def shard_rows(self, shard: int) -> list[dict[str, Any]]:
        by = self.__dict__.get("_by_shard")
        if by is None or sum(map(len, by.values())) != len(self.rows):
            by = {}
            for r in self.rows:
                by.setdefault(int(r["shard"]), []).append(r)
            self.__dict__["_by_shard"] = by
        return by.get(shard, [])

    def shard_sizes(self) -> list[int]:
        return [len(self.shard_rows(s)) for s in range(self.num_shards)]

    def num_exemplars(self) -> int:
        return len({r["exemplar_id"] for r in self.rows})


def make_plan(targets: Iterable[dict[str, Any]], exemplar_items: dict[str, str], *, k: int, seed: int,
              rows_per_shard: int, config_hash: str) -> Plan:
    """``targets``: {target_id, target_item, augment, matches: [{id, score}] best first}.

    A target with no exemplar, or whose exemplar the exemplar source does not list, is quarantined
    (stage "retrieve"); a target with fewer than ``k`` matches keeps the ones it has.
    """
    samples, errors, n_targets = [], [], 0
    for t in targets:
        n_targets += 1
        item = json.loads(t["target_item"])
        matches = list(t["matches"])[:k]
        if not matches:
            errors.append({"input_id": t["target_id"], "source": item.get("source"), "stage": "retrieve",
                           "reason": "missing exemplar: the index returned no match (filters too strict?)",
                           "path": item.get("path")})
            continue
        for rank, m in enumerate(matches):
            ex_id = str(m["id"])
            if ex_id not in exemplar_items:
                errors.append({"input_id": t["target_id"], "source": item.get("source"), "stage": "retrieve",
                               "reason": f"missing exemplar: {ex_id!r} is in the index but not in the exemplar source",
                               "path": item.get("path")})
                continue
            s = stable_seed("sample", t["target_id"], ex_id, rank, base=seed)
            samples.append({
                "sample_id": sample_id(t["target_id"], ex_id, t["augment"], s),
                "target_id": t["target_id"], "target_item": t["target_item"],
                "exemplar_id": ex_id, "exemplar_item": exemplar_items[ex_id], "exemplar_rank": rank,
                "exemplar_score": float(m.get("score", 0.0)), "augment": t["augment"], "seed": s,
            })
    samples.sort(key=lambda r: (r["exemplar_id"], r["target_id"], r["exemplar_rank"]))
    ids = [r["sample_id"] for r in samples]
    if len(set(ids)) != len(ids):
        raise PlanError("two planned samples share a sample_id (duplicate target ids in the source?)")
    for i, r in enumerate(samples):
        r["position"], r["shard"] = i, i // rows_per_shard
    errors.sort(key=lambda e: (e["input_id"], e["stage"], e["reason"]))
    return Plan(rows=samples, config_hash=config_hash, rows_per_shard=rows_per_shard, errors=errors,
                num_targets=n_targets)


def save_plan(plan: Plan, out_dir: str | os.PathLike) -> Path | RemotePath:
    path = as_path(out_dir) / PLAN_FILE
    table = pa.Table.from_pylist([{k: r[k] for k in PLAN_SCHEMA.names} for r in plan.rows], schema=PLAN_SCHEMA)
    table = table.replace_schema_metadata({
        "amgen.plan_version": PLAN_VERSION, "amgen.config_hash": plan.config_hash,
        "amgen.rows_per_shard": str(plan.rows_per_shard), "amgen.num_targets": str(plan.num_targets),
        "amgen.errors": json.dumps(plan.errors, sort_keys=True),
        **({"amgen.increments": json.dumps(plan.increments, sort_keys=True)} if plan.increments else {}),
    })

    def write(tmp) -> None:
        target, fs = arrow_target(tmp)
        pq.write_table(table, target, filesystem=fs)

    return publish_atomic(path, write)


def plan_config_hash(out_dir: str | os.PathLike) -> str | None:
    """The config hash a folder's plan was made with, or None when there is no plan."""
    path = as_path(out_dir) / PLAN_FILE
    if not path.is_file():
        return None
    target, fs = arrow_target(path)
    meta = pq.read_schema(target, filesystem=fs).metadata or {}
    return meta.get(b"amgen.config_hash", b"").decode() or None


def load_plan(out_dir: str | os.PathLike) -> Plan:
    path = as_path(out_dir) / PLAN_FILE
    try:
        target, fs = arrow_target(path)
        table = pq.read_table(target, filesystem=fs)
    except (OSError, pa.ArrowInvalid) as e:
        raise PlanError(f"{path}: unreadable plan ({e}); rerun with --overwrite") from e
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if meta.get("amgen.plan_version") != PLAN_VERSION:
        raise PlanError(f"{path}: plan version {meta.get('amgen.plan_version')!r} != {PLAN_VERSION}; rerun with --overwrite")
    rows = table.to_pylist()
    plan = Plan(rows=rows, config_hash=meta["amgen.config_hash"], rows_per_shard=int(meta["amgen.rows_per_shard"]),
                errors=json.loads(meta.get("amgen.errors", "[]")), num_targets=int(meta.get("amgen.num_targets", 0)))
    plan.increments = json.loads(meta["amgen.increments"]) if "amgen.increments" in meta else [first_increment(plan)]
    return plan


def first_increment(plan: Plan) -> dict[str, Any]:
    """The record of a plan made in one go (a plan without increments)."""
    return {"increment": 0, "first_shard": 0, "num_shards": plan.num_shards, "targets": plan.num_targets,
            "samples": plan.num_samples}


def planned_target_ids(plan: Plan) -> set[str]:
    """Every target the plan has seen: planned, or quarantined while planning."""
    return {str(r["target_id"]) for r in plan.rows} | {str(e["input_id"]) for e in plan.errors}


def append_increment(plan: Plan, new: Plan, record: dict[str, Any]) -> Plan:
    """``plan`` with ``new`` (a plan of only the new targets, same config) appended after it:
    positions and shards continue, rows of ``plan`` stay as they are. ``record`` is stored with
    the increment (e.g. the exemplar set it retrieved from)."""
    if new.config_hash != plan.config_hash or new.rows_per_shard != plan.rows_per_shard:
        raise PlanError("an increment must be planned with the plan's own config")
    first_shard, first_pos = plan.num_shards, plan.num_samples
    clash = {r["sample_id"] for r in plan.rows} & {r["sample_id"] for r in new.rows}
    if clash:
        raise PlanError(f"increment samples already planned: {sorted(clash)[:3]}")
    rows = list(plan.rows)
    for r in new.rows:
        rows.append(dict(r, position=first_pos + int(r["position"]), shard=first_shard + int(r["shard"])))
    increments = list(plan.increments or [first_increment(plan)])
    increments.append({"increment": len(increments), "first_shard": first_shard, "num_shards": new.num_shards,
                       "targets": new.num_targets, "samples": new.num_samples, **record})
    errors = sorted(plan.errors + new.errors, key=lambda e: (str(e["input_id"]), e["stage"], e["reason"]))
    return Plan(rows=rows, config_hash=plan.config_hash, rows_per_shard=plan.rows_per_shard, errors=errors,
                num_targets=plan.num_targets + new.num_targets, increments=increments)
