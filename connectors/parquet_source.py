"""Parquet (an amgen output, or any HF-style Parquet with Image struct columns) read back as layouts.

So the output of one run can feed another: ``label`` becomes the layout, ``image`` the exemplar
appearance, ``instance`` (when present and not null) the instances. Image columns are HF ``Image``
structs ``{bytes, path}``; a struct with only a path is read from that path (relative paths are
taken from the Parquet file's folder).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from amgen_core.labels import check_label_ids
from amgen_core.image_io import CorruptImageError, check_same_size, decode_image_bytes
from connectors.source_api import Item, LayoutSource
from amgen_core.records import Layout

ID_COLUMNS = ("sample_id", "layout_id", "id")
_SCALAR = (str, int, float, bool, type(None))


def parquet_files(path: Path) -> list[Path]:
    """The Parquet files of a file, an amgen output folder (its data/) or a folder of shards."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such Parquet file or folder")
    base = path / "data" if (path / "data").is_dir() else path  # an amgen output folder, or its data/
    files = sorted(p for p in base.rglob("*.parquet") if not any(part.startswith(".") for part in p.relative_to(base).parts))
    if not files:
        raise FileNotFoundError(f"{base}: no .parquet files")
    return files


def _is_image_struct(field: pa.Field) -> bool:
    return pa.types.is_struct(field.type) and field.type.get_field_index("bytes") >= 0


class ParquetSource(LayoutSource):
    name = "parquet"

    def __init__(self, path_or_dir: str | os.PathLike, *, split: str = "train", image_column: str = "image",
                 label_column: str = "label", instance_column: str = "instance", name: str = "parquet"):
        self.files = parquet_files(Path(path_or_dir))
        self.split, self.name = split, name
        self.image_column, self.label_column, self.instance_column = image_column, label_column, instance_column
        self._cache: tuple[tuple[str, int], pa.Table] | None = None
        self._starts: dict[str, np.ndarray] = {}
        for f in self.files:
            schema = pq.read_schema(f)
            if label_column not in schema.names or not _is_image_struct(schema.field(label_column)):
                raise ValueError(f"{f}: needs an Image struct column {label_column!r} {{bytes, path}}")

    def list_items(self) -> list[Item]:
        items = []
        for f in self.files:
            pf = pq.ParquetFile(f)
            id_col = next((c for c in ID_COLUMNS if c in pf.schema_arrow.names), None)
            n = pf.metadata.num_rows
            ids = pf.read(columns=[id_col]).column(0).to_pylist() if id_col else [f"{f.stem}/{i}" for i in range(n)]
            for row, rid in enumerate(ids):
                items.append({"item_id": f"{self.name}/{rid}", "source": self.name, "path": str(f),
                              "file": str(f), "row": row})
        return items

    def _row(self, file: str, row: int) -> dict[str, Any]:
        """One row, reading (and keeping) only its row group: sequential reads decode each group once."""
        if file not in self._starts:
            meta = pq.read_metadata(file)
            self._starts[file] = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
        starts = self._starts[file]
        if not 0 <= row < starts[-1]:
            raise IndexError(f"{file}: row {row} out of range ({starts[-1]} rows)")
        rg = int(np.searchsorted(starts, row, side="right")) - 1
        if self._cache is None or self._cache[0] != (file, rg):
            self._cache = ((file, rg), pq.ParquetFile(file).read_row_group(rg))
        return self._cache[1].slice(row - int(starts[rg]), 1).to_pylist()[0]

    def _decode(self, cell: Any, file: str, where: str, kind: str) -> np.ndarray | None:
        if cell is None:
            return None
        data = cell.get("bytes")
        if data is None and cell.get("path"):
            p = Path(cell["path"])
            p = p if p.is_absolute() else Path(file).parent / p
            if not p.is_file():
                raise FileNotFoundError(f"{where}: image path {p} does not exist")
            data = p.read_bytes()
        if data is None:
            raise CorruptImageError(f"{where}: Image struct holds neither bytes nor path")
        return decode_image_bytes(data, where, kind)

    def read_item(self, item: Item) -> Layout:
        file, row = item["file"], int(item["row"])
        rec = self._row(file, row)
        where = f"{file} row {row}"
        label = self._decode(rec.get(self.label_column), file, f"{where} {self.label_column}", "label")
        if label is None:
            raise CorruptImageError(f"{where}: {self.label_column} is null")
        label = check_label_ids(label, f"{where} {self.label_column}")
        image = self._decode(rec.get(self.image_column), file, f"{where} {self.image_column}", "rgb")
        instance = self._decode(rec.get(self.instance_column), file, f"{where} {self.instance_column}", "label")
        if image is not None:
            check_same_size(image, label, where)
        if instance is not None:
            check_same_size(instance, label, where, "instance and label")
            instance = instance.astype(np.int32)
        image_cols = {self.image_column, self.label_column, self.instance_column}
        meta = {k: v for k, v in rec.items() if k not in image_cols and isinstance(v, _SCALAR)}
        meta.update(file=os.path.basename(file), row=row)
        split = rec.get("split") if isinstance(rec.get("split"), str) else self.split
        return Layout(layout_id=item["item_id"], source=self.name, label=label, instance=instance,
                      image=image, split=split, meta=meta)
