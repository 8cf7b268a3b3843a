"""Check a written output folder end to end (``amgen verify OUT``).

Problems are sentences naming the file (and the row, with its sample_id) that is wrong, so a failed
check says what to look at. Checked:
- shards: names ``train-KKKKK-of-NNNNN.parquet``, one N, every K present, no stray parquet in data/;
- schema: the sample columns with their types, HF Image metadata, one schema across shards,
  row groups of at most 100 rows;
- manifest.json: present, lists exactly the shards on disk, rows and sha256 match the files;
- rows: every label decodes to uint8 Cityscapes ids of the image's size, every image decodes to RGB,
  instances decode to 16 bits of the same size, sample_ids are unique;
- errors/*.parquet readable with the error columns; README.md with the YAML header datasets reads;
- filtered/ (the quality gate's table): files named ``shard-KKKKK.parquet`` after a shard on disk,
  the filtered columns, known reasons, no sample both filtered and in a shard, and as many rows as
  a complete manifest's ``counts.filtered``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from datasets import Features, Image

from amgen_core.labels import LabelError, check_label_ids
from amgen_core.image_io import CorruptImageError, decode_image_bytes
from connectors.filtered_sink import FILTERED_DIR, FILTERED_SCHEMA, REASONS
from connectors.parquet_sink import (
    CARD_NAME, DATA_DIR, ERROR_SCHEMA, ERRORS_DIR, IMAGE_COLUMNS, MANIFEST_NAME, MAX_ROW_GROUP, SAMPLE_SCHEMA,
    SCORE_PREFIX, SHARD_RE, TRUSTED_LABEL, file_sha256, shard_name,
)

MAX_ROW_PROBLEMS_PER_SHARD = 20


@dataclass
class VerifyReport:
    ok: bool
    problems: list[str]
    counts: dict[str, int]
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        head = "OK" if self.ok else f"FAILED ({len(self.problems)} problem(s))"
        counts = ", ".join(f"{k}={v}" for k, v in self.counts.items())
        return "\n".join([f"verify: {head}; {counts}", *[f"  - {p}" for p in self.problems],
                          *[f"  (warning) {w}" for w in self.warnings]])


class _Check:
    def __init__(self, out: Path):
        self.out = out
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.counts = {"shards": 0, "samples": 0, "errors": 0, "bad_rows": 0}
        self.sample_ids: dict[str, str] = {}  # sample_id -> where in data/ it was read
        self.schemas: list[pa.Schema] = []  # of the shards read so far, in name order

    # ------------------------------------------------------------ shards on disk
    def shard_files(self) -> dict[str, Path]:
        data = self.out / DATA_DIR
        if not data.is_dir():
            self.problems.append(f"{DATA_DIR}/: missing (no shards)")
            return {}
        found: dict[str, Path] = {}
        totals: set[int] = set()
        indices: set[int] = set()
        stable: set[int] = set()
        for p in sorted(data.iterdir()):
            if p.name.startswith("."):
                self.warnings.append(f"{DATA_DIR}/{p.name}: leftover temporary file (an interrupted write)")
                continue
            m = SHARD_RE.match(p.name)
            if not m:
                self.problems.append(f"{DATA_DIR}/{p.name}: unexpected file (shards are train-KKKKK-of-NNNNN.parquet, "
                                     "or train-KKKKK.parquet for an increment)")
                continue
            if m[2] is None:  # an increment's shard: a stable name, it comes after the first plan's
                stable.add(int(m[1]))
            else:
                indices.add(int(m[1]))
                totals.add(int(m[2]))
            found[f"{DATA_DIR}/{p.name}"] = p
        if not found:
            self.problems.append(f"{DATA_DIR}/: no shards")
        elif len(totals) > 1:
            self.problems.append(f"{DATA_DIR}/: shards disagree on the shard count N: {sorted(totals)}")
        else:
            total = totals.pop() if totals else 0
            for k in range(total):
                if k not in indices:
                    self.problems.append(f"missing shard {DATA_DIR}/{shard_name(k, total)}")
            for k in sorted(i for i in indices if i >= total):
                self.problems.append(f"{DATA_DIR}/{shard_name(k, total)}: index {k} beyond the shard count {total}")
            for k in sorted(i for i in stable if i < total):
                self.problems.append(f"{DATA_DIR}/{shard_name(k, None)}: index {k} is one of the first plan's "
                                     f"{total} shards")
            for k in range(total, max(stable, default=total - 1) + 1):
                if k not in stable:
                    self.problems.append(f"missing shard {DATA_DIR}/{shard_name(k, None)}")
        self.counts["shards"] = len(found)
        return found

    # ------------------------------------------------------------ manifest
    def manifest(self, shards: dict[str, Path]) -> None:
        path = self.out / MANIFEST_NAME
        if not path.is_file():
            self.problems.append(f"{MANIFEST_NAME}: missing")
            return
        try:
            man = json.loads(path.read_text())
            entries = {e["name"]: e for e in man["shards"]}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            self.problems.append(f"{MANIFEST_NAME}: unreadable or without a 'shards' list ({type(e).__name__}: {e})")
            return
        for name in sorted(set(shards) - set(entries)):
            self.problems.append(f"{name}: on disk but not in {MANIFEST_NAME}")
        for name, entry in sorted(entries.items()):
            p = shards.get(name)
            if p is None:
                if (self.out / name).is_file():
                    continue  # reported as an unexpected/misnamed shard already
                self.problems.append(f"{name}: listed in {MANIFEST_NAME} but missing on disk")
                continue
            digest = file_sha256(p)
            if digest != entry.get("sha256"):
                self.problems.append(f"{name}: sha256 {digest[:12]}... does not match {MANIFEST_NAME} "
                                     f"({str(entry.get('sha256'))[:12]}...)")
            try:
                rows = pq.read_metadata(p).num_rows
            except (pa.ArrowException, OSError):
                continue  # reported when the shard is read
            if rows != entry.get("rows"):
                self.problems.append(f"{name}: {rows} rows but {MANIFEST_NAME} says {entry.get('rows')}")
        declared = (man.get("counts") or {}).get("samples") if isinstance(man.get("counts"), dict) else None
        total = sum(int(e.get("rows", 0)) for e in entries.values())
        if declared is not None and declared != total:
            self.problems.append(f"{MANIFEST_NAME}: counts.samples={declared} but its shards hold {total} rows")

    # ------------------------------------------------------------ schema and rows
    def schema(self, name: str, pf: pq.ParquetFile) -> bool:
        schema = pf.schema_arrow
        ok = True
        for f in SAMPLE_SCHEMA:
            if f.name not in schema.names:
                self.problems.append(f"{name}: column {f.name!r} missing")
                ok = False
            elif not schema.field(f.name).type.equals(f.type):
                self.problems.append(f"{name}: column {f.name!r} is {schema.field(f.name).type}, expected {f.type}")
                ok = False
        for n in schema.names:
            optional = ((n.startswith(SCORE_PREFIX) and pa.types.is_floating(schema.field(n).type))
                        or (n == TRUSTED_LABEL and schema.field(n).type.equals(SAMPLE_SCHEMA.field("label").type)))
            if n not in SAMPLE_SCHEMA.names and not optional:
                self.problems.append(f"{name}: unexpected column {n!r} ({schema.field(n).type})")
        try:
            images = [c for c in (*IMAGE_COLUMNS, TRUSTED_LABEL) if c in schema.names]
            if not schema.metadata or b"huggingface" not in schema.metadata:
                self.problems.append(f"{name}: no HF features metadata (needed to decode {images} as Image)")
            else:
                feats = Features.from_arrow_schema(schema)
                not_images = [c for c in images if not isinstance(feats.get(c), Image)]
                if not_images:
                    self.problems.append(f"{name}: HF features metadata does not decode {not_images} as Image")
        except (ValueError, TypeError, KeyError) as e:
            self.problems.append(f"{name}: unreadable HF features metadata ({e})")
        if self.schemas and not schema.equals(self.schemas[0], check_metadata=False):
            self.problems.append(f"{name}: schema differs from the first shard's ({self.schemas[0].names} vs {schema.names})")
        self.schemas.append(schema)
        for rg in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            if n > MAX_ROW_GROUP:
                self.problems.append(f"{name}: row group {rg} has {n} rows (> {MAX_ROW_GROUP})")
        return ok

    def row(self, where: str, rec: dict[str, Any]) -> list[str]:
        bad = []
        label = image = None
        try:
            cell = rec["label"]
            label = decode_image_bytes(cell and cell.get("bytes"), f"{where} label", "label")
            if label.dtype != np.uint8:
                bad.append(f"{where}: label is {label.dtype}, expected an 8-bit PNG of ids")
            check_label_ids(label, f"{where}: label")
        except (CorruptImageError, LabelError) as e:
            bad.append(str(e))
        try:
            cell = rec["image"]
            image = decode_image_bytes(cell and cell.get("bytes"), f"{where} image", "rgb")
        except CorruptImageError as e:
            bad.append(str(e))
        if label is not None and image is not None and label.shape != image.shape[:2]:
            bad.append(f"{where}: label {label.shape[0]}x{label.shape[1]} does not match image "
                       f"{image.shape[0]}x{image.shape[1]}")
        if rec.get("instance") is not None:
            try:
                inst = decode_image_bytes(rec["instance"].get("bytes"), f"{where} instance", "label")
                if inst.dtype != np.uint16:
                    bad.append(f"{where}: instance is {inst.dtype}, expected a 16-bit PNG")
                if label is not None and inst.shape != label.shape:
                    bad.append(f"{where}: instance {inst.shape} does not match label {label.shape}")
            except CorruptImageError as e:
                bad.append(str(e))
        if rec.get(TRUSTED_LABEL) is not None and label is not None:
            try:
                trusted = decode_image_bytes(rec[TRUSTED_LABEL].get("bytes"), f"{where} {TRUSTED_LABEL}", "label")
                if trusted.shape != label.shape:
                    bad.append(f"{where}: {TRUSTED_LABEL} {trusted.shape} does not match label {label.shape}")
                elif np.any((trusted != label) & (trusted != 0)):
                    bad.append(f"{where}: {TRUSTED_LABEL} has ids that are neither the label's nor 0 (unlabeled)")
            except CorruptImageError as e:
                bad.append(str(e))
        return bad

    def rows(self, name: str, pf: pq.ParquetFile, seen: dict[str, str]) -> None:
        cols = [c for c in ("sample_id", *IMAGE_COLUMNS, TRUSTED_LABEL) if c in pf.schema_arrow.names]
        row_problems: list[str] = []
        i = 0
        for batch in pf.iter_batches(columns=cols, batch_size=MAX_ROW_GROUP):
            for rec in batch.to_pylist():
                sid = rec.get("sample_id")
                where = f"{name} row {i} (sample_id {sid})"
                bad = self.row(where, rec)
                if sid in seen:
                    bad.append(f"{where}: duplicate sample_id, also in {seen[sid]}")
                seen.setdefault(sid, f"{name} row {i}")
                row_problems.extend(bad)
                self.counts["bad_rows"] += bool(bad)
                i += 1
        self.counts["samples"] += i
        self.problems.extend(row_problems[:MAX_ROW_PROBLEMS_PER_SHARD])
        if len(row_problems) > MAX_ROW_PROBLEMS_PER_SHARD:
            self.problems.append(f"{name}: ... and {len(row_problems) - MAX_ROW_PROBLEMS_PER_SHARD} more row problems")

    def shards(self, shards: dict[str, Path]) -> None:
        seen = self.sample_ids
        for name, p in sorted(shards.items()):
            try:
                pf = pq.ParquetFile(p)
            except (pa.ArrowException, OSError) as e:
                self.problems.append(f"{name}: not a readable Parquet file ({e})")
                continue
            if self.schema(name, pf):
                try:
                    self.rows(name, pf, seen)
                except (pa.ArrowException, OSError) as e:
                    self.problems.append(f"{name}: reading rows failed ({e})")

    # ------------------------------------------------------------ errors/ and card
    def errors(self) -> None:
        d = self.out / ERRORS_DIR
        if not d.is_dir():
            return  # a run without quarantined inputs may have no errors/ folder
        for p in sorted(d.glob("*.parquet")):
            try:
                t = pq.read_table(p)
            except (pa.ArrowException, OSError) as e:
                self.problems.append(f"{ERRORS_DIR}/{p.name}: not a readable Parquet file ({e})")
                continue
            missing = [c for c in ERROR_SCHEMA.names if c not in t.column_names]
            if missing:
                self.problems.append(f"{ERRORS_DIR}/{p.name}: error columns {missing} missing")
            self.counts["errors"] += t.num_rows

    def filtered(self, shards: dict[str, Path]) -> None:
        d = self.out / FILTERED_DIR
        if not d.is_dir():
            return  # no gate, or a gate that kept everything
        indices = {int(SHARD_RE.match(Path(n).name)[1]) for n in shards}
        total = 0
        for p in sorted(d.iterdir()):
            name = f"{FILTERED_DIR}/{p.name}"
            if p.name.startswith("."):
                self.warnings.append(f"{name}: leftover temporary file (an interrupted write)")
                continue
            if not (p.name.startswith("shard-") and p.name.endswith(".parquet") and p.name[6:-8].isdigit()):
                self.problems.append(f"{name}: unexpected file (filtered tables are shard-KKKKK.parquet)")
                continue
            if int(p.name[6:-8]) not in indices:
                self.problems.append(f"{name}: no shard {int(p.name[6:-8])} in {DATA_DIR}/ (filtered rows of an unfinished shard)")
            try:
                missing = [c for c in FILTERED_SCHEMA.names if c not in pq.read_schema(p).names]
                if missing:
                    self.problems.append(f"{name}: filtered columns {missing} missing")
                    continue
                t = pq.read_table(p, columns=["sample_id", "reason"])
            except (pa.ArrowException, OSError) as e:
                self.problems.append(f"{name}: not a readable Parquet file ({e})")
                continue
            for i, (sid, reason) in enumerate(zip(t.column("sample_id").to_pylist(), t.column("reason").to_pylist())):
                if reason not in REASONS:
                    self.problems.append(f"{name} row {i} (sample_id {sid}): reason {reason!r} is not one of {list(REASONS)}")
                if sid in self.sample_ids:
                    self.problems.append(f"{name} row {i}: sample_id {sid} is filtered and also in {self.sample_ids[sid]}")
            total += t.num_rows
        self.counts["filtered"] = total
        try:
            man = json.loads((self.out / MANIFEST_NAME).read_text())
        except (OSError, json.JSONDecodeError):
            return  # reported by the manifest check
        declared = (man.get("counts") or {}).get("filtered") if isinstance(man.get("counts"), dict) else None
        if man.get("complete") and declared is not None and declared != total:
            self.problems.append(f"{MANIFEST_NAME}: counts.filtered={declared} but {FILTERED_DIR}/ holds {total} rows")

    def card(self) -> None:
        p = self.out / CARD_NAME
        if not p.is_file():
            self.problems.append(f"{CARD_NAME}: missing (the dataset card)")
            return
        text = p.read_text()
        parts = text.split("---\n", 2)
        try:
            header = yaml.safe_load(parts[1]) if text.startswith("---\n") and len(parts) == 3 else None
        except yaml.YAMLError:
            header = None
        if not isinstance(header, dict):
            self.problems.append(f"{CARD_NAME}: no YAML header between '---' lines")
            return
        for key in ("configs", "dataset_info", "task_categories", "license"):
            if key not in header:
                self.problems.append(f"{CARD_NAME}: YAML header lacks {key!r}")
        try:
            card_cols = [f["name"] for f in header["dataset_info"]["features"]]
        except (KeyError, TypeError):
            return
        if self.schemas and card_cols != self.schemas[0].names:
            self.problems.append(f"{CARD_NAME}: features {card_cols} differ from the shard columns {self.schemas[0].names}")


def verify_dataset(out_dir: str | os.PathLike) -> VerifyReport:
    """Check an output folder; ``ok`` is True only when there are no problems (warnings do not count)."""
    out = Path(out_dir)
    check = _Check(out)
    if not out.is_dir():
        return VerifyReport(False, [f"{out}: not a directory"], check.counts)
    shards = check.shard_files()
    check.manifest(shards)
    check.shards(shards)
    check.errors()
    check.filtered(shards)
    check.card()
    return VerifyReport(not check.problems, check.problems, check.counts, check.warnings)
