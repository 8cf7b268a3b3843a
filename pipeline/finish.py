"""What a run leaves besides the shards: the manifest, the dataset card, the preview and the
optional Cityscapes tree, and the run's summary.

The manifest is rewritten after every finished shard (``complete: false``), so a crashed run
leaves one that names every shard on disk; the last write, after the derived files, says
``complete: true``.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from connectors.storage import RemotePath
from connectors.parquet_sink import DatasetCardInfo, ShardStats, read_errors, write_dataset_card, write_manifest
from pipeline.config import RunConfig
from pipeline.plan import Plan
from stages.read import source_spec


@dataclass
class RunSummary:
    out: str
    mode: str                     # new | resume | increment | overwrite | dry-run
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
    filtered: int = 0             # samples the quality gate sent to filtered/ (all shards)
    filtered_by_reason: dict[str, int] = field(default_factory=dict)
    banks_encoded: int = 0
    workers: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    images_per_s: float = 0.0
    remade: list[dict[str, Any]] = field(default_factory=list)  # damaged/missing shards made again, with why
    increments: list[dict[str, Any]] = field(default_factory=list)  # the plan's increments (first plan included)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("amgen", "torch", "diffusers", "ray", "datasets", "albumentations", "faiss-cpu", "pyarrow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def count_stages(errors: list[dict]) -> dict[str, int]:
    """Error rows per stage, by stage name."""
    out: dict[str, int] = {}
    for e in errors:
        out[e["stage"]] = out.get(e["stage"], 0) + 1
    return dict(sorted(out.items()))


def manifest(cfg: RunConfig, summary: RunSummary, stats: dict[int, ShardStats], complete: bool,
             runs: list[dict]) -> dict[str, Any]:
    return {
        "format": "amgen-dataset", "format_version": 1, "name": cfg.name, "complete": complete,
        "config": cfg.model_dump(mode="json"), "config_hash": summary.config_hash, "model": summary.model,
        "counts": {"targets": summary.targets, "planned": summary.planned, "exemplars": summary.exemplars,
                   "written": sum(s.rows for s in stats.values()), "quarantined": summary.quarantined,
                   "quarantined_by_stage": summary.quarantined_by_stage, **gate_counts(cfg, summary),
                   "shards": summary.shards,
                   "shards_finished": len(stats)},
        "shards": [stats[i] for i in sorted(stats)],
        "increments": summary.increments,
        "runs": runs,
        "versions": versions(),
    }


def gate_counts(cfg: RunConfig, summary: RunSummary) -> dict[str, Any]:
    """The manifest's record of the quality gate (nothing when it is off: older manifests stay as they were)."""
    if not cfg.gate.enabled:
        return {}
    return {"filtered": summary.filtered, "filtered_by_reason": summary.filtered_by_reason,
            "gate": cfg.gate.model_dump(mode="json")}


def gate_card_line(cfg: RunConfig, summary: RunSummary) -> dict[str, str]:
    """The dataset card's line on the quality gate (none when it is off)."""
    if not cfg.gate.enabled:
        return {}
    by = ", ".join(f"{k}: {v}" for k, v in summary.filtered_by_reason.items()) or "none"
    return {"quality gate": f"{cfg.gate.metric} >= {cfg.gate.threshold:g} kept; {summary.filtered} sample(s) "
                            f"filtered ({by}), kept with their scores in `filtered/`"
                            + ("; `label_trusted` masks the pixels the judge disagrees with" if cfg.gate.label_trusted else "")}


class ManifestLog:
    """The manifest's state during a run: stats of every finished shard (earlier runs' and this
    one's), the list of runs with this run's entry last, and the run summary it reports."""

    def __init__(self, cfg: RunConfig, out: Path, summary: RunSummary, stats: dict[int, ShardStats],
                 runs: list[dict]):
        self.cfg, self.out, self.summary = cfg, out, summary
        self.stats = stats
        self.runs = runs
        self.this_run: dict[str, Any] = {"mode": summary.mode, "started_unix": round(time.time(), 3),
                                         "shards_written": 0, "synthesized": 0}
        if summary.remade:
            self.this_run["remade"] = summary.remade
        self.runs.append(self.this_run)

    @classmethod
    def open(cls, cfg: RunConfig, out: Path, summary: RunSummary, stats: dict[int, ShardStats]) -> ManifestLog:
        """Continue the manifest of ``out`` (none yet: a new one) from the finished shards' ``stats``
        (resume's audit); the summary takes its model."""
        from connectors.parquet_sink import read_manifest

        stats = dict(stats)
        try:
            prev = read_manifest(out)
        except (FileNotFoundError, ValueError):
            prev = {}
        summary.model = prev.get("model")
        return cls(cfg, out, summary, stats, list(prev.get("runs", [])))

    def shard_written(self, stats: ShardStats, shard: int, synthesized: int, model: str | None) -> None:
        """A shard is on disk: record it and rewrite the (incomplete) manifest."""
        self.stats[shard] = stats
        self.this_run["shards_written"] += 1
        self.this_run["synthesized"] = synthesized
        self.summary.model = model
        self.write(complete=False)

    def write(self, complete: bool) -> None:
        write_manifest(self.out, manifest(self.cfg, self.summary, self.stats, complete=complete, runs=self.runs))


def finish_run(cfg: RunConfig, plan: Plan, log: ManifestLog, writer, synth_s: float, t_start: float) -> RunSummary:
    """Count what is on disk, write the derived files, then the complete manifest.

    ``writer``: the pass's ``pipeline.shard_writers.PassTally`` (what this run synthesized)."""
    summary, out, stats = log.summary, log.out, log.stats
    summary.shards_written = len(writer.written)
    summary.synthesized = writer.synthesized
    summary.banks_encoded = writer.banks_new
    summary.model = writer.model or summary.model
    errors = read_errors(out)
    summary.quarantined = len(errors)
    summary.quarantined_by_stage = count_stages(errors)
    if cfg.gate.enabled:
        from connectors.filtered_sink import filtered_counts

        summary.filtered_by_reason = filtered_counts(out)
        summary.filtered = sum(summary.filtered_by_reason.values())
    summary.written = sum(s.rows for s in stats.values())
    summary.images_per_s = round(writer.synthesized / synth_s, 3) if writer.synthesized and synth_s > 0 else 0.0
    t_fin = time.perf_counter()
    import ray
    from connectors.storage import location_str

    # On a worker: the preview reads exemplars from the source, the export reads every shard.
    task = ray.remote(num_cpus=0, max_retries=0)(write_derived_outputs)
    ray.get(task.remote(cfg, plan, location_str(out), summary, dict(stats)))
    summary.timings.update({"synthesize_s": round(synth_s, 3), "model_s": round(writer.model_seconds, 3),
                            "model_cpu_s": round(writer.model_cpu_seconds, 3),
                            "finish_s": round(time.perf_counter() - t_fin, 3),
                            "total_s": round(time.perf_counter() - t_start, 3)})
    log.this_run.update({"synthesized": writer.synthesized, "timings": summary.timings,
                         "images_per_s": summary.images_per_s, "banks_encoded": writer.banks_new})
    log.write(complete=True)
    return summary


def increments_line(increments: list[dict[str, Any]]) -> dict[str, str]:
    """The card's record of a dataset grown by increments (nothing for a single plan)."""
    if len(increments) < 2:
        return {}
    parts = [f"{i['increment']}: {i['targets']} targets, {i['samples']} samples, shards {i['first_shard']}.."
             f"{i['first_shard'] + i['num_shards'] - 1}" for i in increments]
    return {"increments": "; ".join(parts)}


def write_derived_outputs(cfg: RunConfig, plan: Plan, out: Path, summary: RunSummary,
                          stats: dict[int, ShardStats]) -> None:
    """Dataset card, preview and the optional Cityscapes tree: all derived from the shards on disk."""
    from connectors.storage import as_path

    out = as_path(out)
    from pipeline.scoring_actors import optional_columns
    from stages.write import make_preview, preview_samples, write_preview

    pixels = np.sum([s.label_pixels for s in stats.values() if s.label_pixels], axis=0) if stats else None
    sources = [f"{cfg.source.kind}:{cfg.source.root} ({cfg.source.split})"]
    if cfg.exemplars.source is not None:
        sources.append(f"exemplars {cfg.exemplars.source.kind}:{cfg.exemplars.source.root}")
    write_dataset_card(out, DatasetCardInfo(
        num_samples=summary.written, num_shards=plan.num_shards, num_errors=summary.quarantined,
        optional_columns=optional_columns(cfg), model=summary.model or "",
        config_hash=summary.config_hash, sources=sources,
        label_pixels=None if pixels is None else [int(x) for x in pixels], license=cfg.output.license,
        extra={"exemplars per target": cfg.exemplars.k, "sampling": f"{cfg.model.steps} steps, guidance "
               f"{cfg.model.guidance_scale:g}, mode {cfg.model.mode}", **increments_line(summary.increments),
               **gate_card_line(cfg, summary)}))
    if cfg.output.preview:
        by_sid = {r["sample_id"]: r for r in plan.rows}
        ex_spec = source_spec(cfg.exemplars.source or cfg.source)

        def exemplar_image(sid: str, _ex_id: str):
            from stages.read import cached_source, read_item

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

        if isinstance(out, RemotePath):  # the exporter writes files: export here, then publish the tree
            import tempfile

            from connectors.parquet_sink import DATA_DIR
            from connectors.storage import upload_dir

            with tempfile.TemporaryDirectory(prefix="amgen-export-") as tmp:
                for p in (out / DATA_DIR).glob("train-*.parquet"):
                    (Path(tmp) / DATA_DIR).mkdir(exist_ok=True)
                    (Path(tmp) / DATA_DIR / p.name).write_bytes(p.read_bytes())
                export_cityscapes(tmp, Path(tmp) / CITYSCAPES_DIR, overwrite=True)
                upload_dir(Path(tmp) / CITYSCAPES_DIR, out / CITYSCAPES_DIR)
        else:
            export_cityscapes(out, out / CITYSCAPES_DIR, overwrite=True)
