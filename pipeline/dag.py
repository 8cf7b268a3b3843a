"""The run as a Ray Data DAG, in two streaming passes around one barrier: the plan.

    pass 1 (plan)    items -> read -> augment -> embed -> retrieve            -> OUT/plan.parquet
    pass 2 (samples) plan -> group by exemplar -> load -> synthesize (actor pool) -> score -> write

Retrieval needs a complete index, and an exact resume needs every sample's place fixed before
any pixel exists, so the plan is the one barrier. Pass 2 only sees groups of unfinished shards.
The driver is the writer: it receives sample rows as the actors finish them and writes each
shard the moment it is complete (stages/write.py).
"""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from connectors.parquet_sink import (
    DatasetCardInfo, ShardStats, read_errors, write_dataset_card, write_errors, write_manifest,
)
from pipeline.config import RunConfig, check_paths, config_hash
from pipeline.plan import Plan, load_plan, make_plan, plan_config_hash, save_plan
from pipeline.resume import INDEX_DIR, finished_shards, prepare_out, previous_shard_stats
from stages.group import group_samples, load_group, source_spec
from stages.read import item_json, list_items, source_from_config

LOADER_CPUS = 0.25  # the loader is light; it must never starve the model actors of CPU slots
PLAN_BATCH = 32


class ClusterResourceError(RuntimeError):
    """The cluster cannot run what the config asks for (e.g. GPUs that are not there)."""


# ---------------------------------------------------------------- Ray set-up

def ensure_ray(cfg: RunConfig) -> bool:
    """Connect to (or start) Ray; returns True when this call started it (and should stop it)."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:  # a cluster: `ray job submit` sets RAY_ADDRESS for the driver
        ray.init(address=address, log_to_driver=True)
    else:  # local by default, CPU only (local_mode no longer exists in Ray). "local" always starts
        # a fresh instance, never one that `ray start` left on this machine.
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, num_gpus=0, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    return True


def _actors(n: int):
    from ray.data import ActorPoolStrategy

    return ActorPoolStrategy(size=int(n))


def _quiet_ray_data(show_progress: bool) -> None:
    import logging

    from ray.data import DataContext

    # Our own bars and summary speak for the run; Ray Data's per-dataset INFO lines are noise here.
    logging.getLogger("ray.data").setLevel(logging.ERROR)

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = show_progress
    ctx.execution_options.preserve_order = False
    ctx.execution_options.verbose_progress = False
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = False


@dataclass
class Workers:
    actors: int
    num_gpus: float
    num_cpus: float
    device: str
    torch_threads: int
    note: str = ""


def wait_for_gpus(cfg: RunConfig, say: Callable[[str], None] | None = None) -> dict[str, float]:
    """On an autoscaling cluster GPU workers may not exist yet: ask the autoscaler for the actors'
    bundles and wait up to ``synthesis.gpu_wait_s`` for them; returns the cluster's resources."""
    import ray

    s = cfg.synthesis
    have = ray.cluster_resources()
    if s.num_gpus <= 0 or s.gpu_wait_s <= 0 or have.get("GPU", 0.0) >= s.num_gpus * s.actors:
        return have
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"GPU": s.num_gpus, "CPU": s.num_cpus}] * s.actors)
    if say:
        say(f"waiting up to {s.gpu_wait_s:g}s for {s.num_gpus * s.actors:g} GPU(s) from the autoscaler")
    deadline = time.monotonic() + s.gpu_wait_s
    while time.monotonic() < deadline and have.get("GPU", 0.0) < s.num_gpus * s.actors:
        time.sleep(5)
        have = ray.cluster_resources()
    return have


def plan_workers(cfg: RunConfig, cluster: dict[str, float]) -> Workers:
    """Check the cluster against the config BEFORE asking for actors: an actor that asks for a GPU
    the cluster does not have waits forever instead of failing."""
    s, m = cfg.synthesis, cfg.model
    gpus = float(cluster.get("GPU", 0.0))
    cpus = float(cluster.get("CPU", 0.0))
    threads = s.torch_threads or max(1, int(s.num_cpus))
    if s.num_gpus > 0:
        if gpus < s.num_gpus:
            if not s.allow_cpu_fallback:
                raise ClusterResourceError(
                    f"{cfg.origin}: synthesis.num_gpus={s.num_gpus} per actor, but the Ray cluster has {gpus:g} GPU(s). "
                    "Start GPU workers, or set synthesis.num_gpus: 0 (CPU), or synthesis.allow_cpu_fallback: true.")
            return Workers(s.actors, 0.0, s.num_cpus, "cpu", threads,
                           note=f"no GPU in the cluster ({gpus:g}); falling back to CPU (synthesis.allow_cpu_fallback)")
        fit = int(gpus // s.num_gpus)
        device = "cuda" if m.device in ("auto", "cuda") else "cpu"
        note = "" if fit >= s.actors else f"only {fit} actor(s) fit on {gpus:g} GPU(s); using {fit}"
        return Workers(min(s.actors, fit), s.num_gpus, s.num_cpus, device, threads, note)
    if m.device == "cuda":
        raise ClusterResourceError(f"{cfg.origin}: model.device is 'cuda' but synthesis.num_gpus is 0; "
                                   "give each actor a GPU (synthesis.num_gpus: 1) or use device: cpu/auto")
    if cpus and s.num_cpus > cpus:
        raise ClusterResourceError(f"{cfg.origin}: synthesis.num_cpus={s.num_cpus} per actor, but the Ray "
                                   f"cluster has {cpus:g} CPU(s)")
    fit = int(cpus // s.num_cpus) if cpus else s.actors
    note = "" if fit >= s.actors else f"only {fit} actor(s) fit on {cpus:g} CPU(s); using {fit}"
    return Workers(max(1, min(s.actors, fit)), 0.0, s.num_cpus, "cpu", threads, note)


# ---------------------------------------------------------------- pass 1: index + plan (Ray Data stages)

def _batch_rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: batch[k][i] for k in keys} for i in range(n)]


def _columns(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in keys}


def _index_meta(layout) -> dict[str, Any]:
    meta = {"source": layout.source, "split": layout.split}
    meta.update({k: v for k, v in layout.meta.items() if isinstance(v, (str, int, float, bool)) or v is None})
    return meta


def read_for_index(batch: dict[str, Any], spec: str) -> dict[str, list]:
    """Exemplar items -> embedding, small label map and metadata (what the index keeps)."""
    from stages.embed import layout_embedding
    from stages.group import cached_source
    from stages.read import read_item
    from stages.retrieve import DEFAULT_RERANK_SIZE, resize_nearest

    src = cached_source(spec)
    rows = []
    for raw in batch["item"]:
        item = json.loads(raw)
        lay, err = read_item(src, item, stage="exemplar")
        ok = lay is not None and lay.image is not None
        if lay is not None and lay.image is None:
            err = {"input_id": item["item_id"], "source": item.get("source"), "stage": "exemplar",
                   "reason": "exemplar has no image", "path": item.get("path")}
        rows.append({
            "layout_id": str(item["item_id"]), "error": "" if ok else json.dumps(err),
            "embedding": layout_embedding(lay.label) if ok else np.zeros(1, np.float32),
            "thumb": resize_nearest(lay.label, DEFAULT_RERANK_SIZE).astype(np.uint8) if ok else np.zeros((1, 1), np.uint8),
            "meta": json.dumps(_index_meta(lay) if ok else {}, sort_keys=True),
        })
    return _columns(rows, ("layout_id", "error", "embedding", "thumb", "meta"))


def collect(ds, total: int, label: str, rep: "Reporter | None") -> list[dict[str, Any]]:
    """All rows of a (small, metadata-only) dataset, with a progress bar while they stream in."""
    rows = []
    with (rep.progress(total, label) if rep else _NullProgress()) as bar:
        for row in ds.iter_rows():
            rows.append(row)
            bar.update(bar.task_ids[0], completed=len(rows))
    return rows


def build_index(cfg: RunConfig, ex_items: list[dict], index_dir: Path, ex_spec: str,
                rep: "Reporter | None" = None) -> tuple[int, list[dict]]:
    """Build the exemplar index from the exemplar source; returns (rows indexed, error rows)."""
    import ray
    from connectors.index_store import ShardedIndex
    from stages.embed import EMBED_VERSION

    ds = ray.data.from_items([{"item": item_json(it)} for it in ex_items])
    ds = ds.map_batches(read_for_index, fn_kwargs={"spec": ex_spec}, batch_size=PLAN_BATCH, batch_format="numpy")
    rows = sorted(collect(ds, len(ex_items), "index", rep), key=lambda r: str(r["layout_id"]))
    good = [r for r in rows if not r["error"]]
    errors = [json.loads(r["error"]) for r in rows if r["error"]]
    if not good:
        raise ValueError(f"{cfg.origin}: exemplars: no usable exemplar (with an image) in the exemplar source; "
                         f"{len(errors)} quarantined")
    ShardedIndex.build(np.stack([r["embedding"] for r in good]), [str(r["layout_id"]) for r in good],
                       [json.loads(r["meta"]) for r in good], index_dir, cfg.exemplars.index_shards,
                       labels=np.stack([r["thumb"] for r in good]), embedding_version=EMBED_VERSION,
                       seed=cfg.seed)
    return len(good), errors


def plan_read(batch: dict[str, Any], spec: str, augment: dict, run_seed: int) -> dict[str, list]:
    """read + augment of pass 1 (labels only: the plan needs where classes are, not pixels)."""
    from pipeline.config import AugmentConfig
    from stages.augment import augment_layout, record_json
    from stages.group import cached_source
    from stages.read import error_row, read_item

    src, aug = cached_source(spec), AugmentConfig.model_validate(augment)
    rows = []
    for raw in batch["item"]:
        item = json.loads(raw)
        lay, err = read_item(src, item, stage="read")
        rec = ""
        if lay is not None:
            lay.image = None  # the image is read again when synthesizing
            try:
                lay, rec_d = augment_layout(lay, aug, run_seed)
                rec = record_json(rec_d)
            except ValueError as e:
                lay, err = None, error_row(item, "augment", e)
        rows.append({"layout_id": str(item["item_id"]), "item": str(raw), "augment": rec,
                     "error": "" if lay is not None else json.dumps(err),
                     "label": lay.label if lay is not None else np.zeros((1, 1), np.uint8)})
    return _columns(rows, ("layout_id", "item", "augment", "error", "label"))


def plan_embed(batch: dict[str, Any]) -> dict[str, list]:
    """embed of pass 1: the layout vector of every augmented target (zeros for quarantined rows)."""
    from stages.embed import EMBED_DIM, layout_embedding

    emb = [layout_embedding(lab) if not err else np.zeros(EMBED_DIM, np.float32)
           for lab, err in zip(batch["label"], batch["error"])]
    out = dict(batch)
    out["embedding"] = emb
    return out


class PlanRetrieve:
    """retrieve of pass 1 (an actor: the index loads once); adds ``matches`` (JSON, best first)."""

    def __init__(self, index_dir: str, k: int, candidates: int, diversity: float, filters: dict, exclude_self: bool):
        from stages.retrieve import RetrieveStage

        self.stage = RetrieveStage(index_dir, k=k, candidates=max(candidates, k), diversity=diversity,
                                   filters=filters or None, id_column="layout_id" if exclude_self else "__none__")

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        rows = _batch_rows(batch)
        ok = [i for i, r in enumerate(rows) if not r["error"]]
        matches = [""] * len(rows)
        if ok:
            sub = {"layout_id": np.array([rows[i]["layout_id"] for i in ok], dtype=object),
                   "label": [rows[i]["label"] for i in ok],
                   "embedding": np.stack([rows[i]["embedding"] for i in ok])}
            res = self.stage(sub)
            for j, i in enumerate(ok):
                matches[i] = str(res["exemplar_matches"][j])
        out = _columns(rows, ("layout_id", "item", "augment", "error"))
        out["matches"] = matches
        return out


@dataclass
class PlanTimings:
    index_s: float = 0.0
    plan_s: float = 0.0


def compute_plan(cfg: RunConfig, cfg_hash: str, index_dir: Path, timings: PlanTimings,
                 rep: "Reporter | None" = None) -> Plan:
    import ray

    src_cfg = cfg.source
    ex_cfg = cfg.exemplars.source or cfg.source
    t_spec, e_spec = source_spec(src_cfg), source_spec(ex_cfg)
    targets = list_items(source_from_config(src_cfg), src_cfg.limit)
    ex_items = targets if cfg.exemplars.source is None else list_items(source_from_config(ex_cfg), ex_cfg.limit)
    extra_errors: list[dict] = []
    t0 = time.perf_counter()
    if cfg.exemplars.index is None:
        if rep:
            rep.info(f"building the exemplar index over {len(ex_items)} layouts")
        _, ex_errors = build_index(cfg, ex_items, index_dir, e_spec, rep)
        if cfg.exemplars.source is not None:  # same source: the target pass reports these itself
            extra_errors += ex_errors
        index_path = str(index_dir)
    else:
        index_path = cfg.exemplars.index
    timings.index_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if rep:
        rep.info(f"planning {len(targets)} targets (read, augment, embed, retrieve)")
    ex = cfg.exemplars
    ds = ray.data.from_items([{"item": item_json(it)} for it in targets])
    ds = ds.map_batches(plan_read, fn_kwargs={"spec": t_spec, "augment": cfg.augment.model_dump(mode="json"),
                                              "run_seed": cfg.seed}, batch_size=PLAN_BATCH, batch_format="numpy")
    ds = ds.map_batches(plan_embed, batch_size=PLAN_BATCH, batch_format="numpy")
    ds = ds.map_batches(PlanRetrieve, fn_constructor_args=(index_path, ex.k, ex.candidates, ex.diversity,
                                                           dict(ex.filters), ex.exclude_self),
                        batch_size=PLAN_BATCH, batch_format="numpy", compute=_actors(1))
    rows = sorted(collect(ds, len(targets), "plan", rep), key=lambda r: str(r["layout_id"]))
    read_errors_ = [json.loads(r["error"]) for r in rows if r["error"]]
    planned = [{"target_id": str(r["layout_id"]), "target_item": str(r["item"]), "augment": str(r["augment"]),
                "matches": json.loads(r["matches"]) if r["matches"] else []} for r in rows if not r["error"]]
    ex_lookup = {str(it["item_id"]): item_json(it) for it in ex_items}
    plan = make_plan(planned, ex_lookup, k=ex.k, seed=cfg.seed, rows_per_shard=cfg.output.rows_per_shard,
                     config_hash=cfg_hash)
    plan.errors = sorted(plan.errors + read_errors_ + extra_errors,
                         key=lambda e: (str(e["input_id"]), e["stage"], e["reason"]))
    plan.num_targets = len(targets)
    timings.plan_s = time.perf_counter() - t0
    return plan


# ---------------------------------------------------------------- pass 2: synthesize + write

def load_groups_batch(batch: dict[str, Any], target_spec: str, exemplar_spec: str) -> dict[str, list]:
    rows = [load_group(json.loads(g), target_spec, exemplar_spec) for g in batch["group"]]
    return _columns(rows, ("group", "payload", "error"))


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
                                               "bank_cache_bytes": cfg.synthesis.bank_cache_bytes},
                        batch_size=1, batch_format="numpy", compute=_actors(workers.actors),
                        num_cpus=workers.num_cpus, num_gpus=workers.num_gpus or None)
    if cfg.score.enabled:
        from stages.score import Scorer

        ds = ds.map_batches(Scorer, fn_constructor_args=(cfg.score.segmenter, 1), batch_size=16,
                            batch_format="numpy", compute=_actors(1), num_cpus=LOADER_CPUS)
    return ds


# ---------------------------------------------------------------- the run

@dataclass
class RunSummary:
    out: str
    mode: str                     # new | resume | overwrite | dry-run
    config_hash: str
    model: str | None
    targets: int
    planned: int
    exemplars: int
    shards: int
    shards_skipped: int           # finished before this run
    shards_written: int           # by this run
    synthesized: int              # samples this run produced
    written: int                  # samples in the dataset (all shards)
    quarantined: int              # inputs and samples in errors/
    quarantined_by_stage: dict[str, int] = field(default_factory=dict)
    banks_encoded: int = 0
    workers: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    images_per_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("amgen", "torch", "diffusers", "ray", "datasets", "albumentations", "faiss-cpu", "pyarrow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def prepare_toytown(cfg: RunConfig, on_progress: Callable[[str], None] | None = None) -> None:
    """A toytown source with ``make`` is generated on first use (deterministic by its seed)."""
    for src in (cfg.source, cfg.exemplars.source):
        if src is None or src.kind != "toytown" or src.make is None:
            continue
        if (Path(src.root) / "gtFine" / src.split).is_dir():
            continue
        from toytown import make_tree

        if on_progress:
            on_progress(f"making {src.make.n} toy-town scenes in {src.root}")
        make_tree(src.root, src.make.n, seed=src.make.seed, domain=src.make.domain, split=src.split,
                  height=src.make.height, width=src.make.width)


class Reporter:
    """Where the run talks: a rich console with progress bars, or nothing (tests, library use)."""

    def __init__(self, console=None):
        self.console = console

    def info(self, msg: str) -> None:
        if self.console is not None:
            from rich.markup import escape

            self.console.print(f"[dim]amgen:[/dim] {escape(msg)}")

    def progress(self, total: int, description: str):
        if self.console is None:
            return _NullProgress()
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                     TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False)
        p.add_task(description, total=total, rate="")
        return p


class _NullProgress:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def update(self, *a, **k):
        pass

    @property
    def task_ids(self):
        return [0]


def run_pipeline(cfg: RunConfig, *, out: str | os.PathLike | None = None, overwrite: bool = False,
                 dry_run: bool = False, console=None, fail_after_shards: int | None = None) -> RunSummary:
    """Plan (or load the plan), synthesize the unfinished shards, write, summarize.

    ``fail_after_shards``: raise after that many shards were written (tests use it to crash a run).
    """
    t_start = time.perf_counter()
    rep = Reporter(console)
    out = Path(out or cfg.output.dir)
    check_paths(cfg)
    if cfg.score.enabled:
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
    try:
        import ray

        _quiet_ray_data(False)
        timings = PlanTimings()
        reuse_plan = existing == h and not overwrite
        if reuse_plan:
            plan = load_plan(out)
            rep.info(f"resuming {out}: plan of {plan.num_samples} samples in {plan.num_shards} shards")
        elif dry_run:
            with tempfile.TemporaryDirectory(prefix="amgen-index-") as tmp:
                plan = compute_plan(cfg, h, Path(tmp) / INDEX_DIR, timings, rep)
        else:
            plan = compute_plan(cfg, h, out / INDEX_DIR, timings, rep)
            if plan.errors:
                write_errors(plan.errors, out, "plan")
            save_plan(plan, out)
        workers = plan_workers(cfg, ray.cluster_resources() if dry_run else wait_for_gpus(cfg, rep.info))
        if workers.note:
            rep.info(workers.note)
        done = finished_shards(out, plan.num_shards) if reuse_plan else set()
        pending = [s for s in range(plan.num_shards) if s not in done]
        summary = RunSummary(
            out=str(out), mode=mode, config_hash=h, model=None,
            targets=plan.num_targets, planned=plan.num_samples, exemplars=plan.num_exemplars(),
            shards=plan.num_shards, shards_skipped=len(done), shards_written=0, synthesized=0, written=0,
            quarantined=len(plan.errors), workers=asdict(workers),
            timings={"index_s": round(timings.index_s, 3), "plan_s": round(timings.plan_s, 3)})
        if dry_run:
            summary.quarantined_by_stage = _count_stages(plan.errors)
            summary.written = sum(len(plan.shard_rows(s)) for s in done)
            summary.timings["total_s"] = round(time.perf_counter() - t_start, 3)
            return summary
        return _synthesize_and_write(cfg, plan, out, pending, done, workers, summary, rep, t_start, fail_after_shards)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _count_stages(errors: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in errors:
        out[e["stage"]] = out.get(e["stage"], 0) + 1
    return dict(sorted(out.items()))


def _manifest(cfg: RunConfig, summary: RunSummary, stats: dict[int, ShardStats], complete: bool,
              runs: list[dict]) -> dict[str, Any]:
    return {
        "format": "amgen-dataset", "format_version": 1, "name": cfg.name, "complete": complete,
        "config": cfg.model_dump(mode="json"), "config_hash": summary.config_hash, "model": summary.model,
        "counts": {"targets": summary.targets, "planned": summary.planned, "exemplars": summary.exemplars,
                   "written": sum(s.rows for s in stats.values()), "quarantined": summary.quarantined,
                   "quarantined_by_stage": summary.quarantined_by_stage, "shards": summary.shards,
                   "shards_finished": len(stats)},
        "shards": [stats[i] for i in sorted(stats)],
        "runs": runs,
        "versions": _versions(),
    }


def _synthesize_and_write(cfg: RunConfig, plan: Plan, out: Path, pending: list[int], done: set[int],
                          workers: Workers, summary: RunSummary, rep: Reporter, t_start: float,
                          fail_after_shards: int | None) -> RunSummary:
    from connectors.parquet_sink import read_manifest
    from stages.score import SCORE_COLUMNS
    from stages.write import ShardWriter

    stats = previous_shard_stats(out, done, plan.num_shards)
    try:
        prev = read_manifest(out)
    except (FileNotFoundError, ValueError):
        prev = {}
    runs = list(prev.get("runs", []))
    summary.model = prev.get("model")
    this_run = {"mode": summary.mode, "started_unix": round(time.time(), 3), "shards_written": 0, "synthesized": 0}
    runs.append(this_run)
    pending_rows = [r for s in pending for r in plan.shard_rows(s)]
    score_cols = SCORE_COLUMNS if cfg.score.enabled else ()
    expected = {s: [r["sample_id"] for r in plan.shard_rows(s)] for s in pending}

    def on_shard(st: ShardStats, shard: int) -> None:
        stats[shard] = st
        this_run["shards_written"] += 1
        this_run["synthesized"] = writer.synthesized
        summary.model = writer.model
        write_manifest(out, _manifest(cfg, summary, stats, complete=False, runs=runs))
        if fail_after_shards is not None and this_run["shards_written"] >= fail_after_shards:
            raise RuntimeError(f"injected failure after {fail_after_shards} shard(s) (fail_after_shards)")

    writer = ShardWriter(out, expected, plan.num_shards, summary.config_hash, score_cols,
                         expected_model=summary.model, on_shard=on_shard)
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
                writer.add(row)
                n += 1
                el = time.perf_counter() - t_synth
                bar.update(task, completed=n, rate=f"{n / el:.1f} img/s" if el > 0 else "")
        if writer.pending():
            raise RuntimeError(f"shards {writer.pending()} did not receive all their samples")
    else:
        rep.info("every shard is already written; nothing to synthesize")
    synth_s = time.perf_counter() - t_synth
    summary.shards_written = len(writer.written)
    summary.synthesized = writer.synthesized
    summary.banks_encoded = writer.banks_new
    summary.model = writer.model or summary.model
    errors = read_errors(out)
    summary.quarantined = len(errors)
    summary.quarantined_by_stage = _count_stages(errors)
    summary.written = sum(s.rows for s in stats.values())
    summary.images_per_s = round(writer.synthesized / synth_s, 3) if writer.synthesized and synth_s > 0 else 0.0
    t_fin = time.perf_counter()
    _finish_outputs(cfg, plan, out, summary, stats)
    summary.timings.update({"synthesize_s": round(synth_s, 3), "model_s": round(writer.model_seconds, 3),
                            "finish_s": round(time.perf_counter() - t_fin, 3),
                            "total_s": round(time.perf_counter() - t_start, 3)})
    this_run.update({"synthesized": writer.synthesized, "timings": summary.timings,
                     "images_per_s": summary.images_per_s, "banks_encoded": writer.banks_new})
    write_manifest(out, _manifest(cfg, summary, stats, complete=True, runs=runs))
    return summary


def _finish_outputs(cfg: RunConfig, plan: Plan, out: Path, summary: RunSummary, stats: dict[int, ShardStats]) -> None:
    """Dataset card, preview and the optional Cityscapes tree: all derived from the shards on disk."""
    from stages.score import SCORE_COLUMNS
    from stages.write import make_preview, preview_samples, write_preview

    pixels = np.sum([s.label_pixels for s in stats.values() if s.label_pixels], axis=0) if stats else None
    sources = [f"{cfg.source.kind}:{cfg.source.root} ({cfg.source.split})"]
    if cfg.exemplars.source is not None:
        sources.append(f"exemplars {cfg.exemplars.source.kind}:{cfg.exemplars.source.root}")
    write_dataset_card(out, DatasetCardInfo(
        num_samples=summary.written, num_shards=plan.num_shards, num_errors=summary.quarantined,
        score_columns=SCORE_COLUMNS if cfg.score.enabled else (), model=summary.model or "",
        config_hash=summary.config_hash, sources=sources,
        label_pixels=None if pixels is None else [int(x) for x in pixels], license=cfg.output.license,
        extra={"exemplars per target": cfg.exemplars.k, "sampling": f"{cfg.model.steps} steps, guidance "
               f"{cfg.model.guidance_scale:g}, mode {cfg.model.mode}"}))
    if cfg.output.preview:
        by_sid = {r["sample_id"]: r for r in plan.rows}
        ex_spec = source_spec(cfg.exemplars.source or cfg.source)

        def exemplar_image(sid: str, _ex_id: str):
            from stages.group import cached_source
            from stages.read import read_item

            r = by_sid.get(sid)
            if r is None:
                return None
            lay, _ = read_item(cached_source(ex_spec), json.loads(r["exemplar_item"]), stage="preview")
            return None if lay is None else lay.image

        grid = make_preview(preview_samples(out, cfg.output.preview_rows), exemplar_image)
        if grid is not None:
            write_preview(out, grid)
    if cfg.output.export_cityscapes:
        from connectors.cityscapes_export import export_cityscapes
        from pipeline.resume import CITYSCAPES_DIR

        export_cityscapes(out, out / CITYSCAPES_DIR, overwrite=True)


def print_summary(summary: RunSummary, console, verify_ok: bool | None = None) -> None:
    from rich.table import Table

    t = Table(title=f"amgen run: {summary.mode}", show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("output", summary.out)
    t.add_row("samples written", f"{summary.written} of {summary.planned} planned ({summary.synthesized} synthesized now)")
    t.add_row("shards", f"{summary.shards} ({summary.shards_written} written now, {summary.shards_skipped} already done)")
    by = ", ".join(f"{k}: {v}" for k, v in summary.quarantined_by_stage.items())
    t.add_row("quarantined", f"{summary.quarantined}" + (f" ({by}) -> errors/" if by else ""))
    t.add_row("targets / exemplars", f"{summary.targets} / {summary.exemplars} (banks encoded now: {summary.banks_encoded})")
    t.add_row("throughput", f"{summary.images_per_s:.2f} images/s")
    w = summary.workers
    if w:
        t.add_row("workers", f"{w['actors']} actor(s), {w['device']}, {w['num_gpus']:g} GPU, {w['torch_threads']} thread(s) each")
    t.add_row("model", str(summary.model))
    t.add_row("config hash", summary.config_hash[:16])
    t.add_row("time", ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in summary.timings.items()))
    if verify_ok is not None:
        t.add_row("verify", "OK" if verify_ok else "FAILED")
    console.print(t)
