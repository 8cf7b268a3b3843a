"""Render a toy-town layout with an appearance: vectorized numpy, a few hundred scenes/s.

Order: class colours (sky gradient, per-instance slot colours) -> surface detail (windows,
road paint, vehicle glass/lights/tyres, clothes) -> texture noise -> domain light (gain, tint)
-> emitted light (lit windows, lamps, tail lights) -> fog by depth -> uint8.

The renderer reads ``label``, ``instance`` and the layout's meta (horizon, vanishing point,
object boxes, lamps). Without meta it still renders the class and slot colours and noise.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from . import classes as C
from .appearance import N_SLOTS, Appearance
from .layout import ToyLayout, pixel_grid

_TAIL_LIGHT = np.array([0.85, 0.06, 0.05], np.float32)
_TAIL_EMIT = np.array([1.0, 0.15, 0.1], np.float32)
_LAMP_EMIT = np.array([1.0, 0.85, 0.55], np.float32)
_WINDOW_EMIT = np.array([0.95, 0.8, 0.45], np.float32)
_TYRE = np.array([0.06, 0.06, 0.07], np.float32)
_BLOTCH_CELL = 8        # pixels per cell of the low-frequency noise


def render(layout: ToyLayout, appearance: Appearance, seed: int = 0) -> np.ndarray:
    """HxWx3 uint8 image of ``layout`` in ``appearance``. Same inputs and seed -> same bytes."""
    label = np.asarray(layout.label, np.uint8)
    inst = np.asarray(layout.instance, np.int32)
    if label.shape != inst.shape or label.ndim != 2:
        raise ValueError(f"render: label {label.shape} and instance {inst.shape} must be the same HxW")
    H, W = label.shape
    meta = layout.meta or {}
    A = appearance
    rng = np.random.default_rng(seed)
    ys, xs = pixel_grid(H, W)
    horizon = float(meta.get("horizon", 0.45 * H))

    img = _base_colours(label, inst, A, ys, horizon)
    emit = np.zeros_like(img)
    sources: list[tuple[float, float, float, np.ndarray]] = []      # glows: (y, x, radius, colour)
    _building_windows(img, emit, label, A, rng, H)
    if "vanish_x" in meta:
        _road_paint(img, label, A, ys, xs, meta)
    for obj in meta.get("objects", ()):
        _thing_detail(img, emit, inst, obj, A, sources)
    for y, x, s in meta.get("lamps", ()):
        r = max(1.0, 0.25 * meta.get("unit", H / 2) * s)
        sources.append((y, x, r, _LAMP_EMIT))
        sources.append((y + 2.5 * r, x, 5.0 * r, _LAMP_EMIT * 0.35))   # pool of light below

    img += _noise(rng, label, A, H, W)
    img *= np.float32(A.gain) * A.tint
    if A.lamp_strength > 0:
        img += emit * np.float32(A.lamp_strength)
        if sources:
            img += _glow(sources, ys, xs) * np.float32(A.lamp_strength)
    if A.fog_density > 0:
        depth = _depth(label, inst, ys, xs, meta, horizon)
        keep = np.exp(-np.float32(A.fog_density) * (depth - 1.0))[..., None]
        img = img * keep + A.fog_colour * (1.0 - keep)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _base_colours(label, inst, A: Appearance, ys, horizon: float) -> np.ndarray:
    img = A.palette[label]                                            # (H, W, 3) float32
    t = np.clip(ys / max(horizon, 1.0), 0.0, 1.0)[..., None]          # (H, 1, 1)
    sky = A.sky[0] * (1.0 - t) + A.sky[1] * t
    img = np.where((label == C.SKY)[..., None], sky, img).astype(np.float32)
    things = inst >= C.INSTANCE_BASE
    if things.any():
        ids = inst[things]
        cls = np.minimum(ids // C.INSTANCE_BASE, 255)
        img[things] = A.slot_table()[cls, (ids % C.INSTANCE_BASE) % N_SLOTS]
    return img


def _building_windows(img, emit, label, A: Appearance, rng: np.random.Generator, H: int) -> None:
    """A facade grid of glass; some windows lit at night (which ones: the render seed)."""
    py = max(2.0, float(A.window_grid[0]) * H)
    px = max(2.0, float(A.window_grid[1]) * H)
    ys, xs = pixel_grid(*label.shape)
    cy, cx = np.floor(ys / py).astype(np.int32), np.floor(xs / px).astype(np.int32)
    pane = ((ys - cy * py) < A.window_grid[2] * py) & ((xs - cx * px) < A.window_grid[3] * px)
    win = pane & (label == C.BUILDING)
    img[win] = img[win] * 0.35 + A.glass * 0.65
    if A.lit_windows > 0:
        lit_cells = rng.random((int(cy[-1, 0]) + 1, int(cx[0, -1]) + 1)) < A.lit_windows
        lit = win & lit_cells[cy, cx]
        emit[lit] = _WINDOW_EMIT


def _road_paint(img, label, A: Appearance, ys, xs, meta: dict) -> None:
    """A dashed centre line and solid edge lines, in the ground plane (so in perspective)."""
    unit, horizon, vx = meta["unit"], meta["horizon"], meta["vanish_x"]
    road_l, road_r = meta["road"]
    s = np.maximum((ys - horizon) / unit, 1e-3)
    g = (xs - vx) / (unit * s)
    centre = (np.abs(g - 0.5 * (road_l + road_r)) < 0.06) & (((1.0 / s) * 1.5) % 1.0 < 0.5)
    edges = (np.abs(g - road_l - 0.12) < 0.05) | (np.abs(g - road_r + 0.12) < 0.05)
    paint = (centre | edges) & (label == C.ROAD)
    img[paint] = img[paint] * 0.2 + A.marking * 0.8


def _region(inst, box, fy0: float, fy1: float, fx0: float, fx1: float, iid: int):
    """Slices of a sub-box (fractions of the object box) and the pixels of ``iid`` in it."""
    y0, x0, y1, x1 = box
    h, w = y1 - y0, x1 - x0
    ya, yb = max(y0 + round(fy0 * h), 0), min(y0 + round(fy1 * h), inst.shape[0])
    xa, xb = max(x0 + round(fx0 * w), 0), min(x0 + round(fx1 * w), inst.shape[1])
    if yb <= ya or xb <= xa:
        return None
    sl = (slice(ya, yb), slice(xa, xb))
    return sl, inst[sl] == iid


def _paint(img, inst, box, frac, iid, colour, mix: float = 1.0) -> bool:
    reg = _region(inst, box, *frac, iid)
    if reg is None:
        return False
    sl, m = reg
    sub = img[sl]
    sub[m] = sub[m] * (1.0 - mix) + colour * mix
    return bool(m.any())


def _thing_detail(img, emit, inst, obj: dict, A: Appearance, sources: list) -> None:
    cls, iid, box = obj["cls"], obj["id"], obj["box"]
    h, w = box[2] - box[0], box[3] - box[1]
    if h < 4 or w < 3:
        return
    if cls == C.PERSON:
        trousers = A.person_slots[(iid % C.INSTANCE_BASE) % N_SLOTS] * 0.3 + 0.04
        _paint(img, inst, box, (0.55, 1.0, 0.0, 1.0), iid, trousers)
        _paint(img, inst, box, (0.0, 0.18, 0.0, 1.0), iid, A.skin)                               # head
        return
    glass = {C.CAR: (0.08, 0.4, 0.2, 0.8), C.BUS: (0.08, 0.35, 0.1, 0.9)}.get(cls)
    if glass:
        _paint(img, inst, box, glass, iid, A.glass, 0.9)
    if cls == C.TRUCK:
        _paint(img, inst, box, (0.8, 1.0, 0.0, 1.0), iid, _TYRE, 0.7)                            # chassis
    else:
        for fx in ((0.05, 0.22), (0.78, 0.95)):
            _paint(img, inst, box, (0.9, 1.0, *fx), iid, _TYRE)                                  # tyres
    light_y = {C.CAR: (0.55, 0.68), C.TRUCK: (0.68, 0.78), C.BUS: (0.8, 0.88)}[cls]
    for fx in ((0.0, 0.15), (0.85, 1.0)):
        if _paint(img, inst, box, (*light_y, *fx), iid, _TAIL_LIGHT):
            reg = _region(inst, box, *light_y, *fx, iid)
            emit[reg[0]][reg[1]] = _TAIL_EMIT
            cy = box[0] + 0.5 * (light_y[0] + light_y[1]) * h
            cx = box[1] + 0.5 * (fx[0] + fx[1]) * w
            sources.append((cy, cx, max(1.0, 0.08 * w), _TAIL_EMIT * 0.6))


def _noise(rng: np.random.Generator, label, A: Appearance, H: int, W: int) -> np.ndarray:
    grain = rng.standard_normal((H, W, 1), dtype=np.float32) * A.grain[label][..., None]
    ry, rx = _upsampler(H), _upsampler(W)
    cells = rng.standard_normal((ry.shape[1], rx.shape[1], 3), dtype=np.float32) * np.float32(A.blotch)
    blotch = np.einsum("hi,ijc,wj->hwc", ry, cells, rx, optimize=True)   # smooth (bilinear) colour drift
    return grain + blotch


@functools.lru_cache(maxsize=16)
def _upsampler(n: int) -> np.ndarray:
    """(n, cells) linear-interpolation weights from a coarse grid of _BLOTCH_CELL-pixel cells."""
    cells = math.ceil(n / _BLOTCH_CELL) + 1
    pos = (np.arange(n) + 0.5) / _BLOTCH_CELL
    lo = np.floor(pos).astype(int)
    frac = (pos - lo).astype(np.float32)
    m = np.zeros((n, cells), np.float32)
    m[np.arange(n), lo] = 1.0 - frac
    m[np.arange(n), np.minimum(lo + 1, cells - 1)] += frac
    m.flags.writeable = False
    return m


def _glow(sources: list, ys, xs) -> np.ndarray:
    cy = np.array([s[0] for s in sources], np.float32)[:, None, None]
    cx = np.array([s[1] for s in sources], np.float32)[:, None, None]
    r = np.array([s[2] for s in sources], np.float32)[:, None, None]
    col = np.stack([s[3] for s in sources]).astype(np.float32)         # (n, 3)
    w = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2.0 * r * r))      # (n, H, W)
    return np.einsum("nhw,nc->hwc", w, col, optimize=False).astype(np.float32) * np.float32(0.6)


def _depth(label, inst, ys, xs, meta: dict, horizon: float) -> np.ndarray:
    """Distance in units of the bottom-row depth (1 = nearest ground, larger = farther)."""
    H, W = label.shape
    unit = float(meta.get("unit", H - horizon))
    s_ground = (ys - horizon) / max(unit, 1.0)
    vx = float(meta.get("vanish_x", W / 2))
    s_column = np.abs(xs - vx) / (0.5 * W)              # facades: nearer towards the image sides
    s = np.where(s_ground > 0, s_ground, s_column)
    depth = 1.0 / np.maximum(s, 0.04)
    depth = np.broadcast_to(depth, (H, W)).copy()
    depth[label == C.SKY] = 40.0
    for obj in meta.get("objects", ()):
        reg = _region(inst, obj["box"], 0.0, 1.0, 0.0, 1.0, obj["id"])
        if reg is not None:
            depth[reg[0]][reg[1]] = 1.0 / obj["s"]
    return np.maximum(depth, 1.0).astype(np.float32)
