"""Pass 2: the plan's unfinished shards -> group by exemplar -> load -> synthesize (actor pool)
-> score -> write.

Only the model runs on actors; loading is a light CPU task in front of them. The driver is the
writer: it receives sample rows as the actors finish them and writes each shard the moment it is
complete (stages/write.py), recording it in the manifest (pipeline/finish.py).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline.cluster import LOADER_CPUS, SCORE_CPUS, Workers, actor_pool, restart_policy
from pipeline.config import RunConfig
from pipeline.console import Reporter
from pipeline.finish import ManifestLog, RunSummary, finish_run
from pipeline.plan import Plan
from stages.group import group_samples, load_groups_batch
from stages.read import source_spec



def synthesis_dataset(cfg: RunConfig, groups: list[dict], workers: Workers):
    """The streaming part of pass 2 as a Ray dataset of sample rows."""
    import ray
    from stages.synthesize import Synthesizer

    model = cfg.model.model_dump(mode="json")
    ds = ray.data.from_items([{"group": json.dumps(g, sort_keys=True)} for g in groups],
                             override_num_blocks=max(1, min(len(groups), 4 * workers.actors * 8)))
    ds = ds.map_batches(load_groups_batch, fn_kwargs={"target_spec": source_spec(cfg.source),
                                                       "exemplar_spec": source_spec(cfg.exemplars.source or cfg.source)},
                        batch_size=1, batch_format="numpy", num_cpus=LOADER_CPUS)
    ds = ds.map_batches(Synthesizer, fn_constructor_args=(model,),
                        fn_constructor_kwargs={"device": workers.device, "torch_threads": workers.torch_threads,
                                               "bank_cache_size": cfg.synthesis.bank_cache_size,
                                               "bank_cache_bytes": cfg.synthesis.bank_cache_bytes,
                                               "restart_on_device_error": True},
                        batch_size=1, batch_format="numpy", compute=actor_pool(workers.actors),
                        num_cpus=workers.num_cpus, num_gpus=workers.num_gpus or None, **restart_policy(cfg))
    if cfg.score.enabled:
        from stages.score import Scorer

        ds = ds.map_batches(Scorer, fn_constructor_args=(cfg.score.segmenter, 1),
                            fn_constructor_kwargs={"restart_on_device_error": True}, batch_size=16,
                            batch_format="numpy", compute=actor_pool(workers.score_actors, autoscale=True),
                            num_cpus=SCORE_CPUS, **restart_policy(cfg))
    return ds


class ShardSink:
    """The driver's end of pass 2: sample rows go to the shard writer; every shard it completes is
    recorded in the manifest log. ``fail_after_shards`` raises after that many shards (tests crash
    a run with it)."""

    def __init__(self, cfg: RunConfig, plan: Plan, pending: list[int], log: ManifestLog,
                 fail_after_shards: int | None = None) -> RunSummary:
        from stages.score import SCORE_COLUMNS
        from stages.write import ShardWriter

        self.log = log
        self.fail_after_shards = fail_after_shards
        expected = {s: [r["sample_id"] for r in plan.shard_rows(s)] for s in pending}
        self.writer = ShardWriter(log.out, expected, plan.num_shards, log.summary.config_hash,
                                  SCORE_COLUMNS if cfg.score.enabled else (), expected_model=log.summary.model,
                                  on_shard=self._shard_written)

    def add(self, row: dict[str, Any]) -> None:
        self.writer.add(row)

    def _shard_written(self, stats, shard: int) -> None:
        self.log.shard_written(stats, shard, synthesized=self.writer.synthesized, model=self.writer.model)
        n = self.log.this_run["shards_written"]
        if self.fail_after_shards is not None and n >= self.fail_after_shards:
            raise RuntimeError(f"injected failure after {self.fail_after_shards} shard(s) (fail_after_shards)")


def synthesize_pending(cfg: RunConfig, plan: Plan, pending: list[int], done: set[int], workers: Workers,
                       sink: ShardSink, rep: Reporter) -> float:
    """Synthesize every sample of the ``pending`` shards into ``sink``; returns the seconds it took."""
    pending_rows = [r for s in pending for r in plan.shard_rows(s)]
    t_synth = time.perf_counter()
    if pending_rows:
        groups = group_samples(pending_rows, cfg.synthesis.batch_size)
        rep.info(f"synthesizing {len(pending_rows)} samples in {len(groups)} exemplar groups, {len(pending)} shard(s) "
                 f"on {workers.actors} actor(s) [{workers.device}, {workers.num_gpus:g} GPU each]"
                 + (f"; {len(done)} shard(s) already done" if done else ""))
        ds = synthesis_dataset(cfg, groups, workers)
        with rep.progress(len(pending_rows), "synthesize") as bar:
            task = bar.task_ids[0]
            n = 0
            for row in ds.iter_rows():
                sink.add(row)
                n += 1
                el = time.perf_counter() - t_synth
                bar.update(task, completed=n, rate=f"{n / el:.1f} img/s" if el > 0 else "")
        if sink.writer.pending():
            raise RuntimeError(f"shards {sink.writer.pending()} did not receive all their samples")
    else:
        rep.info("every shard is already written; nothing to synthesize")
    return time.perf_counter() - t_synth


def synthesize_and_write(cfg: RunConfig, plan: Plan, out: Path, pending: list[int], done: set[int],
                         workers: Workers, summary: RunSummary, rep: Reporter, t_start: float,
                         fail_after_shards: int | None = None, done_stats: dict | None = None) -> RunSummary:
    """Pass 2 and the finish: the shards, then the derived files and the complete manifest.
    ``done_stats``: stats of the ``done`` shards, from resume's audit (none for a new run)."""
    log = ManifestLog.open(cfg, out, summary, done_stats or {})
    sink = ShardSink(cfg, plan, pending, log, fail_after_shards)
    synth_s = synthesize_pending(cfg, plan, pending, done, workers, sink, rep)
    return finish_run(cfg, plan, log, sink.writer, synth_s, t_start)
