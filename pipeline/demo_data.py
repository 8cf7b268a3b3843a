"""Inputs for the demo: a toy-town source with ``make`` is drawn on first use."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline.config import RunConfig


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
