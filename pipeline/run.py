"""The run as a Ray Data DAG, in two streaming passes around one barrier: the plan.

    pass 1 (plan)    items -> read -> augment -> embed -> retrieve            -> OUT/plan.parquet
    pass 2 (samples) plan -> group by exemplar -> load -> synthesize (actor pool) -> score -> write

Pass 2 only sees groups of unfinished shards. This module only orders the jobs:
pipeline/cluster.py (Ray, actor sizing), plan_pass.py, synthesis_pass.py, finish.py (manifest,
card, preview, export), console.py (progress, summary), demo_data.py (toy-town inputs).
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from connectors.storage import RemotePath, as_path, location_str
from pipeline.cluster import LOADER_CPUS, Workers, configure_ray_data, ensure_ray, plan_workers, wait_for_gpus
from pipeline.config import RunConfig, check_paths, config_hash
from pipeline.console import Reporter
from pipeline.demo_data import prepare_toytown
from pipeline.finish import RunSummary, count_stages
from pipeline.plan import load_plan, plan_config_hash
from pipeline.plan_pass import PlanTimings, plan_on_worker
from pipeline.resume import INDEX_DIR, audit_shards, finished_shards, prepare_out
from pipeline.synthesis_actors import start_synthesis_actors
from pipeline.synthesis_pass import synthesize_and_write


def facts_on_workers(paths: list[str], recorded: set[str]) -> list:
    """resume's shard reads (sha256, stats) as Ray tasks: a resume's hashing of every finished shard
    runs on the workers, in parallel, and not a shard byte passes the driver."""
    import ray

    from connectors.storage import file_sha256
    from pipeline.resume import read_shard_facts

    sha = ray.remote(num_cpus=LOADER_CPUS)(lambda p: (file_sha256(p), None, ""))
    full = ray.remote(num_cpus=LOADER_CPUS)(read_shard_facts)
    return ray.get([(sha if p in recorded else full).remote(p) for p in paths])


class EarlyActors:
    """The model actors of a new run, started while its plan runs inline (a small plan takes no
    Ray slot), so that their start and model load overlap the plan instead of following it."""

    def __init__(self, cfg: RunConfig, rep: Reporter):
        self.cfg, self.rep = cfg, rep
        self.workers: Workers | None = None
        self.actors: list = []

    def start(self) -> None:
        self.workers = plan_workers(self.cfg, wait_for_gpus(self.cfg, self.rep.info))
        self.actors = start_synthesis_actors(self.cfg, self.workers)

    def take(self) -> list:
        """The actors, now the synthesis pass's to use and end."""
        actors, self.actors = self.actors, []
        return actors

    def kill(self) -> None:
        """End actors nobody took (the run failed before pass 2)."""
        import ray

        for a in self.take():
            ray.kill(a)


def run_pipeline(cfg: RunConfig, *, out: str | os.PathLike | None = None, overwrite: bool = False,
                 dry_run: bool = False, console=None, fail_after_shards: int | None = None) -> RunSummary:
    """Plan (or load the plan), synthesize the unfinished shards, write, summarize.

    ``fail_after_shards``: raise after that many shards were written (tests use it to crash a run).
    """
    t_start = time.perf_counter()
    rep = Reporter(console)
    out = as_path(out or cfg.output.dir)
    if not isinstance(out, RemotePath) and not out.is_absolute() and (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        rep.info(f"output.dir {out} is relative: on a cluster it lands in the driver's working folder; "
                 "give an absolute shared path or a URI (s3://...) that every node can reach")
    check_paths(cfg)
    if cfg.score.enabled or cfg.gate.enabled:
        from stages.score import check_scorer

        check_scorer(cfg.score.segmenter)
    h = config_hash(cfg)
    existing = plan_config_hash(out)
    if dry_run:
        mode = "dry-run"
        if existing is not None and existing != h and not overwrite:
            prepare_out(out, h, overwrite=False)  # raises the config-mismatch error
    else:
        mode = prepare_out(out, h, overwrite)
    prepare_toytown(cfg, rep.info)
    started_ray = ensure_ray(cfg)
    early = None
    try:
        import ray

        configure_ray_data(False)
        early = EarlyActors(cfg, rep)
        timings = PlanTimings()
        reuse_plan = existing == h and not overwrite
        if reuse_plan:
            plan = load_plan(out)
            rep.info(f"resuming {out}: plan of {plan.num_samples} samples in {plan.num_shards} shards")
            if not dry_run:  # a source that grew: plan only its new targets, appended as new shards
                grown = plan_on_worker(cfg, h, location_str(out / INDEX_DIR), location_str(out), timings, rep,
                                       base=plan)
                if grown is not None:
                    inc = grown.increments[-1]
                    rep.info(f"increment {inc['increment']}: {inc['targets']} new target(s), {inc['samples']} "
                             f"sample(s) in {inc['num_shards']} new shard(s)")
                    plan, mode = grown, "increment"
        elif dry_run:
            with tempfile.TemporaryDirectory(prefix="amgen-index-") as tmp:
                plan = plan_on_worker(cfg, h, str(Path(tmp) / INDEX_DIR), None, timings, rep)
        else:
            plan = plan_on_worker(cfg, h, location_str(out / INDEX_DIR), location_str(out), timings, rep,
                                  while_inline=early.start)
        workers = early.workers or plan_workers(cfg, ray.cluster_resources() if dry_run else wait_for_gpus(cfg, rep.info))
        if workers.note:
            rep.info(workers.note)
        remade, done_stats = [], {}
        if reuse_plan and not dry_run:
            # Damaged or missing shards are moved aside and made again (a dry run moves nothing).
            audit = audit_shards(out, plan.num_shards, base_shards=plan.base_shards, facts=facts_on_workers)
            done, done_stats, remade = audit.done, audit.stats, [r.to_dict() for r in audit.remade]
            for r in audit.remade:
                rep.info(f"remaking {r.name}: {r.reason}" + (f" (moved to {r.moved_to})" if r.moved_to else ""))
        else:
            done = finished_shards(out, plan.num_shards, plan.base_shards) if reuse_plan else set()
        pending = [s for s in range(plan.num_shards) if s not in done]
        summary = RunSummary(
            out=str(out), mode=mode, config_hash=h, model=None,
            targets=plan.num_targets, planned=plan.num_samples, exemplars=plan.num_exemplars(),
            shards=plan.num_shards, shards_skipped=len(done), shards_written=0, synthesized=0, written=0,
            quarantined=len(plan.errors), workers=asdict(workers),
            timings={"index_s": round(timings.index_s, 3), "plan_s": round(timings.plan_s, 3)}, remade=remade,
            increments=list(plan.increments))
        if dry_run:
            summary.quarantined_by_stage = count_stages(plan.errors)
            summary.written = sum(len(plan.shard_rows(s)) for s in done)
            summary.timings["total_s"] = round(time.perf_counter() - t_start, 3)
            return summary
        return synthesize_and_write(cfg, plan, out, pending, done, workers, summary, rep, t_start, fail_after_shards,
                                    done_stats=done_stats, actors=early.take())
    finally:
        if early is not None:
            early.kill()
        if started_ray:
            import ray

            ray.shutdown()
