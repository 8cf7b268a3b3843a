"""``amgen eval``: the quality benchmark, the judge segmenter and the downstream segmentation test."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from evaluation.quality import QUALITY_SEED, QualitySettings
from evaluation.runner import DEFAULT_MODEL_DIR, RANDOM_TOY
from evaluation.segmenter import DEFAULT_DIR as SEGMENTER_DIR

eval_app = typer.Typer(no_args_is_help=True, help="Quality benchmark and downstream tests on toy-town ground truth.")


@eval_app.command("train-segmenter")
def train_segmenter_cmd(
    steps: int = typer.Option(700, help="optimizer steps"),
    batch_size: int = typer.Option(16),
    lr: float = typer.Option(3e-3),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, help="torch threads (the CPU is shared)"),
    class_balance: float = typer.Option(0.5, help="loss weight exponent on (median freq / class freq); 0 = plain CE"),
    run_dir: Path = typer.Option(Path("runs/segmenter"), help="checkpoint + log.jsonl; rerun to resume"),
    out: Path = typer.Option(SEGMENTER_DIR, help="where the trained judge is saved"),
    heldout_n: int = typer.Option(500, help="held-out scenes for its own mIoU"),
) -> None:
    """Train the judge segmenter on real toy-town renderings and report its held-out mIoU."""
    from evaluation.judge import train_judge
    from evaluation.segmenter_train import (SEGMENTER_HELDOUT_SEED_BASE, SEGMENTER_TRAIN_SEED_BASE,
                                            SegmenterTrainConfig, ToyTownScenes)

    cfg = SegmenterTrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, threads=threads,
                               class_balance=class_balance)
    about = {
        "data": "toy-town real renderings, layouts and appearances over all domains, made on the fly",
        "train_scenes": f"np.random.default_rng({SEGMENTER_TRAIN_SEED_BASE} + i), i in [0, {steps * batch_size})",
        "heldout_scenes": f"np.random.default_rng({SEGMENTER_HELDOUT_SEED_BASE} + i), i in [0, {heldout_n})",
    }
    train_judge(cfg, ToyTownScenes(SEGMENTER_TRAIN_SEED_BASE), ToyTownScenes(SEGMENTER_HELDOUT_SEED_BASE),
                run_dir, out, heldout_n=heldout_n, log=typer.echo, about=about)


@eval_app.command("quality")
def quality_cmd(
    n: int = typer.Option(200, "--n", min=1, help="held-out ground-truth triples"),
    json_file: Optional[Path] = typer.Option(None, "--json", help="write the rows as JSON here"),
    model: str = typer.Option(str(DEFAULT_MODEL_DIR), "--model", help=f"model folder, or {RANDOM_TOY!r}"),
    steps: int = typer.Option(QualitySettings.num_inference_steps, "--steps", min=1, help="DDIM steps"),
    guidance: float = typer.Option(7.5, "--guidance"),
    seed: int = typer.Option(QUALITY_SEED, "--seed", min=0, help="toy-town triple seed (held out from training)"),
    segmenter: Path = typer.Option(SEGMENTER_DIR, "--segmenter", help="judge segmenter folder"),
    docs: Optional[Path] = typer.Option(None, "--docs", help="also write quality.md/.png/.json into this folder"),
    threads: int = typer.Option(1, "--threads", min=1, help="torch threads (the CPU is shared)"),
) -> None:
    """Score structure_only, sa_aug and am_adapter (and the ground-truth ceiling) on toy-town triples."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from evaluation.report import acceptance_section, table
    from evaluation.runner import ModelNotFoundError, json_line, run_benchmark
    from evaluation.segmenter import SegmenterFileError

    settings = QualitySettings(n=n, seed=seed, num_inference_steps=steps, guidance_scale=guidance)
    console = Console(stderr=True)
    with Progress(TextColumn("quality"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("triples", total=n)
        try:
            report = run_benchmark(settings, model, segmenter, json_path=json_file, docs_dir=docs, threads=threads,
                                   command=f"amgen eval quality --n {n} --steps {steps}",
                                   progress=lambda done, total: bar.update(task, completed=done))
        except (ModelNotFoundError, SegmenterFileError) as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2)
    typer.echo(table(report.rows))
    typer.echo(acceptance_section(report.rows, report.comparisons))
    t = report.timings
    typer.echo(f"{n} triples x {len(settings.modes)} modes in {t['total_s']} s "
              f"({t['per_triple_all_modes_s']} s per triple generating); "
              f"outputs: {json_file or '-'}{', ' + str(docs) if docs else ''}")
    typer.echo(json_line(report))


@eval_app.command("segmenter")
def segmenter_cmd(
    dataset: Path = typer.Option(..., "--dataset", help="an amgen output folder (or its data/ Parquet shards)"),
    real_n: int = typer.Option(200, "--real-n", min=1, help="real toy-town training scenes"),
    steps: int = typer.Option(300, "--steps", min=1),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    heldout_n: int = typer.Option(300, "--heldout-n", min=1, help="held-out real scenes to score on"),
    seed: int = typer.Option(0, "--seed"),
    run_dir: Path = typer.Option(Path("runs/downstream"), "--run-dir", help="checkpoints; rerun to resume"),
    json_file: Optional[Path] = typer.Option(None, "--json", help="write the result here"),
    threads: int = typer.Option(1, "--threads", min=1),
) -> None:
    """Downstream test: a segmenter trained on real toy-town only vs real + an amgen dataset, same
    steps and seed, both scored (mIoU) on held-out real toy-town scenes."""
    import json

    from connectors.parquet_source import ParquetSource
    from evaluation.downstream import LayoutSamples, run_downstream
    from evaluation.segmenter_train import (SEGMENTER_HELDOUT_SEED_BASE, SEGMENTER_TRAIN_SEED_BASE,
                                            SegmenterTrainConfig, ToyTownScenes)

    height, width = 64, 128  # toy-town's frame, which the amgen dataset must match
    cfg = SegmenterTrainConfig(steps=steps, batch_size=batch_size, lr=3e-3, seed=seed, threads=threads,
                               class_balance=0.5, checkpoint_every=max(1, min(100, steps)))
    about = {"dataset": str(dataset),
             "real_scenes": f"default_rng({SEGMENTER_TRAIN_SEED_BASE} + i), i < {real_n}",
             "heldout_scenes": f"default_rng({SEGMENTER_HELDOUT_SEED_BASE} + i), i < {heldout_n}"}
    try:
        synthetic = LayoutSamples(ParquetSource(dataset), (height, width), name=str(dataset))
        real = ToyTownScenes(SEGMENTER_TRAIN_SEED_BASE, height, width, limit=real_n)
        heldout = ToyTownScenes(SEGMENTER_HELDOUT_SEED_BASE, height, width)
        result = run_downstream(real, synthetic, heldout, run_dir, cfg, heldout_n=heldout_n, log=typer.echo,
                                about=about)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    if json_file is not None:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(json.dumps(result, indent=2) + "\n")
    typer.echo(f"held-out mIoU on {heldout_n} real scenes: real only ({real_n}) {result['real_only']['miou']:.2f}% | "
               f"real + {result['n_synthetic']} amgen samples {result['real_plus_synthetic']['miou']:.2f}% "
               f"(delta {result['delta_miou']:+.2f}); checkpoints in {run_dir}")
    typer.echo(json.dumps({k: result[k] for k in ("n_real", "n_synthetic", "delta_miou")} |
                          {k: result[k]["miou"] for k in ("real_only", "real_plus_synthetic")}))


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
