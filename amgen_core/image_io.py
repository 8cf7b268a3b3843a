"""Image decode/encode shared by every connector: one place for modes, dtypes and errors.

Every error names the file (or the caller's ``where``) so a quarantined input can be found:
- a missing file raises ``FileNotFoundError`` carrying the path;
- bytes that do not decode raise ``CorruptImageError``;
- a file that decodes to the wrong kind of pixels raises ``ImageModeError``;
- an image and a label of different sizes raise ``SizeMismatchError``.

PNG encoding is deterministic: fixed zlib level, no text chunks, no timestamps, so the same
array always gives the same bytes (the output dataset's checksums depend on it).
"""
from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Fixed so bytes never depend on a library default; 6 is zlib's speed/size sweet spot.
PNG_COMPRESS_LEVEL = 6

Kind = Literal["rgb", "label", "any"]

_RGB_CONVERTIBLE = {"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV"}
_SINGLE_CHANNEL = {"L": np.uint8, "P": np.uint8, "1": np.uint8, "I;16": np.uint16, "I;16L": np.uint16,
                   "I;16B": np.uint16, "I": np.int32}


class CorruptImageError(ValueError):
    """Bytes or a file that cannot be decoded as an image."""


class ImageModeError(CorruptImageError):
    """An image that decodes but has the wrong kind of pixels (e.g. RGB where a label map is due)."""


class SizeMismatchError(ValueError):
    """Two arrays that must be pixel-aligned (image and label, label and instance) differ in size."""


def _require_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(errno.ENOENT, "image file not found", str(p))
    return p


def _load(source, where: str) -> Image.Image:
    """Open and fully decode, turning every decoder failure into CorruptImageError(where)."""
    try:
        im = Image.open(source)
        im.load()
        return im
    except (FileNotFoundError, PermissionError):
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from e


def _to_rgb(im: Image.Image, where: str) -> np.ndarray:
    if im.mode not in _RGB_CONVERTIBLE:
        raise ImageModeError(f"{where}: expected a colour image, got PIL mode {im.mode!r}")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8).copy()


def _to_single_channel(im: Image.Image, where: str) -> np.ndarray:
    dtype = _SINGLE_CHANNEL.get(im.mode)
    if dtype is None:
        raise ImageModeError(
            f"{where}: expected a single-channel label PNG (mode L, P, I;16 or I), got PIL mode {im.mode!r}"
        )
    # P keeps its palette indices: those are the stored values, not colours.
    return np.asarray(im).astype(dtype, copy=True)


def _convert(im: Image.Image, where: str, kind: Kind) -> np.ndarray:
    if kind == "rgb":
        return _to_rgb(im, where)
    if kind == "label":
        return _to_single_channel(im, where)
    if kind == "any":
        return _to_single_channel(im, where) if im.mode in _SINGLE_CHANNEL else _to_rgb(im, where)
    raise ValueError(f"unknown image kind {kind!r} (expected 'rgb', 'label' or 'any')")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """A photo on disk (PNG, JPEG, ...) -> HxWx3 uint8 RGB."""
    p = _require_file(path)
    return _to_rgb(_load(p, str(p)), str(p))


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """A single-channel label or instance PNG -> HxW (uint8 for L/P, uint16 for 16-bit, int32 for I)."""
    p = _require_file(path)
    return _to_single_channel(_load(p, str(p)), str(p))


def decode_image_bytes(data: bytes, where: str = "<image bytes>", kind: Kind = "any") -> np.ndarray:
    """Encoded bytes of any format Pillow reads -> array; ``kind`` picks RGB, single channel or either."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise CorruptImageError(f"{where}: no image bytes")
    return _convert(_load(io.BytesIO(bytes(data)), where), where, kind)


def decode_png(data: bytes, where: str = "<png bytes>", kind: Kind = "any") -> np.ndarray:
    """PNG bytes -> array (single-channel modes stay HxW with their dtype, colour -> HxWx3 uint8)."""
    if not bytes(data[:8]) == PNG_SIGNATURE:
        raise CorruptImageError(f"{where}: not a PNG (bad signature {bytes(data[:8])!r})")
    return decode_image_bytes(data, where, kind)


def image_size(data: bytes, where: str = "<image bytes>") -> tuple[int, int]:
    """(height, width) from the header only, without decoding the pixels."""
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            w, h = im.size
    except (OSError, SyntaxError, ValueError) as e:
        raise CorruptImageError(f"{where}: cannot read image header ({type(e).__name__}: {e})") from e
    return h, w


def _png_ready(arr: np.ndarray, where: str) -> Image.Image:
    a = np.asarray(arr)
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 3 and a.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(a))
    if a.ndim == 2 and a.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(a))
    if a.ndim == 2 and np.issubdtype(a.dtype, np.integer):
        # Instance maps (id*1000+k) are int32 in memory and 16-bit on disk, as Cityscapes stores them.
        if a.size and (int(a.min()) < 0 or int(a.max()) > 0xFFFF):
            raise ValueError(f"{where}: values {int(a.min())}..{int(a.max())} do not fit a 16-bit PNG")
        return Image.fromarray(np.ascontiguousarray(a.astype(np.uint16)))  # mode I;16
    raise ValueError(f"{where}: cannot encode array of shape {a.shape} and dtype {a.dtype} as PNG "
                     "(expected HxWx3 uint8, HxW uint8 or HxW 16-bit integers)")


def encode_png(arr: np.ndarray, where: str = "<array>") -> bytes:
    """Array -> PNG bytes, byte-identical for identical arrays (fixed level, no metadata chunks)."""
    buf = io.BytesIO()
    _png_ready(arr, where).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def check_same_size(a: np.ndarray, b: np.ndarray, where: str, what: str = "image and label") -> None:
    """Raise SizeMismatchError naming ``where`` if two maps are not pixel-aligned."""
    ha, wa = np.shape(a)[:2]
    hb, wb = np.shape(b)[:2]
    if (ha, wa) != (hb, wb):
        raise SizeMismatchError(f"{where}: {what} differ in size ({ha}x{wa} vs {hb}x{wb})")


def write_bytes_atomic(path: str | os.PathLike, data: bytes, fsync: bool = True) -> Path:
    """Write to a hidden temp name in the same folder, then rename: readers never see half a file.

    ``fsync=False`` keeps the rename atomicity but skips the disk flush (many small export files).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, p)
    return p
