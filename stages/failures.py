"""What a model stage does when the machine fails rather than the sample.

The classifier is ``amgen_core.quarantine.failure_kind``. A sample error becomes a quarantine row
(the stage's own business); everything else leaves the stage: an out-of-memory batch is split in
halves once first, a CUDA error ends the actor's process (its CUDA context may be unusable, and
only a fresh process gets a new one; Ray restarts the actor and retries its task), and the rest is
raised as ``InfrastructureError``, which Ray retries. Never a quarantine row: resume would then
count the sample as done.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

import numpy as np

from amgen_core.quarantine import DEVICE, OOM, SAMPLE, InfrastructureError, failure_kind

# Test hook: "N:MARKER" makes a model actor's process exit on its Nth batch, once per MARKER file
# (the restarted actor finds the marker and goes on). tests/test_failures.py kills an actor with it.
CRASH_ENV = "AMGEN_CRASH_ACTOR_AT_BATCH"
# The same for the plan task (pipeline/plan_pass.py): "1:MARKER" ends its process once, after it
# has yielded its first value, so the retry replays a generator the driver has begun to read.
PLAN_CRASH_ENV = "AMGEN_CRASH_PLAN_TASK"
EXIT_CODE = 75  # what a killed actor's worker log shows


def free_accelerator_memory() -> None:
    """Give the cached blocks of a failed allocation back before a smaller try."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def split_once_on_oom(run: Callable[[Sequence[int]], np.ndarray], idx: Sequence[int]) -> np.ndarray:
    """``run(idx)``; when it runs out of accelerator memory, ``run`` on each half of ``idx`` instead.
    A half that runs out too raises: the second try is Ray's (a retry, or another actor)."""
    try:
        return run(idx)
    except Exception as e:  # noqa: BLE001 - classified right here
        if failure_kind(e) != OOM or len(idx) < 2:
            raise
    # Outside the except block: the traceback no longer pins the failed call's tensors.
    free_accelerator_memory()
    half = len(idx) // 2
    return np.concatenate([run(idx[:half]), run(idx[half:])])


def leave_stage(error: BaseException, stage: str, exit_process: bool) -> None:
    """Called with any error that escaped a stage's sample handling: sample errors (bugs) are
    re-raised as they are; a CUDA error ends the process when ``exit_process`` (inside a Ray actor
    only); every other machine failure becomes an ``InfrastructureError``."""
    kind = failure_kind(error)
    if kind == SAMPLE:
        raise error
    if kind == DEVICE and exit_process:
        exit_actor(f"{stage}: {type(error).__name__}: {error}")
    raise InfrastructureError(kind, f"{stage}: {kind} failure, not the sample's: {type(error).__name__}: {error}") from error


def exit_actor(why: str) -> None:
    """End this process at once, so Ray restarts the actor (``max_restarts``) and retries its task
    (``max_task_retries``). A clean exit (``ray.actor.exit_actor``) would not be restarted."""
    print(f"amgen: ending this actor's process for a restart: {why}", file=sys.stderr, flush=True)
    os._exit(EXIT_CODE)


class CrashPoint:
    """The ``CRASH_ENV`` test hook of one actor: counts its batches and exits on the Nth."""

    def __init__(self, spec: str | None = None, env: str = CRASH_ENV):
        spec = os.environ.get(env, "") if spec is None else spec
        self.env = env
        self.at, self.marker = 0, ""
        if spec:
            n, _, marker = spec.partition(":")
            if not n.isdigit() or not marker:
                raise ValueError(f"{env}={spec!r}: expected N:MARKER_FILE")
            self.at, self.marker = int(n), marker
        self.batches = 0

    def batch(self) -> None:
        self.batches += 1
        if self.at and self.batches == self.at:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return  # this crash already happened (we are the restarted actor)
            exit_actor(f"{self.env}: batch {self.batches}")
