"""Pass 2's model actors: plain Ray actors built from a small spec, fed by a Ray Data task stage.

Why not a Ray Data actor pool for the model: Ray Data (2.60) hands each pool actor its own UDF
wrapper and data context as object-store references, so with restarts on (a CUDA error ends the
actor's process on purpose, for Ray to restart it: stages/failures.py) Ray core prints an error
line for the actor on every run ("has constructor arguments in the object store and
max_restarts > 0"), and restart bounds can only reach such a pool through Ray Data's deprecated
``ray_remote_args``. Here the constructor gets the model config (a few hundred bytes, passed
inline), the actor loads the model itself, and it carries the run's restart policy
(``ray.max_restarts``, ``ray.max_task_retries``; an InfrastructureError is retried like a lost
actor).

Prefetch: each stage task loads one group (CPU: read, augment replay, pack), queues it at its
actor and waits; the actor returns arrays and the task encodes the PNGs (the actor's thread is the
model's: at 129 images/s on a GPU, every CPU millisecond per sample inside it idles the GPU 13 %). A pool of ``actors x (1 + synthesis.prefetch_batches)`` such tasks keeps
``prefetch_batches`` loaded groups queued at every actor while it computes one; Ray delivers a
queued call's arguments before its turn, so the model never waits for loading or transfer. A group
goes to the actor its exemplar hashes to, so an exemplar's later groups find its bank cached.
"""
from __future__ import annotations

import json
import zlib
from typing import Any

from pipeline.cluster import Workers, restart_policy
from pipeline.config import RunConfig
from stages.group import load_groups_batch


class SynthesisActor:
    """One model replica (a Ray actor): ``stages.synthesize.Synthesizer`` behind one method."""

    def __init__(self, model: dict[str, Any], **kwargs):
        from stages.synthesize import Synthesizer

        self.synth = Synthesizer(model, **kwargs)

    def synthesize(self, batch: dict[str, list]) -> dict[str, list]:
        return self.synth(batch)

    def ready(self) -> str:
        return self.synth.model_id


def start_synthesis_actors(cfg: RunConfig, workers: Workers) -> list:
    """The model actors of a run: ``workers.actors`` of them, each asking for its CPUs and GPUs."""
    import ray

    cls = ray.remote(num_cpus=workers.num_cpus, num_gpus=workers.num_gpus or 0, **restart_policy(cfg))(SynthesisActor)
    s = cfg.synthesis
    return [cls.remote(cfg.model.model_dump(mode="json"), device=workers.device, torch_threads=workers.torch_threads,
                       bank_cache_size=s.bank_cache_size, bank_cache_bytes=s.bank_cache_bytes,
                       restart_on_device_error=True, encode_pngs=False)
            for _ in range(workers.actors)]


def actor_by_key(key: str, actors: list):
    """One of ``actors`` picked by a key's checksum: the same key always goes to the same actor,
    whatever the timing."""
    return actors[zlib.crc32(str(key).encode()) % len(actors)]


def actor_for(group_json: str, actors: list):
    """The actor a group goes to: by its exemplar, so that the exemplar's bank is cached there."""
    return actor_by_key(json.loads(group_json)["exemplar_id"], actors)


def queue_batch(actor, batch: dict[str, list]):
    """Queue one loaded batch at a model actor; a machine failure it reports (InfrastructureError)
    is retried like a lost actor, up to ``ray.max_task_retries``."""
    from amgen_core.quarantine import InfrastructureError

    return actor.synthesize.options(retry_exceptions=[InfrastructureError]).remote(batch)


def load_and_synthesize_batch(batch: dict[str, Any], target_spec: str, exemplar_spec: str,
                              actors: list) -> dict[str, list]:
    """Ray Data batch function: group descriptors -> loaded here -> synthesized by their actors ->
    sample rows (``stages.sample_rows.SAMPLE_COLUMNS``)."""
    import ray

    from stages.sample_rows import SAMPLE_COLUMNS, encode_pngs

    loaded = load_groups_batch(batch, target_spec, exemplar_spec)
    refs = [queue_batch(actor_for(group, actors), {k: [v[i]] for k, v in loaded.items()})
            for i, group in enumerate(loaded["group"])]
    outs = ray.get(refs)
    return encode_pngs({k: [x for o in outs for x in o[k]] for k in SAMPLE_COLUMNS})
