"""The Ray side of a run: connect or start Ray, size the actor pool against the cluster.

Sizing happens before any actor is asked for: an actor that asks for a GPU the cluster does not
have waits forever instead of failing, so a config that cannot run fails here, by name.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

from pipeline.config import RunConfig


LOADER_CPUS = 0.25  # the loader (and scorer) tasks are light, but they must always find a CPU slot

class ClusterResourceError(RuntimeError):
    """The cluster cannot run what the config asks for (e.g. GPUs that are not there)."""


def ensure_ray(cfg: RunConfig) -> bool:
    """Connect to (or start) Ray; returns True when this call started it (and should stop it)."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:  # a cluster: `ray job submit` sets RAY_ADDRESS for the driver
        ray.init(address=address, log_to_driver=True)
    else:  # local by default, CPU only (local_mode no longer exists in Ray). "local" always starts
        # a fresh instance, never one that `ray start` left on this machine.
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, num_gpus=0, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    return True


def actor_pool(n: int):
    """``compute=`` of a ``map_batches`` that runs a callable class on ``n`` actors."""
    from ray.data import ActorPoolStrategy

    return ActorPoolStrategy(size=int(n))


def quiet_ray_data(show_progress: bool) -> None:
    import logging

    from ray.data import DataContext

    # Our own bars and summary speak for the run; Ray Data's per-dataset INFO lines are noise here.
    logging.getLogger("ray.data").setLevel(logging.ERROR)

    ctx = DataContext.get_current()
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


def _leave_room(cfg: RunConfig, cpus: float, actors: int, num_cpus: float, note: str) -> tuple[float, str]:
    """The CPU request of each model actor, lowered where the actors would take every CPU slot: the
    loader tasks (and the scorer) in front of and behind them could then never be scheduled, and
    the run would wait forever. Only Ray's bookkeeping changes; threads and outputs do not."""
    reserve = LOADER_CPUS * (2 if cfg.score.enabled else 1)
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
            return Workers(s.actors, 0.0, s.num_cpus, "cpu", threads,
                           note=f"no GPU in the cluster ({gpus:g}); falling back to CPU (synthesis.allow_cpu_fallback)")
        fit = int(gpus // s.num_gpus)
        device = "cuda" if m.device in ("auto", "cuda") else "cpu"
        note = "" if fit >= s.actors else f"only {fit} actor(s) fit on {gpus:g} GPU(s); using {fit}"
        actors = min(s.actors, fit)
        num_cpus, note = _leave_room(cfg, cpus, actors, s.num_cpus, note)
        return Workers(actors, s.num_gpus, num_cpus, device, threads, note)
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
    return Workers(actors, 0.0, num_cpus, "cpu", threads, note)
