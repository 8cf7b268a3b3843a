"""`amgen run`, `amgen demo` and `amgen verify`.

    amgen run --config FILE|PRESET [--set key=value ...] [--out DIR] [--dry-run] [--overwrite]
    amgen demo [--out DIR] [--n N]
    amgen configs
    amgen verify DIR

Errors a user can fix (config, output folder, cluster resources) print one clear message and
exit with code 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer

DEMO_PRESET = "toytown_demo"
DEMO_MIN_SAMPLES = 64


def _user_errors() -> tuple[type[BaseException], ...]:
    from connectors.index_store import IndexFormatError, IndexNotFoundError
    from pipeline.config import ConfigError
    from pipeline.cluster import ClusterResourceError
    from pipeline.presets import PresetNotFoundError
    from pipeline.plan import PlanError
    from pipeline.resume import OutputFolderError
    from stages.score import ScoreUnavailableError
    from stages.write import ModelMismatchError

    return (ConfigError, OutputFolderError, ClusterResourceError, PlanError, ScoreUnavailableError,
            ModelMismatchError, IndexNotFoundError, IndexFormatError, PresetNotFoundError)


def _console():
    from rich.console import Console

    return Console(highlight=False)


def _fail(console, exc: BaseException) -> None:
    console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
    raise typer.Exit(2)


def print_plan(summary, cfg, console) -> None:
    from rich.table import Table

    t = Table(title="amgen run --dry-run: the plan (nothing synthesized)", show_header=False, box=None)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("output", summary.out)
    t.add_row("targets", f"{summary.targets} ({cfg.source.kind}: {cfg.source.root}, split {cfg.source.split})")
    t.add_row("samples planned", f"{summary.planned} ({cfg.exemplars.k} exemplar(s) per target, {summary.exemplars} distinct exemplars)")
    t.add_row("quarantined while planning", f"{summary.quarantined} {summary.quarantined_by_stage or ''}")
    t.add_row("shards", f"{summary.shards} x {cfg.output.rows_per_shard} rows ({summary.shards_skipped} already written)")
    w = summary.workers
    t.add_row("workers", f"{w['actors']} actor(s), {w['num_cpus']:g} CPU + {w['num_gpus']:g} GPU each, device {w['device']}, "
                         f"batch {cfg.synthesis.batch_size}" + (f" ({w['note']})" if w.get("note") else ""))
    t.add_row("model", f"{cfg.model.path}, {cfg.model.steps} steps, guidance {cfg.model.guidance_scale:g}, mode {cfg.model.mode}")
    t.add_row("config hash", summary.config_hash[:16])
    console.print(t)


def run_command(config: str, overrides: list[str], out: Optional[str], dry_run: bool, overwrite: bool,
                quiet: bool = False, json_summary: bool = False) -> None:
    from pipeline.config import load_config
    from pipeline.console import print_summary
    from pipeline.presets import resolve_config
    from pipeline.run import run_pipeline

    console = _console()
    errors = _user_errors()
    try:
        cfg = load_config(resolve_config(config), overrides)
        summary = run_pipeline(cfg, out=out, overwrite=overwrite, dry_run=dry_run, console=None if quiet else console)
    except errors as exc:
        _fail(console, exc)
    if dry_run:
        print_plan(summary, cfg, console)
    else:
        print_summary(summary, console)
    if json_summary:
        print(json.dumps(summary.to_dict(), sort_keys=True))


def demo_command(out: Path, n: int, inputs: Optional[Path], steps: Optional[int], overwrite: bool) -> None:
    from connectors.verify import verify_dataset
    from pipeline.config import load_config
    from pipeline.console import print_summary
    from pipeline.presets import resolve_config
    from pipeline.run import run_pipeline

    console = _console()
    if n < 1:
        _fail(console, ValueError(f"--n must be >= 1, got {n}"))
    inputs = inputs or out.with_name(out.name + "_inputs")
    # One tree per size: a tree made for another --n is never silently reused.
    overrides = [f"output.dir={out}", f"source.root={inputs / f'toytown_{n}'}", f"source.make.n={n}"]
    if steps is not None:
        overrides.append(f"model.steps={steps}")
    try:
        cfg = load_config(resolve_config(DEMO_PRESET), overrides)
        console.print(f"[bold]amgen demo[/bold]: {n} toy-town targets -> AM-Adapter ({cfg.model.path} model, CPU) -> {out}")
        summary = run_pipeline(cfg, overwrite=overwrite, console=console)
    except _user_errors() as exc:
        _fail(console, exc)
    report = verify_dataset(out)
    print_summary(summary, console, verify_ok=report.ok)
    if not report.ok:
        console.print(report.summary())
        raise typer.Exit(1)
    console.print(f"\nDataset: [bold]{out}[/bold]  (README.md, preview.png, data/*.parquet)\n"
                  f"Load it:  datasets.load_dataset(\"{out}\", split=\"train\")\n"
                  f"Inputs:   {inputs} (toy-town tree; reused by the next demo)")


def configs_command() -> None:
    from rich.table import Table

    from pipeline.presets import describe, is_run_config, preset_dir, preset_names

    t = Table(title=f"amgen presets ({preset_dir()})", box=None)
    for col in ("name", "for", "what"):
        t.add_column(col, style="bold" if col == "name" else None)
    for name in preset_names():
        t.add_row(name, "amgen run" if is_run_config(name) else "amgen train", describe(name))
    console = _console()
    console.print(t)
    console.print("Use one: amgen run --config NAME (or a path); copy it to edit: "
                  "cp \"$(amgen configs --path NAME)\" my.yaml")


def verify_command(directory: Path) -> None:
    from connectors.verify import verify_dataset

    console = _console()
    report = verify_dataset(directory)
    console.print(report.summary(), soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(
        config: str = typer.Option(..., "--config", "-c", help="run config: a YAML path or a preset name (amgen configs)"),
        overrides: List[str] = typer.Option([], "--set", help="override a key: --set model.steps=10 --set source.limit=50"),
        # A string, not a Path: a Path would fold s3://bucket into s3:/bucket.
        out: Optional[str] = typer.Option(None, "--out", "-o", help="output folder or URI, e.g. s3://bucket/out "
                                          "(default: output.dir of the config)"),
        dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (counts, shards, workers); synthesize nothing"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace an output folder made with another config"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output, only the summary"),
        json_summary: bool = typer.Option(False, "--json", help="also print the summary as one JSON line"),
    ) -> None:
        """Turn a scene dataset into a labelled synthetic dataset (resumes an unfinished OUT)."""
        run_command(config, overrides, out, dry_run, overwrite, quiet, json_summary)

    @app.command("demo")
    def demo(
        out: Path = typer.Option(Path("amgen_demo"), "--out", "-o", help="where the demo dataset goes"),
        n: int = typer.Option(DEMO_MIN_SAMPLES, "--n", help="toy-town targets = samples to write"),
        inputs: Optional[Path] = typer.Option(None, "--inputs", help="toy-town data folder (default: OUT_inputs)"),
        steps: Optional[int] = typer.Option(None, "--steps", help="sampling steps (default: the demo config's)"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing demo output"),
    ) -> None:
        """The whole pipeline on toy-town with the bundled model, on CPU, in minutes."""
        demo_command(out, n, inputs, steps, overwrite)

    @app.command("configs")
    def configs(path: Optional[str] = typer.Option(None, "--path", help="print the file of this preset and exit")) -> None:
        """List the shipped presets (run and training configs)."""
        if path is not None:
            from pipeline.presets import PresetNotFoundError, resolve_config

            try:
                print(resolve_config(path))
            except PresetNotFoundError as exc:
                _fail(_console(), exc)
            return
        configs_command()

    @app.command("verify")
    def verify(directory: Path = typer.Argument(..., help="an amgen output folder")) -> None:
        """Check a written dataset: schema, checksums, counts, every label and image."""
        verify_command(directory)
