"""Toy-town file writing: atomic (tmp + rename) and byte-deterministic PNG and JSON."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from amgen_core.image_io import encode_png, write_bytes_atomic


def write_png(path: str | os.PathLike, arr: np.ndarray) -> None:
    """uint8 HxW / HxWx3 as L / RGB; int32 instance maps as 16-bit grey (Cityscapes instanceIds)."""
    write_bytes_atomic(path, encode_png(arr, str(path)), fsync=False)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, json.dumps(obj, sort_keys=True, indent=1).encode(), fsync=False)
