"""Resume: which shards of an output folder are already done, and whether the folder is ours.

A shard is done when its final file exists and is sound: shards appear by atomic rename, so a final
name never holds half a shard, but a file can still be damaged later (truncated, overwritten,
deleted). :func:`audit_shards` checks each finished shard against the manifest, moves a damaged one
to ``OUT/damaged/<time>/`` and lists it to be made again. A folder planned with another config hash
is refused unless ``--overwrite``.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from connectors.parquet_sink import (
    CARD_NAME, DATA_DIR, ERRORS_DIR, MANIFEST_NAME, SHARD_RE, ShardStats, file_sha256, shard_name,
    shard_stats_from_file,
)
from connectors.filtered_sink import FILTERED_DIR
from connectors.storage import RemotePath, as_path, rmtree
from pipeline.plan import PLAN_FILE, plan_config_hash

PREVIEW_NAME = "preview.png"
INDEX_DIR = "index"
CITYSCAPES_DIR = "cityscapes"
DAMAGED_DIR = "damaged"
# Everything a run writes into OUT; --overwrite removes exactly these and nothing else.
RUN_ARTIFACTS = (DATA_DIR, ERRORS_DIR, FILTERED_DIR, CARD_NAME, MANIFEST_NAME, PLAN_FILE, PREVIEW_NAME, INDEX_DIR,
                 CITYSCAPES_DIR, DAMAGED_DIR)


class OutputFolderError(ValueError):
    """OUT holds a different run (or something that is not a run)."""


def prepare_out(out: Path | RemotePath, config_hash: str, overwrite: bool = False) -> str:
    """Make ``out`` (a path or a URI) ready; returns "new", "resume" or "overwrite". Raises on a foreign run."""
    out = as_path(out)
    previous = plan_config_hash(out)
    has_data = (out / DATA_DIR).is_dir() and any((out / DATA_DIR).iterdir())
    if previous is None and not has_data:
        out.mkdir(parents=True, exist_ok=True)
        return "new"
    if previous == config_hash and not overwrite:
        return "resume"
    if not overwrite:
        if previous is None:
            raise OutputFolderError(f"{out}: holds {DATA_DIR}/ but no {PLAN_FILE}; not a resumable amgen run "
                                    "(pick another --out, or pass --overwrite)")
        raise OutputFolderError(
            f"{out}: was written with config hash {previous[:12]}, this config hashes to {config_hash[:12]}; "
            "a different config cannot resume it (pick another --out, or pass --overwrite to replace it)")
    for name in RUN_ARTIFACTS:
        p = out / name
        if p.is_dir():
            rmtree(p)
        elif p.exists():
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return "overwrite"


def shard_names(num_shards: int, base_shards: int | None = None) -> dict[int, str]:
    """Shard -> file name: ``-of-N`` names for the first plan's ``base_shards`` (all of them by
    default), stable names for the shards of later increments."""
    base = num_shards if base_shards is None else base_shards
    return {s: shard_name(s, base if s < base else None) for s in range(num_shards)}


def finished_shards(out: Path, num_shards: int, base_shards: int | None = None) -> set[int]:
    """Indexes of shards whose final file exists; a shard of another total is a foreign file."""
    done = set()
    data = as_path(out) / DATA_DIR
    if not data.is_dir():
        return done
    names = shard_names(num_shards, base_shards)
    for p in data.iterdir():
        m = SHARD_RE.match(p.name)
        if not m:
            continue
        idx = int(m[1])
        if names.get(idx) != p.name:
            what = f"a {m[2].lstrip('0') or 0}-shard run" if m[2] else "an increment"
            raise OutputFolderError(f"{p}: shard of {what} in a {num_shards}-shard plan; "
                                    "rerun with --overwrite")
        done.add(idx)
    return done


@dataclass
class RemadeShard:
    """A shard the manifest or the data folder says was finished, but that must be made again."""
    shard: int
    name: str                   # relative to OUT, e.g. "data/train-00001-of-00004.parquet"
    reason: str                 # "missing", "unreadable (...)" or "sha256 differs from the manifest (...)"
    moved_to: str | None = None  # where the damaged file went, relative to OUT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ShardAudit:
    done: set[int]                   # sound finished shards: skip them
    stats: dict[int, ShardStats]     # their stats (from the manifest when it matches, else the file)
    remade: list[RemadeShard]        # damaged or missing: make them again


def _recorded_shards(out: Path | RemotePath) -> dict[str, dict[str, Any]]:
    mpath = out / MANIFEST_NAME
    if not mpath.is_file():
        return {}
    try:
        return {s["name"]: s for s in json.loads(mpath.read_text()).get("shards", [])}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return {}


def read_shard_facts(path: str) -> tuple[str, ShardStats | None, str]:
    """What the audit needs of one shard file (a path or a URI): (sha256, stats recomputed from the
    file, or None when it cannot be read, and why). Runs where the caller wants: the driver, or a
    worker task (pipeline/run.py), so the shards' bytes need not pass the driver."""
    digest = file_sha256(path)
    try:
        return digest, shard_stats_from_file(path), ""
    except Exception as exc:  # noqa: BLE001 - any failure to read it means: make it again
        return digest, None, f"{type(exc).__name__}: {exc}"


def _facts_here(paths: list[str], recorded: set[str]) -> list[tuple[str, ShardStats | None, str]]:
    return [(file_sha256(p), None, "") if p in recorded else read_shard_facts(p) for p in paths]


def audit_shards(out: Path, num_shards: int, clock=time.gmtime, base_shards: int | None = None,
                 facts: Callable[[list[str], set[str]], list] = _facts_here) -> ShardAudit:
    """Check every finished shard of ``out``; move damaged ones aside and list what to remake.

    A shard is damaged when its sha256 differs from the manifest's record, or when it cannot be read
    as a shard (no record to compare with). A shard the manifest records but the data folder lacks
    is missing. Both are made again by the run; nothing damaged is deleted.

    ``facts(paths, recorded)`` reads the shard files: (sha256, stats, problem) per path; only the
    sha256 is needed for a path in ``recorded``. By default here; run.py hands it to workers."""
    out = as_path(out)
    recorded = _recorded_shards(out)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", clock())
    done, stats, remade = set(), {}, []
    names = shard_names(num_shards, base_shards)
    finished = sorted(finished_shards(out, num_shards, base_shards))
    paths = [str(out / DATA_DIR / names[i]) for i in finished]
    with_record = {p for i, p in zip(finished, paths) if f"{DATA_DIR}/{names[i]}" in recorded}
    for i, (digest, file_stats, problem) in zip(finished, facts(paths, with_record)):
        path = out / DATA_DIR / names[i]
        name = f"{DATA_DIR}/{path.name}"
        rec = recorded.get(name)
        if rec is not None:
            if rec.get("sha256") == digest:
                done.add(i)
                stats[i] = ShardStats.from_dict(rec)
                continue
            reason = f"sha256 differs from the manifest ({digest[:12]} on disk, {str(rec.get('sha256'))[:12]} recorded)"
        elif file_stats is not None:
            stats[i] = file_stats
            done.add(i)
            continue
        else:
            reason = f"unreadable ({problem})"
        target = out / DAMAGED_DIR / stamp / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        path.replace(target)
        remade.append(RemadeShard(i, name, reason, str(target.relative_to(out))))
    for name in sorted(recorded):
        idx = _shard_index(name, names)
        if idx is not None and idx not in done and all(r.shard != idx for r in remade):
            remade.append(RemadeShard(idx, name, "missing"))
    remade.sort(key=lambda r: r.shard)
    return ShardAudit(done, stats, remade)


def _shard_index(name: str, names: dict[int, str]) -> int | None:
    m = SHARD_RE.match(Path(name).name)
    if m is None or names.get(int(m[1])) != Path(name).name:
        return None
    return int(m[1])
