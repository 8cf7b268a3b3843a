"""The Ray side of a run: connect or start Ray, size the actor pools against the cluster.

Sizing happens before any actor is asked for: an actor that asks for a GPU the cluster does not
have waits forever instead of failing, so a config that cannot run fails here, by name. The model
pool has a fixed size; retrieval and scoring are autoscaling pools of 1 to n actors, n from the
config, cut to what the CPUs allow next to the tasks that feed them.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

from pipeline.config import RunConfig


LOADER_CPUS = 0.25  # the loader tasks are light, but they must always find a CPU slot
SCORE_CPUS = 0.25  # per scorer actor: a small segmenter on one torch thread
RETRIEVE_CPUS = 0.5  # per retrieval actor: one FAISS search and an exact rerank per batch
PLAN_TASK_CPUS = 1.0  # the read/augment and embed tasks of the plan pass ask for Ray's default slot
# A load task waits for its model actor (pipeline/synthesis_actors.py) and lends its CPU slot
# meanwhile, so Ray starts more workers than CPUs. With Ray's default (workers above one per CPU
# idle for 1 s are ended) pass 2 ended and started workers all the time, each start paying its
# imports; a local Ray keeps them for this long instead.
IDLE_WORKER_KEEP_MS = 60_000

class ClusterResourceError(RuntimeError):
    """The cluster cannot run what the config asks for (e.g. GPUs that are not there)."""


def local_gpus(cfg: RunConfig, device_count: Callable[[], int] | None = None) -> int:
    """GPUs a local Ray is started with: every GPU this machine shows (``CUDA_VISIBLE_DEVICES``
    applies) when the config gives actors GPUs, else none, so a CPU config runs as it always did.
    ``device_count`` replaces ``torch.cuda.device_count`` (tests)."""
    if cfg.synthesis.num_gpus <= 0:
        return 0
    if device_count is None:
        import torch

        device_count = torch.cuda.device_count
    return int(device_count())


def local_ray_args(cfg: RunConfig, device_count: Callable[[], int] | None = None) -> dict:
    """``ray.init`` arguments of a local Ray. "local" always starts a fresh instance, never one that
    `ray start` left on this machine."""
    return dict(address="local", num_cpus=cfg.ray.num_cpus, num_gpus=local_gpus(cfg, device_count),
                include_dashboard=False, log_to_driver=False, configure_logging=False,
                _system_config={"idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS})


def ensure_ray(cfg: RunConfig, device_count: Callable[[], int] | None = None) -> bool:
    """Connect to (or start) Ray; returns True when this call started it (and should stop it).
    A started local Ray has this machine's GPUs when the config asks for GPUs (no `ray start`)."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:  # a cluster: `ray job submit` sets RAY_ADDRESS for the driver; its nodes own the GPUs
        ray.init(address=address, log_to_driver=True)
    else:  # local by default (local_mode no longer exists in Ray)
        keep_token_auth()
        ray.init(**local_ray_args(cfg, device_count))
    return True


def keep_token_auth() -> None:
    """A new local Ray turns token authentication on unless ``RAY_AUTH_MODE`` says otherwise, and
    then warns on every start that it did. Saying ``token`` explicitly keeps it on, without the
    warning; a user's own ``RAY_AUTH_MODE`` (``disabled``) is left alone. Ray reads the variable
    into its config when it is imported, so the config is read again."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    from ray._raylet import Config

    Config.initialize("")


def actor_pool(n: int, autoscale: bool = False):
    """``compute=`` of a ``map_batches`` that runs a callable class on ``n`` actors, or with
    ``autoscale`` on 1 to ``n`` (Ray Data adds actors while their queue is long)."""
    from ray.data import ActorPoolStrategy

    if autoscale:
        return ActorPoolStrategy(min_size=1, max_size=max(1, int(n)))
    return ActorPoolStrategy(size=int(n))


def restart_policy(cfg: RunConfig) -> dict[str, int]:
    """Restart bounds of every actor: a dead actor is restarted (a CUDA error ends its process on
    purpose), and a task that failed with the machine, not the sample, is retried. The model and
    scorer actors take them in ``ray.remote`` (pipeline/synthesis_actors.py,
    pipeline/scoring_actors.py). Ray Data pools could take them only through ``map_batches``'
    ``ray_remote_args``, which Ray 2.60 deprecates without a named replacement, so the retrieval
    pool keeps Ray Data's own policy."""
    return {"max_restarts": cfg.ray.max_restarts, "max_task_retries": cfg.ray.max_task_retries}


def configure_ray_data(show_progress: bool) -> None:
    """Ray Data's context for a run: quiet, unordered, machine failures retried."""
    import logging

    from ray.data import DataContext

    from amgen_core.quarantine import InfrastructureError

    # Our own bars and summary speak for the run; Ray Data's per-dataset INFO lines are noise here.
    logging.getLogger("ray.data").setLevel(logging.ERROR)

    ctx = DataContext.get_current()
    # An actor task that raised InfrastructureError (OOM after the split, a lost object) runs again,
    # up to max_task_retries (restart_policy); a sample error never gets here (it is a row).
    ctx.actor_task_retry_on_errors = [InfrastructureError]
    ctx.enable_progress_bars = show_progress
    ctx.execution_options.preserve_order = False
    ctx.execution_options.verbose_progress = False
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = False


@dataclass
class Workers:
    """The model actor pool a run gets: how many actors, what each holds, where the model runs."""
    actors: int
    num_gpus: float
    num_cpus: float
    device: str
    torch_threads: int
    note: str = ""
    score_actors: int = 1  # scorer actors (score.enabled or gate.enabled only)


def wait_for_gpus(cfg: RunConfig, say: Callable[[str], None] | None = None) -> dict[str, float]:
    """On an autoscaling cluster GPU workers may not exist yet: ask the autoscaler for the actors'
    bundles and wait up to ``synthesis.gpu_wait_s`` for them; returns the cluster's resources."""
    import ray

    s = cfg.synthesis
    have = ray.cluster_resources()
    if s.num_gpus <= 0 or s.gpu_wait_s <= 0 or have.get("GPU", 0.0) >= s.num_gpus * s.actors:
        return have
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"GPU": s.num_gpus, "CPU": s.num_cpus}] * s.actors)
    if say:
        say(f"waiting up to {s.gpu_wait_s:g}s for {s.num_gpus * s.actors:g} GPU(s) from the autoscaler")
    deadline = time.monotonic() + s.gpu_wait_s
    while time.monotonic() < deadline and have.get("GPU", 0.0) < s.num_gpus * s.actors:
        time.sleep(5)
        have = ray.cluster_resources()
    return have


def pool_size(want: int, free_cpus: float | None, per_actor: float) -> int:
    """Largest size of an autoscaling pool: ``want``, cut to the CPU slots left for it (``None``: the
    cluster did not say). Never below 1: the caller keeps room for the pool's first actor."""
    if free_cpus is None:
        return int(want)
    return max(1, min(int(want), int(free_cpus / per_actor + 1e-9)))


def retrieve_pool_size(cfg: RunConfig, cluster: dict[str, float]) -> int:
    """The retrieval pool's largest size: ``exemplars.retrieve_actors``, cut so that the plan pass's
    read and embed tasks keep a whole CPU slot (else retrieval actors starve their own input)."""
    cpus = float(cluster.get("CPU", 0.0))
    return pool_size(cfg.exemplars.retrieve_actors, cpus - PLAN_TASK_CPUS if cpus else None, RETRIEVE_CPUS)


def _leave_room(cfg: RunConfig, cpus: float, actors: int, num_cpus: float, note: str) -> tuple[float, str]:
    """The CPU request of each model actor, lowered where the actors would take every CPU slot: the
    loader tasks (and the first scorer) in front of and behind them could then never be scheduled,
    and the run would wait forever. Only Ray's bookkeeping changes; threads and outputs do not."""
    reserve = LOADER_CPUS + (SCORE_CPUS if cfg.score.enabled or cfg.gate.enabled else 0.0)
    if not cpus or actors * num_cpus + reserve <= cpus:
        return num_cpus, note
    lowered = round((cpus - reserve) / actors, 4)
    extra = f"each actor asks for {lowered:g} CPU instead of {num_cpus:g}, leaving {reserve:g} for the loader"
    return lowered, f"{note}; {extra}" if note else extra


def plan_workers(cfg: RunConfig, cluster: dict[str, float]) -> Workers:
    """Check the cluster against the config BEFORE asking for actors: an actor that asks for a GPU
    the cluster does not have waits forever instead of failing."""
    s, m = cfg.synthesis, cfg.model
    gpus = float(cluster.get("GPU", 0.0))
    cpus = float(cluster.get("CPU", 0.0))
    threads = s.torch_threads or max(1, int(s.num_cpus))
    if s.num_gpus > 0:
        if gpus < s.num_gpus:
            if not s.allow_cpu_fallback:
                raise ClusterResourceError(
                    f"{cfg.origin}: synthesis.num_gpus={s.num_gpus} per actor, but the Ray cluster has {gpus:g} GPU(s). "
                    "Start GPU workers, or set synthesis.num_gpus: 0 (CPU), or synthesis.allow_cpu_fallback: true.")
            return _with_scorers(cfg, cpus, Workers(
                s.actors, 0.0, s.num_cpus, "cpu", threads,
                note=f"no GPU in the cluster ({gpus:g}); falling back to CPU (synthesis.allow_cpu_fallback)"))
        fit = int(gpus // s.num_gpus)
        device = "cuda" if m.device in ("auto", "cuda") else "cpu"
        note = "" if fit >= s.actors else f"only {fit} actor(s) fit on {gpus:g} GPU(s); using {fit}"
        actors = min(s.actors, fit)
        num_cpus, note = _leave_room(cfg, cpus, actors, s.num_cpus, note)
        return _with_scorers(cfg, cpus, Workers(actors, s.num_gpus, num_cpus, device, threads, note))
    if m.device == "cuda":
        raise ClusterResourceError(f"{cfg.origin}: model.device is 'cuda' but synthesis.num_gpus is 0; "
                                   "give each actor a GPU (synthesis.num_gpus: 1) or use device: cpu/auto")
    if cpus and s.num_cpus > cpus:
        raise ClusterResourceError(f"{cfg.origin}: synthesis.num_cpus={s.num_cpus} per actor, but the Ray "
                                   f"cluster has {cpus:g} CPU(s)")
    fit = int(cpus // s.num_cpus) if cpus else s.actors
    note = "" if fit >= s.actors else f"only {fit} actor(s) fit on {cpus:g} CPU(s); using {fit}"
    actors = max(1, min(s.actors, fit))
    num_cpus, note = _leave_room(cfg, cpus, actors, s.num_cpus, note)
    return _with_scorers(cfg, cpus, Workers(actors, 0.0, num_cpus, "cpu", threads, note))


def _with_scorers(cfg: RunConfig, cpus: float, w: Workers) -> Workers:
    """As many scorers as `score.actors` asks, within the CPU slots the model actors and the loader leave."""
    if cfg.score.enabled or cfg.gate.enabled:
        w.score_actors = pool_size(cfg.score.actors, cpus - w.actors * w.num_cpus - LOADER_CPUS if cpus else None,
                                   SCORE_CPUS)
    return w
