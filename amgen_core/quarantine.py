"""The one builder of quarantine rows: what went wrong with which input, and which file to look at.

A row is ``{input_id, source, stage, reason, path}``. ``path`` is the file that failed: an error that
carries it (``exc.path``, or ``exc.filename`` for OSError) says so itself; otherwise every amgen error
message starts with the file it is about, so the item's file whose path leads the message is blamed.
Only when neither tells is the item's main file (its ``path``) named.
"""
from __future__ import annotations

from typing import Any, Mapping

# Item fields that hold input files, in the order a tie is broken.
FILE_FIELDS = ("image", "label", "instance", "polygons", "sidecar", "path")


def reason_text(error: BaseException | str) -> str:
    return error if isinstance(error, str) else f"{type(error).__name__}: {error}"


def blamed_path(error: BaseException | str, item: Mapping[str, Any] | None = None) -> str | None:
    """The file ``error`` is about: its own ``path``/``filename``, else the item file its message
    starts with, else the item's ``path``."""
    if not isinstance(error, str):
        own = getattr(error, "path", None) or getattr(error, "filename", None)
        if own:
            return str(own)
    if item is None:
        return None
    message = error if isinstance(error, str) else str(error)
    files = [str(item[k]) for k in FILE_FIELDS if item.get(k)]
    # Longest first: a label path must not be mistaken for a shorter path that prefixes it.
    for f in sorted(set(files), key=len, reverse=True):
        if message.startswith(f):
            return f
    return None if item.get("path") is None else str(item["path"])


def quarantine_row(input_id: str, stage: str, error: BaseException | str, *, source: str | None = None,
                   path: str | None = None) -> dict[str, Any]:
    """One quarantine record; an exception becomes "TypeName: message"."""
    return {"input_id": str(input_id), "source": source, "stage": stage, "reason": reason_text(error),
            "path": None if path is None else str(path)}


def item_error_row(item: Mapping[str, Any], stage: str, error: BaseException | str) -> dict[str, Any]:
    """Quarantine row for a source item (a connector's descriptor dict), blaming the failing file."""
    return quarantine_row(str(item.get("item_id")), stage, error, source=item.get("source"),
                          path=blamed_path(error, item))


def sample_error_row(member: Mapping[str, Any], stage: str, error: BaseException | str,
                     path: str | None = None) -> dict[str, Any]:
    """Quarantine row of one planned sample (``member`` holds its target_id and sample_id), so the
    writer can count it against the sample's shard."""
    return {**quarantine_row(member["target_id"], stage, error, path=path), "sample_id": member["sample_id"]}


# ---------------------------------------------------------------- sample errors vs the machine's

SAMPLE, OOM, DEVICE, CLUSTER = "sample", "oom", "device", "cluster"

# Words that only a failing accelerator puts in a RuntimeError (torch raises most CUDA failures as
# plain RuntimeErrors, so the type alone cannot tell them from a bad sample's shape error).
_OOM_WORDS = ("CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")
_DEVICE_WORDS = ("CUDA error", "device-side assert", "CUBLAS_STATUS_", "CUDNN_STATUS_", "cuDNN error",
                 "NCCL error", "illegal memory access", "CUDA driver", "CUDA context")


class InfrastructureError(RuntimeError):
    """The machine failed, not the sample: Ray retries the task (or restarts the actor) instead of
    quarantining the sample. ``kind`` is ``oom``, ``device`` or ``cluster``."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # crosses process boundaries inside Ray's task errors
        return type(self), (self.kind, str(self))


def _own_kind(error: BaseException) -> str:
    if isinstance(error, InfrastructureError):
        return error.kind
    names = [c.__name__ for c in type(error).__mro__]
    if "RayTaskError" in names:  # a remote task's own exception: its ``cause`` tells
        return SAMPLE
    if "RayError" in names:  # lost objects, dead actors, workers or nodes, Ray's memory monitor
        return CLUSTER
    if "OutOfMemoryError" in names:  # torch.cuda.OutOfMemoryError (torch.OutOfMemoryError)
        return OOM
    if "AcceleratorError" in names:  # torch's type for CUDA errors (device asserts, broken context)
        return DEVICE
    if isinstance(error, RuntimeError):
        text = str(error)
        if any(w in text for w in _OOM_WORDS):
            return OOM
        if any(w in text for w in _DEVICE_WORDS):
            return DEVICE
    return SAMPLE


def failure_kind(error: BaseException) -> str:
    """The one classifier of failures: ``sample`` (quarantine the input, the run goes on) or what
    failed around it: ``oom`` (the accelerator's memory; a smaller batch may fit), ``device`` (a
    CUDA error; the process's CUDA context may be unusable from now on) or ``cluster`` (Ray lost an
    object, an actor, a worker or a node). Causes (``raise ... from``, Ray's ``cause``) count too."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        kind = _own_kind(e)
        if kind != SAMPLE:
            return kind
        e = getattr(e, "cause", None) if isinstance(getattr(e, "cause", None), BaseException) else e.__cause__
    return SAMPLE


def is_sample_error(error: BaseException) -> bool:
    return failure_kind(error) == SAMPLE
