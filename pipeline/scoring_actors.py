"""Pass 2's scorer actors (score.enabled or gate.enabled): plain Ray actors that hold the judge
segmenter, fed by a Ray Data task stage, like the model actors (pipeline/synthesis_actors.py says
why: a Ray Data actor pool takes restart bounds only through the deprecated ``ray_remote_args``,
and with restarts on Ray core prints an error line for it on every run).

The constructor gets the segmenter's path and the gate's settings (a few bytes, inline); the
actor carries the run's restart policy, so a scorer on a GPU that ends its process after a CUDA
error (stages/failures.py) is restarted and its batch retried.
"""
from __future__ import annotations

from typing import Any

from pipeline.cluster import SCORE_CPUS, Workers, restart_policy
from pipeline.config import RunConfig
from pipeline.synthesis_actors import actor_by_key


class ScoringActor:
    """One judge replica: ``stages.score.Scorer``, or ``stages.gate.GateScorer`` with a gate."""

    def __init__(self, segmenter: str | None, gate: dict[str, Any]):
        from stages.gate import GateScorer
        from stages.score import Scorer

        cls = GateScorer if gate else Scorer
        self.scorer = cls(segmenter, 1, restart_on_device_error=True, **gate)

    def score(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.scorer(batch)


def start_scoring_actors(cfg: RunConfig, workers: Workers) -> list:
    """``workers.score_actors`` scorers (none when neither scoring nor the gate is on)."""
    if not (cfg.score.enabled or cfg.gate.enabled):
        return []
    import ray

    gate = ({"metric": cfg.gate.metric, "threshold": cfg.gate.threshold, "label_trusted": cfg.gate.label_trusted}
            if cfg.gate.enabled else {})
    cls = ray.remote(num_cpus=SCORE_CPUS, **restart_policy(cfg))(ScoringActor)
    return [cls.remote(cfg.score.segmenter, gate) for _ in range(workers.score_actors)]


def optional_columns(cfg: RunConfig) -> tuple[str, ...]:
    """The sample columns this run adds to every shard: the scores, and the gate's trusted label."""
    from connectors.parquet_sink import TRUSTED_LABEL
    from stages.score import SCORE_COLUMNS

    return ((SCORE_COLUMNS if cfg.score.enabled else ())
            + ((TRUSTED_LABEL,) if cfg.gate.enabled and cfg.gate.label_trusted else ()))


def score_batch(batch: dict[str, Any], actors: list) -> dict[str, Any]:
    """Ray Data batch function: sample rows -> scored by one of ``actors`` (by the batch's first
    sample id, so the spread does not depend on timing) -> the same rows with the score columns."""
    import ray

    from amgen_core.quarantine import InfrastructureError

    if not len(batch["sample_id"]):
        return batch
    actor = actor_by_key(batch["sample_id"][0], actors)
    return ray.get(actor.score.options(retry_exceptions=[InfrastructureError]).remote(batch))
