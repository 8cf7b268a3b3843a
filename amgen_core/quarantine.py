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
