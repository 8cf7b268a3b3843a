"""The training history a model folder carries, so a curve survives lost checkpoints.

An exported pipeline folder holds ``training_log.jsonl``: one compact row per optimizer step
({stage, step, loss, time}) of every run that led to it, the earlier stages' rows first (read from
``init_from``'s own log). A run restarted from such a folder with ``continue_from_init`` (its
checkpoint gone) starts at the step after the last one logged for its stage: the data stream, the
learning-rate schedule and the loss curve carry on from there; only the optimizer's moments start
fresh.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training.loop import read_loss_log

HISTORY_FILE = "training_log.jsonl"
_KEPT = ("step", "loss", "time")


def read_history(folder: str | Path | None) -> list[dict[str, Any]]:
    if folder is None:
        return []
    path = Path(folder) / HISTORY_FILE
    try:
        return read_loss_log(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a training log ({e})") from None


def continued_rows(init_from: str | Path, stage: str) -> list[dict[str, Any]]:
    """This stage's rows in ``init_from``'s history, as loss-log rows (the run restarts after them)."""
    rows = [r for r in read_history(init_from) if r.get("stage") == stage]
    if not rows:
        raise ValueError(f"{init_from}/{HISTORY_FILE}: no {stage} steps logged, nothing to continue "
                         "(continue_from_init restarts a run from its own exported weights)")
    return [_compact(r) for r in rows]


def write_history(folder: Path, stage: str, run_rows: list[dict[str, Any]], init_from: str | Path | None,
                  continued: bool) -> Path:
    """Earlier stages' rows from ``init_from``, then this run's (which already hold the continued ones)."""
    earlier = [r for r in read_history(init_from) if not (continued and r.get("stage") == stage)]
    path = Path(folder) / HISTORY_FILE
    with open(path, "w") as f:
        for r in earlier:
            f.write(json.dumps(r) + "\n")
        for r in run_rows:
            f.write(json.dumps({"stage": stage, **_compact(r)}) + "\n")
    return path


def _compact(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in _KEPT if k in row}
