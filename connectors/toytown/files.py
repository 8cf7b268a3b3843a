"""Toy-town file writing: atomic (tmp + rename) and byte-deterministic PNG and JSON."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def write_png(path: str | os.PathLike, arr: np.ndarray) -> None:
    """uint8 HxW / HxWx3 as L / RGB; int arrays as 16-bit grey (Cityscapes instanceIds).

    Pillow cannot write mode "I" PNGs, so instance maps go through uint16 (max id 33999).
    """
    path = Path(path)
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        if a.ndim != 2 or a.min(initial=0) < 0 or a.max(initial=0) > 0xFFFF:
            raise ValueError(f"{path}: cannot store {a.dtype} array of shape {a.shape} as a 16-bit PNG")
        a = a.astype(np.uint16)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(np.ascontiguousarray(a)).save(tmp, format="PNG", compress_level=6)
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, sort_keys=True, indent=1))
    os.replace(tmp, path)


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Fully decoded PNG as an array; clear errors for missing or corrupt files."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file does not exist") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable PNG ({exc})") from None
