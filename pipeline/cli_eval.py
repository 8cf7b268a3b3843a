"""``amgen eval``: the quality benchmark, the judge segmenter and the downstream segmentation test."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from amadapter.eval.segmenter import DEFAULT_DIR as SEGMENTER_DIR

eval_app = typer.Typer(no_args_is_help=True, help="Quality benchmark and downstream tests on toy-town ground truth.")


@eval_app.command("train-segmenter")
def train_segmenter_cmd(
    steps: int = typer.Option(1000, help="optimizer steps"),
    batch_size: int = typer.Option(16),
    lr: float = typer.Option(2e-3),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, help="torch threads (the CPU is shared)"),
    run_dir: Path = typer.Option(Path("runs/segmenter"), help="checkpoint + log.jsonl; rerun to resume"),
    out: Path = typer.Option(SEGMENTER_DIR, help="where the trained judge is saved"),
    heldout_n: int = typer.Option(500, help="held-out scenes for its own mIoU"),
) -> None:
    """Train the judge segmenter on real toy-town renderings and report its held-out mIoU."""
    from amadapter.eval.judge import train_judge
    from amadapter.eval.segmenter_train import SegmenterTrainConfig

    cfg = SegmenterTrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, threads=threads)
    train_judge(cfg, run_dir, out, heldout_n=heldout_n, log=typer.echo)


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
