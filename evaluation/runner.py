"""One entry point for the quality benchmark, shared by ``amgen eval quality`` and bench/quality.py."""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Callable, Iterable

import torch

from amadapter.bundled import toy_model_dir
from evaluation.quality import QualityReport, QualitySettings, run_quality
from evaluation.report import write_json, write_markdown, write_picture
from evaluation.segmenter import DEFAULT_DIR as SEGMENTER_DIR
from evaluation.segmenter import Segmenter

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = toy_model_dir()
RANDOM_TOY = "random:toy"  # a random-weight toy model: exercises the code, measures nothing


class ModelNotFoundError(FileNotFoundError):
    pass


def load_pipeline(model: str | Path):
    """A model folder, or RANDOM_TOY, through :func:`amadapter.loading.load_model`."""
    from amadapter.loading import load_model

    if str(model) != RANDOM_TOY and not Path(model).is_dir():
        raise ModelNotFoundError(f"{model}: no model folder here (train one with `amgen train`, or pass --model {RANDOM_TOY})")
    pipe = load_model(model).pipe
    pipe.set_progress_bar_config(disable=True)  # the benchmark reports its own progress
    return pipe


def _shown(path: str | Path) -> str:
    """A path as the docs show it: relative to the repository when inside it."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def run_benchmark(
    settings: QualitySettings,
    model: str | Path = DEFAULT_MODEL_DIR,
    segmenter: str | Path = SEGMENTER_DIR,
    json_path: str | Path | None = None,
    docs_dir: str | Path | None = None,
    threads: int = 1,
    command: str = "amgen eval quality",
    progress: Callable[[int, int], None] | None = None,
    triples: Iterable | None = None,
) -> QualityReport:
    """Run the benchmark on ``triples`` (ground-truth triples with known exemplar -> target truth);
    by default the held-out toy-town ones, ``make_triples(settings.n, settings.seed)``. Write what
    is asked for."""
    torch.set_num_threads(threads)
    pipe = load_pipeline(model)
    judge = Segmenter.from_pretrained(segmenter)
    if triples is None:
        from toytown import make_triples

        triples = make_triples(settings.n, seed=settings.seed)
    report = run_quality(pipe, judge, triples, settings, progress=progress)
    if json_path is not None:
        write_json(report, json_path)
    if docs_dir is not None:
        docs = Path(docs_dir)
        write_json(report, docs / "quality.json")
        write_picture(report, docs / "quality.png")
        context = {
            "command": command,
            "date": _dt.date.today().isoformat(),
            "threads": threads,
            "model": str(model) if str(model) == RANDOM_TOY else _shown(model),
            "model_hash": pipe.model_hash(),
            "segmenter": _shown(segmenter),
            "segmenter_meta": judge.config.meta,
        }
        write_markdown(report, docs / "quality.md", context)
    return report


def json_line(report: QualityReport) -> str:
    return json.dumps(report.json_rows())
