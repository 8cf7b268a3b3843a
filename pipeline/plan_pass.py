"""Pass 1: the exemplar index for the run, then the plan.

    exemplar items -> read + embed (index rows)                      -> OUT/index
    target items   -> read + augment -> embed -> retrieve (1..n actors) -> OUT/plan.parquet

Retrieval needs a complete index, and an exact resume needs every sample's place fixed before
any pixel exists, so the plan is the run's one barrier. The batch functions are the stages'
(stages/retrieve.py, stages/augment.py, stages/embed.py); this module only wires them with Ray.

Neither the index rows nor the plan rows are gathered on the driver: ``plan_on_worker`` runs the
whole pass in a Ray task on a worker, which collects the index rows, builds the index (locally,
then published to ``OUT/index`` wherever OUT is: a path or a URI), runs the plan's dataset and
writes ``OUT/plan.parquet``. The driver receives the plan's metadata (ids, items, seeds: what it
needs to cut the synthesis groups), never an embedding or a label map.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.cluster import RETRIEVE_CPUS, actor_pool, retrieve_pool_size
from pipeline.config import RunConfig
from pipeline.console import NullProgress, Reporter
from pipeline.plan import Plan, first_increment, make_plan
from stages.failures import PLAN_CRASH_ENV, CrashPoint
from stages.read import batch_rows, item_json, list_items, source_from_config, source_spec

PLAN_BATCH = 32
PLAN_RETRIES = 2


def collect(ds, total: int, label: str, rep: Reporter | None) -> list[dict[str, Any]]:
    """All rows of a (small, metadata-only) dataset, with a progress bar while they stream in."""
    rows = []
    with (rep.progress(total, label) if rep else NullProgress()) as bar:
        for row in ds.iter_rows():
            rows.append(row)
            bar.update(bar.task_ids[0], completed=len(rows))
    return rows


def run_inline(items: list[dict], stages: list[Callable], label: str, rep: Reporter | None) -> list[dict[str, Any]]:
    """The batch stages called in this process, ``PLAN_BATCH`` items at a time: what the Ray
    Data version computes, for a plan too small to pay for the datasets' start."""
    rows: list[dict[str, Any]] = []
    with (rep.progress(len(items), label) if rep else NullProgress()) as bar:
        for i in range(0, len(items), PLAN_BATCH):
            batch: Any = {"item": np.array([item_json(it) for it in items[i:i + PLAN_BATCH]], dtype=object)}
            for stage in stages:
                batch = stage(batch)
            rows += batch_rows(batch)
            bar.update(bar.task_ids[0], completed=len(rows))
    return rows


def build_run_index(cfg: RunConfig, ex_items: list[dict], index_dir: str, ex_spec: str,
                    rep: Reporter | None = None, inline: bool = False) -> tuple[list[str], list[dict]]:
    """Build the exemplar index from the exemplar source into ``index_dir`` (a path or a URI: built
    in a local folder, then published); returns (ids indexed, error rows). ``inline``: read and
    embed in this process (``run_inline``), not in a Ray dataset."""
    import tempfile
    from functools import partial

    from connectors.storage import RemotePath, as_path, upload_dir
    from stages.retrieve import index_rows_batch, write_exemplar_index

    if inline:
        rows = run_inline(ex_items, [partial(index_rows_batch, spec=ex_spec)], "index", rep)
    else:
        import ray

        ds = ray.data.from_items([{"item": item_json(it)} for it in ex_items])
        ds = ds.map_batches(index_rows_batch, fn_kwargs={"spec": ex_spec}, batch_size=PLAN_BATCH,
                            batch_format="numpy")
        rows = collect(ds, len(ex_items), "index", rep)
    rows = sorted(rows, key=lambda r: str(r["layout_id"]))
    good = [r for r in rows if not r["error"]]
    errors = [json.loads(r["error"]) for r in rows if r["error"]]
    if not good:
        raise ValueError(f"{cfg.origin}: exemplars: no usable exemplar (with an image) in the exemplar source; "
                         f"{len(errors)} quarantined")
    target = as_path(index_dir)
    with tempfile.TemporaryDirectory(prefix="amgen-index-") as tmp:
        local = Path(tmp) / "index" if isinstance(target, RemotePath) else target
        write_exemplar_index([str(r["layout_id"]) for r in good], np.stack([r["embedding"] for r in good]),
                             [r["thumb"] for r in good], [json.loads(r["meta"]) for r in good], local,
                             cfg.exemplars.index_shards, seed=cfg.seed)
        if isinstance(target, RemotePath):
            upload_dir(local, target)
    return [str(r["layout_id"]) for r in good], errors


@dataclass
class PlanTimings:
    index_s: float = 0.0
    plan_s: float = 0.0


def exemplar_set(ids: list[str]) -> dict[str, Any]:
    """What an increment records of the exemplars it retrieved from."""
    text = "\n".join(sorted(ids))
    return {"exemplars_indexed": len(ids), "exemplar_set_sha256": hashlib.sha256(text.encode()).hexdigest()}


@dataclass
class PlanItems:
    """What a plan pass will plan: the target items (new ones only, for an increment) and the
    exemplar items to index (none when the config names a prebuilt index)."""
    targets: list[dict]
    exemplars: list[dict]
    index_built: bool

    def inline(self, cfg: RunConfig) -> bool:
        """Whether the pass runs its stages in the plan task (``ray.inline_plan_max``)."""
        return len(self.targets) + (len(self.exemplars) if self.index_built else 0) <= cfg.ray.inline_plan_max


def plan_items(cfg: RunConfig, known: set[str] | None = None) -> PlanItems:
    """List the sources. ``known``: target ids an earlier plan has seen, left out (an increment)."""
    src_cfg, ex_cfg = cfg.source, cfg.exemplars.source or cfg.source
    all_targets = list_items(source_from_config(src_cfg), src_cfg.limit)
    ex_items = all_targets if cfg.exemplars.source is None else list_items(source_from_config(ex_cfg), ex_cfg.limit)
    targets = all_targets if known is None else [t for t in all_targets if str(t["item_id"]) not in known]
    return PlanItems(targets, ex_items, index_built=cfg.exemplars.index is None)


def compute_plan(cfg: RunConfig, cfg_hash: str, index_dir: str, timings: PlanTimings,
                 rep: Reporter | None = None, known: set[str] | None = None,
                 items: PlanItems | None = None) -> Plan | None:
    """Index (unless the config names a prebuilt one), then read, augment, embed and retrieve every
    target; returns the plan with every error row of the pass.

    ``known``: target ids an earlier plan has seen; only the others are planned (an increment),
    against an index over the whole current exemplar source. None when there is nothing new.
    ``items``: the listing (``plan_items``), when the caller has it already."""
    import ray
    from stages.augment import read_and_augment_batch
    from stages.embed import EmbedStage
    from stages.retrieve import PlanRetrieveStage

    items = items or plan_items(cfg, known)
    targets, ex_items = items.targets, items.exemplars
    t_spec, e_spec = source_spec(cfg.source), source_spec(cfg.exemplars.source or cfg.source)
    if known is not None and not targets:
        return None
    inline = items.inline(cfg)
    extra_errors: list[dict] = []
    record: dict[str, Any] = {"index": cfg.exemplars.index} if cfg.exemplars.index else {}
    t0 = time.perf_counter()
    if cfg.exemplars.index is None:
        if rep:
            rep.info(f"building the exemplar index over {len(ex_items)} layouts")
        ex_ids, ex_errors = build_run_index(cfg, ex_items, index_dir, e_spec, rep, inline)
        record = exemplar_set(ex_ids)
        if cfg.exemplars.source is not None:  # same source: the target pass reports these itself
            extra_errors += ex_errors
        index_path = index_dir
    else:
        index_path = cfg.exemplars.index
    timings.index_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if rep:
        rep.info(f"planning {len(targets)} targets (read, augment, embed, retrieve)")
    ex = cfg.exemplars
    retrieve_args = (index_path, ex.k, ex.candidates, ex.diversity, dict(ex.filters), ex.exclude_self)
    read_kwargs = {"spec": t_spec, "augment": cfg.augment, "run_seed": cfg.seed}
    if inline:
        from functools import partial

        rows = run_inline(targets, [partial(read_and_augment_batch, **read_kwargs), EmbedStage(error_column="error"),
                                    PlanRetrieveStage(*retrieve_args)], "plan", rep)
    else:
        ds = ray.data.from_items([{"item": item_json(it)} for it in targets])
        ds = ds.map_batches(read_and_augment_batch, fn_kwargs=read_kwargs, batch_size=PLAN_BATCH, batch_format="numpy")
        ds = ds.map_batches(EmbedStage(error_column="error"), batch_size=PLAN_BATCH, batch_format="numpy")
        # The retrieval actors hold the index; Ray Data's own restart policy for pools applies
        # (they are CPU actors that never end their process on purpose, unlike the model's).
        ds = ds.map_batches(PlanRetrieveStage, fn_constructor_args=retrieve_args, batch_size=PLAN_BATCH,
                            batch_format="numpy", num_cpus=RETRIEVE_CPUS,
                            compute=actor_pool(retrieve_pool_size(cfg, ray.cluster_resources()), autoscale=True))
        rows = collect(ds, len(targets), "plan", rep)
    rows = sorted(rows, key=lambda r: str(r["layout_id"]))
    read_errors_ = [json.loads(r["error"]) for r in rows if r["error"]]
    planned = [{"target_id": str(r["layout_id"]), "target_item": str(r["item"]), "augment": str(r["augment"]),
                "matches": json.loads(r["matches"]) if r["matches"] else []} for r in rows if not r["error"]]
    ex_lookup = {str(it["item_id"]): item_json(it) for it in ex_items}
    plan = make_plan(planned, ex_lookup, k=ex.k, seed=cfg.seed, rows_per_shard=cfg.output.rows_per_shard,
                     config_hash=cfg_hash)
    plan.errors = sorted(plan.errors + read_errors_ + extra_errors,
                         key=lambda e: (str(e["input_id"]), e["stage"], e["reason"]))
    plan.num_targets = len(targets)
    plan.increments = [dict(first_increment(plan), **record)]
    timings.plan_s = time.perf_counter() - t0
    return plan


def _plan_task(cfg: RunConfig, cfg_hash: str, index_dir: str, out: str | None, base: Plan | None):
    """Pass 1 inside a worker: the index, the plan, and (unless a dry run) OUT/plan.parquet.
    With ``base`` (the folder's plan), only targets it has not seen are planned and appended.

    A generator of two values: first whether the stages run inline (so the driver may start the
    model actors while they do: an inline pass takes no Ray slot), then (plan, timings); the plan
    is None when there is nothing new."""
    from connectors.parquet_sink import write_errors
    from pipeline.cluster import configure_ray_data
    from pipeline.plan import append_increment, planned_target_ids, save_plan

    configure_ray_data(False)
    timings = PlanTimings()
    known = None if base is None else planned_target_ids(base)
    items = plan_items(cfg, known)
    yield items.inline(cfg)
    CrashPoint(env=PLAN_CRASH_ENV).batch()  # test hook (stages/failures.py); a no-op unless set
    plan = compute_plan(cfg, cfg_hash, index_dir, timings, known=known, items=items)
    if plan is None:
        yield None, timings
        return
    errors_name = "plan"
    if base is not None:
        plan = append_increment(base, plan, {k: v for k, v in plan.increments[0].items()
                                             if k not in ("increment", "first_shard", "num_shards", "targets",
                                                          "samples")})
        errors_name = f"plan-inc{len(plan.increments) - 1:03d}"
    if out is not None:
        seen = set() if base is None else {json.dumps(e, sort_keys=True) for e in base.errors}
        new_errors = [e for e in plan.errors if json.dumps(e, sort_keys=True) not in seen]
        if new_errors:
            write_errors(new_errors, out, errors_name)
        save_plan(plan, out)
    yield plan, timings


def plan_on_worker(cfg: RunConfig, cfg_hash: str, index_dir: str, out: str | None, timings: PlanTimings,
                   rep: Reporter | None = None, base: Plan | None = None,
                   while_inline: Callable[[], None] | None = None) -> Plan | None:
    """Run pass 1 in a Ray task (see the module doc); ``out`` None: a dry run, nothing is saved.
    ``base``: plan only the targets this plan has not seen (None back when there are none).
    ``while_inline``: called once the task says its stages run inline, while they run (the run
    starts its model actors there, so that their start and model load overlap the plan).

    The task takes no CPU slot: it mostly waits for the datasets it starts, which need the slots;
    an inline pass (small) runs in it, beside whatever else the node does."""
    import ray

    if rep:
        rep.info("looking for new targets (an increment)" if base is not None else
                 "planning on a worker: exemplar index, then read, augment, embed, retrieve")
    # A worker that dies (a system failure, not an error of the pass) is replaced and the pass
    # rerun: it is deterministic and writes its files whole, and Ray replays the two values.
    task = ray.remote(num_cpus=0, max_retries=PLAN_RETRIES, num_returns="streaming")(_plan_task)
    answers = task.remote(cfg, cfg_hash, index_dir, out, base)
    if ray.get(next(answers)) and while_inline is not None:
        while_inline()
    plan, t = ray.get(next(answers))
    timings.index_s, timings.plan_s = t.index_s, t.plan_s
    return plan
