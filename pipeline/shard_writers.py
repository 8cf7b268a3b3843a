"""Pass 2's writers: shards are written on the workers, and the driver receives only stats.

Sample rows leave the model actors (and the scorer) through ``deliver_batch``, a light task that
hands each row to the writer actor owning its shard (``shard % writers``); a writer actor buffers
its shards' rows (``stages.write.ShardWriter``), writes a shard to the output location (a local
path or a URI) the moment all its planned samples are back, and returns the shard's stats. What
reaches the driver is one small row per batch: counts and the stats of the shards just finished,
from which ``pipeline/finish.ManifestLog`` builds the manifest. No image byte passes the driver.

A retried task may deliver a row twice; the writer keeps the first copy and reports only rows it
took, so counts stay exact. Problems that must stop the run (samples of another model) come back
as text and are raised on the driver, by their own exception type.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

from stages.read import batch_rows
from stages.write import ModelMismatchError, ShardWriter

# A writer mostly waits for rows and for storage: it takes no CPU slot, so it never competes with the
# model actors and the loader for the slots pipeline/cluster.py sizes them by.
WRITER_CPUS = 0
TALLY_COLUMNS = ("taken", "synthesized", "quarantined", "banks_new", "model_seconds", "model_cpu_seconds", "model",
                 "completed", "problem")


class ShardWriterActor:
    """One writer (a Ray actor): the shards ``expected`` names, written into ``out`` (path or URI)."""

    def __init__(self, out: str, expected: dict[int, list[str]], num_shards: int | dict, config_hash: str,
                 optional_columns: Sequence[str], expected_model: str | None, stop_after: int | None = None):
        self.writer = ShardWriter(out, expected, num_shards, config_hash, optional_columns, expected_model=expected_model)
        self.stop_after = stop_after

    def add(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Take sample rows; returns what was taken and the stats of the shards completed by them."""
        w = self.writer
        before = (w.synthesized, w.quarantined, w.banks_new, w.model_seconds, w.model_cpu_seconds)
        taken, problem = 0, ""
        done_before = set(w.written)
        try:
            for row in rows:
                if self.stop_after is not None and len(w.written) >= self.stop_after:
                    problem = f"RuntimeError: injected failure after {self.stop_after} shard(s) (fail_after_shards)"
                    break
                sid, shard = str(row["sample_id"]), int(row["shard"])
                if sid in w.seen.get(shard, ()):
                    continue
                w.add(row)
                taken += 1
        except ModelMismatchError as e:
            problem = f"ModelMismatchError: {e}"
        completed = [w.written[s].to_dict() for s in sorted(set(w.written) - done_before)]
        return {"taken": taken, "synthesized": w.synthesized - before[0], "quarantined": w.quarantined - before[1],
                "banks_new": w.banks_new - before[2], "model_seconds": w.model_seconds - before[3],
                "model_cpu_seconds": w.model_cpu_seconds - before[4], "model": w.model or "",
                "completed": json.dumps(completed), "problem": problem}

    def pending(self) -> list[int]:
        return self.writer.pending()


def start_writers(out: str, expected: dict[int, list[str]], num_shards: int | dict, config_hash: str,
                  optional_columns: Sequence[str], expected_model: str | None, count: int,
                  stop_after: int | None = None) -> list:
    """``count`` writer actors, shard s owned by writer ``s % count`` (spread over the cluster)."""
    import ray

    cls = ray.remote(num_cpus=WRITER_CPUS, max_restarts=0, scheduling_strategy="SPREAD")(ShardWriterActor)
    count = max(1, min(count, len(expected) or 1))
    owned = [{s: ids for s, ids in expected.items() if s % count == i} for i in range(count)]
    return [cls.remote(out, mine, num_shards, config_hash, tuple(optional_columns), expected_model, stop_after)
            for mine in owned]


def deliver_batch(batch: dict[str, Any], writers: list) -> dict[str, list]:
    """Ray Data batch function: sample rows -> their shards' writers -> one tally row."""
    import ray

    rows = batch_rows(batch)
    by_writer: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_writer.setdefault(int(r["shard"]) % len(writers), []).append(r)
    results = ray.get([writers[i].add.remote(rs) for i, rs in sorted(by_writer.items())])
    completed = [s for res in results for s in json.loads(res["completed"])]
    tally = {k: sum(res[k] for res in results) for k in ("taken", "synthesized", "quarantined", "banks_new",
                                                           "model_seconds", "model_cpu_seconds")}
    tally["model"] = next((res["model"] for res in results if res["model"]), "")
    tally["completed"] = json.dumps(completed)
    tally["problem"] = "; ".join(res["problem"] for res in results if res["problem"])
    return {k: [tally[k]] for k in TALLY_COLUMNS}


@dataclass
class PassTally:
    """The driver's view of pass 2: counts and the stats of every shard written by this run."""
    written: dict[int, Any] = field(default_factory=dict)   # shard -> ShardStats
    synthesized: int = 0
    quarantined: int = 0
    banks_new: int = 0
    model_seconds: float = 0.0
    model_cpu_seconds: float = 0.0
    model: str | None = None
    samples: int = 0


def raise_problem(problem: str) -> None:
    """A writer's stop reason, raised on the driver as the exception it names."""
    kind, _, text = problem.partition(": ")
    if kind == "ModelMismatchError":
        raise ModelMismatchError(text)
    raise RuntimeError(text)
