"""Pass 2: the plan's unfinished shards -> group by exemplar -> load -> synthesize (actor pool)
-> score -> write.

Only the model runs on actors (pipeline/synthesis_actors.py: plain Ray actors built from the model
config); loading is a light CPU task in front of them that queues each loaded group at its actor. Writing happens on
the workers (pipeline/shard_writers.py): writer actors write each shard the moment it is complete
(stages/write.py); the driver receives per-shard stats and records them in the manifest
(pipeline/finish.py).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline.cluster import LOADER_CPUS, Workers
from pipeline.config import RunConfig
from pipeline.console import Reporter
from pipeline.finish import ManifestLog, RunSummary, finish_run
from pipeline.plan import Plan
from pipeline.shard_writers import PassTally, deliver_batch, raise_problem, start_writers
from pipeline.scoring_actors import optional_columns, start_scoring_actors
from pipeline.synthesis_actors import start_synthesis_actors
from connectors.parquet_sink import ShardStats
from connectors.storage import location_str
from stages.group import group_samples
from stages.read import source_spec



def synthesis_dataset(cfg: RunConfig, groups: list[dict], workers: Workers, actors: list, scorers: list = ()):
    """The streaming part of pass 2 as a Ray dataset of sample rows; ``actors``: the model actors
    (pipeline/synthesis_actors.py); ``scorers``: the scorer actors (pipeline/scoring_actors.py),
    when scoring or the gate is on."""
    import ray
    from ray.data import TaskPoolStrategy

    from pipeline.synthesis_actors import load_and_synthesize_batch

    ds = ray.data.from_items([{"group": json.dumps(g, sort_keys=True)} for g in groups],
                             override_num_blocks=max(1, min(len(groups), 4 * workers.actors * 8)))
    # One group per task; per actor, one group in the model and prefetch_batches loaded and queued.
    in_flight = workers.actors * (1 + cfg.synthesis.prefetch_batches)
    ds = ds.map_batches(load_and_synthesize_batch,
                        fn_kwargs={"target_spec": source_spec(cfg.source),
                                   "exemplar_spec": source_spec(cfg.exemplars.source or cfg.source), "actors": actors},
                        batch_size=1, batch_format="numpy", num_cpus=LOADER_CPUS,
                        compute=TaskPoolStrategy(size=in_flight))
    if scorers:
        from pipeline.scoring_actors import score_batch

        # One batch in each scorer and one queued behind it.
        ds = ds.map_batches(score_batch, fn_kwargs={"actors": list(scorers)}, batch_size=16, batch_format="numpy",
                            num_cpus=LOADER_CPUS, compute=TaskPoolStrategy(size=2 * len(scorers)))
    return ds


class ShardLedger:
    """The driver's end of pass 2: tally rows from the writers (no sample bytes); every shard they
    finished is recorded in the manifest log. ``fail_after_shards`` makes the writer stop after
    that many shards and the run raise (tests crash a run with it)."""

    def __init__(self, log: ManifestLog, fail_after_shards: int | None = None):
        self.log = log
        self.fail_after_shards = fail_after_shards
        self.tally = PassTally(model=log.summary.model)

    def take(self, row: dict[str, Any]) -> int:
        """One tally row; returns the samples it accounts for."""
        t = self.tally
        t.samples += int(row["taken"])
        t.synthesized += int(row["synthesized"])
        t.quarantined += int(row["quarantined"])
        t.banks_new += int(row["banks_new"])
        t.model_seconds += float(row["model_seconds"])
        t.model_cpu_seconds += float(row["model_cpu_seconds"])
        if row["model"]:
            t.model = str(row["model"])
        for d in json.loads(row["completed"]):
            stats = ShardStats.from_dict(d)
            t.written[stats.index] = stats
            self.log.shard_written(stats, stats.index, synthesized=t.synthesized, model=t.model)
        if row["problem"]:
            raise_problem(str(row["problem"]))
        return int(row["taken"])


def synthesize_pending(cfg: RunConfig, plan: Plan, pending: list[int], done: set[int], workers: Workers,
                       ledger: ShardLedger, rep: Reporter, actors: list | None = None) -> float:
    """Synthesize every sample of the ``pending`` shards; writer actors write them and ``ledger``
    records their stats. Returns the seconds it took. ``actors``: model actors already started
    for ``workers`` (pipeline/run.py starts them during an inline plan); this pass ends them."""
    import ray

    pending_rows = [r for s in pending for r in plan.shard_rows(s)]
    t_synth = time.perf_counter()
    if not pending_rows:
        for a in actors or []:
            ray.kill(a)
        rep.info("every shard is already written; nothing to synthesize")
        return time.perf_counter() - t_synth
    groups = group_samples(pending_rows, cfg.synthesis.batch_size)
    rep.info(f"synthesizing {len(pending_rows)} samples in {len(groups)} exemplar groups, {len(pending)} shard(s) "
             f"on {workers.actors} actor(s) [{workers.device}, {workers.num_gpus:g} GPU each]"
             + (f"; {len(done)} shard(s) already done" if done else ""))
    log = ledger.log
    expected = {s: [r["sample_id"] for r in plan.shard_rows(s)] for s in pending}
    # One writer per model actor (a crash test wants exactly N shards: one writer then).
    count = 1 if ledger.fail_after_shards is not None else workers.actors
    writers = start_writers(location_str(log.out), expected, plan.shard_totals(), log.summary.config_hash,
                            optional_columns(cfg), log.summary.model, count,
                            stop_after=ledger.fail_after_shards)
    actors = actors or start_synthesis_actors(cfg, workers)
    scorers = start_scoring_actors(cfg, workers)
    try:
        ds = synthesis_dataset(cfg, groups, workers, actors, scorers)
        ds = ds.map_batches(deliver_batch, fn_kwargs={"writers": writers}, batch_size=None,
                            batch_format="numpy", num_cpus=LOADER_CPUS)
        with rep.progress(len(pending_rows), "synthesize") as bar:
            task = bar.task_ids[0]
            n = 0
            for row in ds.iter_rows():
                n += ledger.take(row)
                el = time.perf_counter() - t_synth
                bar.update(task, completed=n, rate=f"{n / el:.1f} img/s" if el > 0 else "")
        left = sorted(s for p in ray.get([w.pending.remote() for w in writers]) for s in p)
        if left:
            raise RuntimeError(f"shards {left} did not receive all their samples")
    finally:
        for a in [*writers, *actors, *scorers]:
            ray.kill(a)
    return time.perf_counter() - t_synth


def synthesize_and_write(cfg: RunConfig, plan: Plan, out: Path, pending: list[int], done: set[int],
                         workers: Workers, summary: RunSummary, rep: Reporter, t_start: float,
                         fail_after_shards: int | None = None, done_stats: dict | None = None,
                         actors: list | None = None) -> RunSummary:
    """Pass 2 and the finish: the shards, then the derived files and the complete manifest.
    ``done_stats``: stats of the ``done`` shards, from resume's audit (none for a new run);
    ``actors``: model actors already started (see ``synthesize_pending``)."""
    log = ManifestLog.open(cfg, out, summary, done_stats or {})
    ledger = ShardLedger(log, fail_after_shards)
    synth_s = synthesize_pending(cfg, plan, pending, done, workers, ledger, rep, actors)
    return finish_run(cfg, plan, log, ledger.tally, synth_s, t_start)
