"""Resume: which shards of an output folder are already done, and whether the folder is ours.

A shard is done when its final file exists: shards appear by atomic rename, so a final name never
holds half a shard. A folder planned with another config hash is refused unless ``--overwrite``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from connectors.parquet_sink import (
    CARD_NAME, DATA_DIR, ERRORS_DIR, MANIFEST_NAME, SHARD_RE, ShardStats, file_sha256, shard_path,
    shard_stats_from_file,
)
from pipeline.plan import PLAN_FILE, plan_config_hash

PREVIEW_NAME = "preview.png"
INDEX_DIR = "index"
CITYSCAPES_DIR = "cityscapes"
# Everything a run writes into OUT; --overwrite removes exactly these and nothing else.
RUN_ARTIFACTS = (DATA_DIR, ERRORS_DIR, CARD_NAME, MANIFEST_NAME, PLAN_FILE, PREVIEW_NAME, INDEX_DIR, CITYSCAPES_DIR)


class OutputFolderError(ValueError):
    """OUT holds a different run (or something that is not a run)."""


def prepare_out(out: Path, config_hash: str, overwrite: bool = False) -> str:
    """Make ``out`` ready; returns "new", "resume" or "overwrite". Raises on a foreign run."""
    out = Path(out)
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
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return "overwrite"


def finished_shards(out: Path, num_shards: int) -> set[int]:
    """Indexes of shards whose final file exists; a shard of another total is a foreign file."""
    done = set()
    data = Path(out) / DATA_DIR
    if not data.is_dir():
        return done
    for p in data.iterdir():
        m = SHARD_RE.match(p.name)
        if not m:
            continue
        idx, total = int(m[1]), int(m[2])
        if total != num_shards:
            raise OutputFolderError(f"{p}: shard of a {total}-shard run in a {num_shards}-shard plan; "
                                    "rerun with --overwrite")
        done.add(idx)
    return done


def previous_shard_stats(out: Path, done: set[int], num_shards: int) -> dict[int, ShardStats]:
    """Stats of finished shards: from the manifest when it matches the file, else recomputed."""
    recorded: dict[str, dict[str, Any]] = {}
    mpath = Path(out) / MANIFEST_NAME
    if mpath.is_file():
        try:
            recorded = {s["name"]: s for s in json.loads(mpath.read_text()).get("shards", [])}
        except (json.JSONDecodeError, KeyError, TypeError):
            recorded = {}
    stats = {}
    for i in sorted(done):
        path = shard_path(out, i, num_shards)
        rec = recorded.get(f"{DATA_DIR}/{path.name}")
        if rec is not None and rec.get("sha256") == file_sha256(path):
            stats[i] = ShardStats.from_dict(rec)
        else:
            stats[i] = shard_stats_from_file(path)
    return stats
