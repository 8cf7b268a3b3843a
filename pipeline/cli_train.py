"""`amgen train vae|stage1|stage2 --config FILE [--set k=v] [--resume] [--workers N]`."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from training.registry import STAGE_NAMES


def _quiet_diffusers() -> None:
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()


def _config_and_data(stage: str, config: Optional[str], overrides: List[str], workers: Optional[int] = None):
    """The run's validated config (``config``: a path or a preset name) and the data it names."""
    from pipeline.presets import resolve_config
    from training.registry import load_train_config
    from training.sources import training_data

    cfg = load_train_config(stage, resolve_config(config) if config is not None else None, overrides,
                            num_workers=workers)
    return cfg, training_data(cfg.data)


def _train(stage: str, config: Optional[str], overrides: List[str], resume: bool, workers: Optional[int]) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Table

    from training.loop import run_training

    console = Console()
    _quiet_diffusers()
    try:
        cfg, data = _config_and_data(stage, config, overrides, workers)
    except (ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    console.print(f"training [bold]{stage}[/bold] ({cfg.preset}) for {cfg.steps} steps, batch {cfg.batch_size} x "
                  f"{cfg.num_workers} worker(s), out {cfg.out_dir}{' (resume)' if resume else ''}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(stage, total=cfg.steps, loss="-")

        def on_step(done: int, metrics: dict) -> None:
            bar.update(task, completed=done, loss=f"{metrics['loss']:.4f}")

        summary = run_training(cfg, data, resume=resume, on_step=on_step)
        bar.update(task, completed=summary.end_step)
    table = Table(title=f"amgen train {stage}", show_header=False)
    table.add_column("what", no_wrap=True)
    table.add_column("value", overflow="fold")  # paths wrap instead of being cut
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    rows = [("steps", f"{summary.start_step} -> {summary.end_step} ({summary.steps_run} run)"),
            ("loss (mean of first -> last steps)", f"{fmt(summary.loss_start)} -> {fmt(summary.loss_end)}"),
            ("time", f"{summary.seconds:.1f} s ({summary.seconds / max(1, summary.steps_run):.3f} s/step)"),
            ("checkpoint", summary.checkpoint or "-"), ("exported", summary.export or "-"),
            ("loss log / plot", f"{Path(summary.out_dir) / 'loss.jsonl'} / loss.png")]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def register(app: typer.Typer) -> None:
    train_app = typer.Typer(no_args_is_help=True, help="Train the toy VAE, stage 1 (UNet + structure net), stage 2 (matcher).")

    def make(stage: str):
        def command(
            config: Optional[str] = typer.Option(None, "--config", "-c", help="training YAML: a path or a preset name "
                                                 "(amgen configs), e.g. train_toy_stage2"),
            overrides: List[str] = typer.Option([], "--set", help="override a config key: --set steps=100 --set data.domain=fog"),
            resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint in out_dir"),
            workers: Optional[int] = typer.Option(None, "--workers", help="Ray Train workers (>1 uses TorchTrainer)"),
        ) -> None:
            _train(stage, config, overrides, resume, workers)

        command.__doc__ = {"vae": "Train the toy AutoencoderKL (SD1.5 users keep SD's VAE).",
                           "stage1": "Train the generation UNet + structure net with the appearance branch.",
                           "stage2": "Train the matcher only; everything else frozen."}[stage]
        return command

    for stage in STAGE_NAMES:
        train_app.command(stage)(make(stage))

    @train_app.command("export-checkpoint")
    def export_checkpoint_command(
        stage: str = typer.Argument(..., help=f"the run's stage: {', '.join(STAGE_NAMES)}"),
        config: Optional[str] = typer.Option(None, "--config", "-c", help="the run's training YAML (a path or a preset name)"),
        overrides: List[str] = typer.Option([], "--set", help="the run's --set overrides"),
        step: Optional[int] = typer.Option(None, "--step", min=1, help="checkpoint step (default: the latest)"),
        out: Path = typer.Option(..., "--out", help="folder to write; the pipeline goes to OUT/pipeline"),
    ) -> None:
        """Export a checkpoint of a training run (finished, stopped or still going) as a pipeline folder,
        the loss log up to it included: evaluate a run before it ends."""
        from rich.console import Console

        from training.loop import checkpoint_at, export_checkpoint, make_task

        console = Console()
        _quiet_diffusers()
        if stage not in STAGE_NAMES:
            console.print(f"[red]error:[/red] unknown stage {stage!r}; expected one of {', '.join(STAGE_NAMES)}")
            raise typer.Exit(2)
        try:
            cfg, data = _config_and_data(stage, config, overrides)
            checkpoint = checkpoint_at(cfg.out_dir, step)
            path = export_checkpoint(make_task(cfg, data), checkpoint, out)
        except (ValueError, FileNotFoundError) as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2)
        console.print(f"exported {checkpoint} to {path}")

    @train_app.command("export")
    def export(
        pipeline_dir: Path = typer.Option(..., "--pipeline", help="stage-2 output (runs/toy_stage2/pipeline)"),
        out: Path = typer.Option(Path("amadapter/weights/toy"), "--out", help="model folder to write"),
        vae: Optional[Path] = typer.Option(None, "--vae", help="decoder-only fine-tuned VAE to swap in"),
        fp16: bool = typer.Option(False, "--fp16", help="store weights in float16 (half the size)"),
        max_mb: float = typer.Option(25.0, "--max-mb"),
        preview: int = typer.Option(4, "--preview", help="rows of held-out toy-town triples in preview.png (0: none)"),
    ) -> None:
        """Assemble trained parts into one AMAdapterPipeline folder (safetensors), check it reloads."""
        from rich.console import Console

        from training.export import ExportError, assemble, preview_grid

        console = Console()
        _quiet_diffusers()
        try:
            info = assemble(pipeline_dir, out, vae_dir=vae, fp16=fp16, max_mb=max_mb)
        except (ExportError, FileNotFoundError) as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2)
        console.print(f"wrote {info['path']}: {info['bytes'] / 2**20:.2f} MB ({info['dtype']}), hash {info['model_hash'][:12]}")
        for name, size in info["safetensors"].items():
            console.print(f"  {name}: {size / 2**20:.2f} MB")
        if preview:
            from amadapter.pipeline import AMAdapterPipeline
            from toytown.triples import make_triples

            from evaluation.quality import QualitySettings

            pipe = AMAdapterPipeline.from_pretrained(out, dtype=None).to(dtype=__import__("torch").float32)
            demo = QualitySettings()   # the demo's sampling (configs/toytown_demo.yaml)
            path = preview_grid(pipe, list(make_triples(preview, seed=9001)), out / "preview.png",
                                num_inference_steps=demo.num_inference_steps, guidance_scale=demo.guidance_scale)
            console.print(f"preview (exemplar | target | ground truth | structure_only | sa_aug | am_adapter): {path}")
    app.add_typer(train_app, name="train")
