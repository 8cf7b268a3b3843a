"""Layout embedding: a small, cheap, L2-normalised vector that describes *where* each class is.

The vector has two parts:

* a **spatial grid**: the label map is cut into 4 x 8 cells (the 1:2 Cityscapes aspect), and
  each cell gets the fraction of its pixels that belong to each of 20 channels (the 19 trainIds
  plus one "void" channel for ids that have no trainId). This is area pooling: every pixel
  counts once, in the cell that contains its centre.
* a **global histogram**: the fraction of the whole map in each of the 20 channels.

Both parts store the *square root* of the fractions. A vector of sqrt-probabilities has unit
L2 norm, so the inner product of two cells is their Bhattacharyya coefficient (1 = same class
mix, 0 = disjoint). The sqrt also lifts small classes (a pole at 2 % of a cell counts 0.14,
not 0.02), which matters because those are the ones matching must get right. The grid is
weighted by sqrt(0.75) and the histogram by sqrt(0.25), so the whole vector has unit norm and
the inner product of two embeddings is

    0.75 * mean over cells of BC(cell_a, cell_b) + 0.25 * BC(hist_a, hist_b)   (in [0, 1]).

Dimension: 4 * 8 * 20 + 20 = 660 float32 (2.6 kB per layout; 100k layouts = 264 MB).
A 4x8 grid is the coarsest grid that still separates horizon height, road width and left/right
structure; finer grids cost dimension quadratically and make the vector sensitive to small
shifts that the exact IoU rerank (stages/retrieve.py) judges better anyway.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from amgen_core.labels import ID_TO_TRAIN_ID, IGNORE_TRAIN_ID, NUM_IDS, NUM_TRAIN_IDS, LabelError

GRID = (4, 8)
NUM_CHANNELS = NUM_TRAIN_IDS + 1          # 19 trainIds + void
VOID_CHANNEL = NUM_TRAIN_IDS
GRID_SHARE = 0.75                         # share of the squared norm given to the grid
EMBED_DIM = GRID[0] * GRID[1] * NUM_CHANNELS + NUM_CHANNELS   # 660
EMBED_VERSION = f"amgen-layout-v1:grid{GRID[0]}x{GRID[1]}:c{NUM_CHANNELS}:sqrt:g{GRID_SHARE}"

# id -> channel (0..18 trainIds, 19 void); any byte indexes safely.
_CHANNEL_OF_ID = ID_TO_TRAIN_ID.copy()
_CHANNEL_OF_ID[_CHANNEL_OF_ID == IGNORE_TRAIN_ID] = VOID_CHANNEL

_CHUNK_PIXELS = 1 << 24                   # bounds the temporary key array (~128 MB of int64)


def _cell_map(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell index of every pixel (by pixel centre) and the pixel count of each cell."""
    gh, gw = GRID
    if height < gh or width < gw:
        raise LabelError(f"label map {height}x{width} is smaller than the {gh}x{gw} embedding grid")
    rows = (np.arange(height) * gh) // height
    cols = (np.arange(width) * gw) // width
    cells = (rows[:, None] * gw + cols[None, :]).astype(np.int64)
    return cells, np.bincount(cells.ravel(), minlength=gh * gw).astype(np.float64)


def _embed_same_shape(labels: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 ids -> (N, EMBED_DIM) float32."""
    n, height, width = labels.shape
    cells, cell_sizes = _cell_map(height, width)
    n_cells = GRID[0] * GRID[1]
    per_layout = n_cells * NUM_CHANNELS
    cell_keys = cells * NUM_CHANNELS
    out = np.empty((n, EMBED_DIM), np.float32)
    step = max(1, _CHUNK_PIXELS // (height * width))
    g_w, h_w = np.sqrt(GRID_SHARE / n_cells), np.sqrt(1.0 - GRID_SHARE)
    for start in range(0, n, step):
        chunk = labels[start:start + step]
        m = len(chunk)
        keys = _CHANNEL_OF_ID[chunk].astype(np.int64)
        keys += cell_keys[None]
        keys += (np.arange(m, dtype=np.int64) * per_layout)[:, None, None]
        counts = np.bincount(keys.ravel(), minlength=m * per_layout).reshape(m, n_cells, NUM_CHANNELS)
        grid = np.sqrt(counts / cell_sizes[None, :, None]) * g_w
        hist = np.sqrt(counts.sum(axis=1) / (height * width)) * h_w
        vec = np.concatenate([grid.reshape(m, -1), hist], axis=1)
        vec /= np.linalg.norm(vec, axis=1, keepdims=True)   # already ~1; removes rounding drift
        out[start:start + m] = vec
    return out


def _check_batch(labels: np.ndarray, where: str) -> np.ndarray:
    if labels.ndim != 3:
        raise LabelError(f"{where}: expected label maps of shape (H, W), got {labels.shape[1:]}")
    if labels.dtype != np.uint8:
        if labels.size and (labels.min() < 0 or labels.max() > 255):
            raise LabelError(f"{where}: label ids outside 0..255")
        labels = labels.astype(np.uint8)
    if labels.size and int(labels.max()) >= NUM_IDS:
        raise LabelError(f"{where}: unknown Cityscapes label id {int(labels.max())} (valid: 0..{NUM_IDS - 1})")
    return labels


def embed_layouts(labels: np.ndarray | Iterable[np.ndarray], where: str = "label maps") -> np.ndarray:
    """Embed many label maps: an (N, H, W) array or a list of HxW arrays (sizes may differ).

    Returns (N, EMBED_DIM) float32 rows of unit L2 norm, in input order.
    """
    if isinstance(labels, np.ndarray) and labels.dtype != object:
        if labels.ndim == 2:
            raise LabelError(f"{where}: got a single HxW map; use layout_embedding() or pass [label]")
        return _embed_same_shape(_check_batch(labels, where))
    items = [np.asarray(x) for x in labels]
    out = np.empty((len(items), EMBED_DIM), np.float32)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(items):
        by_shape.setdefault(x.shape, []).append(i)
    for shape, idx in by_shape.items():
        if len(shape) != 2:
            raise LabelError(f"{where}[{idx[0]}]: expected a 2-D label map, got shape {shape}")
        out[idx] = _embed_same_shape(_check_batch(np.stack([items[i] for i in idx]), f"{where}[{idx[0]}]"))
    return out


def layout_embedding(label: np.ndarray, where: str = "label map") -> np.ndarray:
    """Embed one HxW label map of Cityscapes ids -> (EMBED_DIM,) float32, unit norm."""
    arr = np.asarray(label)
    if arr.ndim != 2:
        raise LabelError(f"{where}: expected a 2-D label map, got shape {arr.shape}")
    return _embed_same_shape(_check_batch(arr[None], where))[0]


class EmbedStage:
    """Batch stage: adds an ``embedding`` column (N, EMBED_DIM) computed from the ``label`` column.

    Works on the dict-of-arrays batches of Ray Data ``map_batches`` (``batch_format="numpy"``)
    and on plain dicts; a column of equally sized maps may arrive as (N, H, W) or as an object
    array of HxW maps. With ``error_column``, rows whose error is non-empty (quarantined by an
    earlier stage, with a placeholder label) get a zero vector instead. An instance is a plain
    callable, so Ray runs it as a task, not as an actor.
    """

    def __init__(self, label_column: str = "label", output_column: str = "embedding",
                 error_column: str | None = None):
        self.label_column = label_column
        self.output_column = output_column
        self.error_column = error_column

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        if self.label_column not in batch:
            raise KeyError(f"embed stage: batch has no {self.label_column!r} column (has {sorted(batch)})")
        labels = batch[self.label_column]
        where = f"batch[{self.label_column!r}]"
        out = dict(batch)
        if self.error_column is None:
            out[self.output_column] = embed_layouts(labels, where=where)
            return out
        ok = [i for i, err in enumerate(batch[self.error_column]) if not err]
        emb = np.zeros((len(labels), EMBED_DIM), np.float32)
        if ok:
            emb[ok] = embed_layouts([labels[i] for i in ok], where=where)
        out[self.output_column] = emb
        return out
