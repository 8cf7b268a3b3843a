"""Toy-town geometry: a street seen from a car, in Cityscapes label ids with instances.

The camera looks down a straight street. Everything is placed in a small world measured in
camera heights, and projected with one vanishing point: a ground point at image row ``y``
has depth parameter ``s = (y - horizon) / unit`` (``s = 1`` at the bottom row, smaller is
farther) and lateral world position ``g = (x - vanish_x) / (unit * s)``. Facades, walls and
fences are vertical planes at a fixed ``g``; objects stand on the ground at some ``s`` and
are ``unit * s`` pixels per world unit tall and wide.

Only geometry lives here. Colours, texture and light are the appearance (appearance.py).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import classes as C


@dataclass
class ToyLayout:
    label: np.ndarray                 # HxW uint8 Cityscapes ids
    instance: np.ndarray              # HxW int32, id*1000+k for things, plain id for stuff
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able geometry the renderer reads

    @property
    def shape(self) -> tuple[int, int]:
        return self.label.shape


# Object sizes in camera heights (width, height).
_SIZES = {C.CAR: (1.25, 0.95), C.TRUCK: (1.65, 2.2), C.BUS: (1.75, 2.3), C.PERSON: (0.38, 1.15)}
_VEHICLE_P = (0.76, 0.12, 0.12)     # car, truck, bus
_BLOCK_KINDS = ("building", "green", "gap")
_BLOCK_P = (0.72, 0.14, 0.14)
_MIN_SIZE = 8


@functools.lru_cache(maxsize=16)
def pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates as broadcastable (H,1) and (1,W) float32 arrays."""
    ys = (np.arange(height, dtype=np.float32) + 0.5)[:, None]
    xs = (np.arange(width, dtype=np.float32) + 0.5)[None, :]
    ys.flags.writeable = False
    xs.flags.writeable = False
    return ys, xs


def _span(center: float, size: float) -> tuple[int, int]:
    """Integer pixel span of [center - size/2, center + size/2), at least one pixel wide."""
    lo = math.floor(center - size / 2 + 0.5)
    return lo, max(lo + 1, math.floor(center + size / 2 + 0.5))


class _Canvas:
    """Label and instance maps with clipped rectangle/ellipse painting."""

    def __init__(self, height: int, width: int):
        self.h, self.w = height, width
        self.label = np.empty((height, width), np.uint8)
        self.instance = np.empty((height, width), np.int32)

    def rect(self, y0: int, y1: int, x0: int, x1: int, cls: int, iid: int) -> None:
        y0, x0 = max(y0, 0), max(x0, 0)
        y1, x1 = min(y1, self.h), min(x1, self.w)
        if y1 > y0 and x1 > x0:
            self.label[y0:y1, x0:x1] = cls
            self.instance[y0:y1, x0:x1] = iid

    def box(self, cx: float, bottom: float, w: float, h: float, cls: int, iid: int) -> list[int]:
        """A w x h rectangle standing on row ``bottom``; returns its unclipped [y0, x0, y1, x1]."""
        x0, x1 = _span(cx, w)
        y1 = math.floor(bottom + 0.5)
        y0 = min(y1 - 1, math.floor(bottom - h + 0.5))
        self.rect(y0, y1, x0, x1, cls, iid)
        return [y0, x0, y1, x1]

    def ellipse(self, cy: float, cx: float, ry: float, rx: float, cls: int) -> None:
        y0, y1 = max(math.floor(cy - ry), 0), min(math.ceil(cy + ry) + 1, self.h)
        x0, x1 = max(math.floor(cx - rx), 0), min(math.ceil(cx + rx) + 1, self.w)
        if y1 <= y0 or x1 <= x0:
            return
        yy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy) / max(ry, 0.5)
        xx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx) / max(rx, 0.5)
        inside = yy[:, None] ** 2 + xx[None, :] ** 2 <= 1.0
        self.label[y0:y1, x0:x1][inside] = cls
        self.instance[y0:y1, x0:x1][inside] = cls


def sample_layout(rng: np.random.Generator, height: int = 64, width: int = 128) -> ToyLayout:
    """Draw one street scene. Same generator state -> identical arrays."""
    H, W = int(height), int(width)
    if H < _MIN_SIZE or W < _MIN_SIZE:
        raise ValueError(f"toy-town scenes need height and width >= {_MIN_SIZE}, got {H}x{W}")
    horizon = H * rng.uniform(0.36, 0.5)
    unit = H - horizon                      # pixels per camera height at the bottom row
    vx = W * rng.uniform(0.35, 0.65)
    street = _sample_street(rng)

    canvas = _Canvas(H, W)
    _paint_ground_and_sky(canvas, horizon, unit, vx, street)
    for i in (0, 1):                          # left, right
        _paint_blocks(canvas, rng, horizon, unit, vx, street["face"][i])
        if rng.random() < 0.3:
            _paint_barrier(canvas, rng, horizon, unit, vx, street["side"][i])

    objects = _sample_objects(rng, street)
    objects.sort(key=lambda o: o["s"])    # far to near: nearer objects occlude farther ones
    placed, lamps = _paint_objects(canvas, objects, horizon, unit, vx)

    meta = {
        "height": H, "width": W, "horizon": horizon, "vanish_x": vx, "unit": unit,
        "road": [street["road"][0], street["road"][1]],
        "objects": placed, "lamps": lamps,
    }
    return ToyLayout(canvas.label, canvas.instance, meta)


def _sample_street(rng: np.random.Generator) -> dict[str, Any]:
    """Lateral cross-section of the street (world units, camera at 0), left and right."""
    road = (-rng.uniform(1.0, 2.6), rng.uniform(1.0, 2.6))
    side = (road[0] - rng.uniform(0.6, 1.6), road[1] + rng.uniform(0.6, 1.6))
    face = (side[0] - rng.uniform(0.0, 1.5), side[1] + rng.uniform(0.0, 1.5))
    verge = tuple(C.TERRAIN if rng.random() < 0.6 else C.VEGETATION for _ in range(2))
    lot = tuple(C.TERRAIN if rng.random() < 0.5 else C.VEGETATION for _ in range(2))
    return {"road": road, "side": side, "face": face, "verge": verge, "lot": lot}


def _paint_ground_and_sky(canvas: _Canvas, horizon: float, unit: float, vx: float, st: dict) -> None:
    ys, xs = pixel_grid(canvas.h, canvas.w)
    s = (ys - horizon) / unit
    below = s > 0
    g = (xs - vx) / (unit * np.where(below, s, 1.0))
    edges = np.array([st["face"][0], st["side"][0], st["road"][0], st["road"][1], st["side"][1], st["face"][1]],
                     np.float32)
    bands = np.array([st["lot"][0], st["verge"][0], C.SIDEWALK, C.ROAD, C.SIDEWALK, st["verge"][1], st["lot"][1]],
                     np.uint8)
    ground = bands[np.searchsorted(edges, g, side="right")]
    canvas.label[:] = np.where(below, ground, np.uint8(C.SKY))
    canvas.instance[:] = canvas.label


def _facade_columns(canvas: _Canvas, unit: float, vx: float, plane: float):
    """For a vertical plane at lateral ``plane``: per-column depth s and mask of columns that see it."""
    _, xs = pixel_grid(canvas.h, canvas.w)
    s = (xs[0] - vx) / (plane * unit)
    cols = s > 1e-3
    return np.where(cols, s, 1e-3), cols


def _paint_blocks(canvas: _Canvas, rng: np.random.Generator, horizon: float, unit: float, vx: float,
                  face: float) -> None:
    """A row of buildings (or tall greenery, or gaps) standing on the facade plane of one side."""
    n = 48
    z_edges = 0.6 + np.cumsum(rng.uniform(0.35, 1.6, n))           # block ends along the street
    kinds = rng.choice(3, size=n + 1, p=_BLOCK_P)
    heights = np.where(kinds == 0, rng.uniform(2.5, 9.0, n + 1), rng.uniform(0.8, 2.5, n + 1))
    s, cols = _facade_columns(canvas, unit, vx, face)
    block = np.searchsorted(z_edges, 1.0 / s)
    kind = kinds[block]
    roof = horizon - heights[block] * unit * s
    base = horizon + unit * s
    ys, _ = pixel_grid(canvas.h, canvas.w)
    on_plane = cols & (kind != 2) & (ys >= roof) & (ys < base)
    cls = np.where(kind == 0, np.uint8(C.BUILDING), np.uint8(C.VEGETATION))
    lab = np.broadcast_to(cls, on_plane.shape)
    canvas.label[on_plane] = lab[on_plane]
    canvas.instance[on_plane] = lab[on_plane]


def _paint_barrier(canvas: _Canvas, rng: np.random.Generator, horizon: float, unit: float, vx: float,
                   plane: float) -> None:
    """A wall or fence along the outer sidewalk edge, over a stretch of the street."""
    cls = C.WALL if rng.random() < 0.5 else C.FENCE
    height = rng.uniform(0.35, 0.8)
    z0 = rng.uniform(0.6, 3.0)
    z1 = z0 + rng.uniform(2.0, 20.0)
    s, cols = _facade_columns(canvas, unit, vx, plane)
    z = 1.0 / s
    ys, _ = pixel_grid(canvas.h, canvas.w)
    base = horizon + unit * s
    mask = cols & (z >= z0) & (z < z1) & (ys >= base - height * unit * s) & (ys < base)
    canvas.label[mask] = cls
    canvas.instance[mask] = cls


def _sample_objects(rng: np.random.Generator, st: dict) -> list[dict[str, Any]]:
    """Trees, poles, vehicles and people as (kind, depth s, lateral X, size) records."""
    objs: list[dict[str, Any]] = []
    road_l, road_r = st["road"]
    for i, side in enumerate((-1, 1)):
        kerb, outer = st["road"][i], st["side"][i]
        for _ in range(int(rng.integers(0, 4))):
            x = outer + side * rng.uniform(0.1, 0.5)
            objs.append({"kind": "tree", "s": 1.0 / rng.uniform(0.9, 12.0), "x": x,
                         "scale": rng.uniform(0.8, 1.25)})
        for _ in range(int(rng.integers(0, 3))):
            top = ("sign", "light", "lamp")[int(rng.choice(3, p=(0.4, 0.3, 0.3)))]
            objs.append({"kind": "pole", "s": 1.0 / rng.uniform(0.9, 10.0), "x": kerb + side * 0.25,
                         "height": rng.uniform(3.0, 4.2), "top": top, "side": side})
        if rng.random() < 0.35:                                   # parked cars along the kerb
            for _ in range(int(rng.integers(1, 4))):
                objs.append({"kind": C.CAR, "s": 1.0 / rng.uniform(1.0, 9.0),
                             "x": kerb - side * 0.75, "scale": rng.uniform(0.92, 1.08)})
    n_lanes = max(1, int((road_r - road_l) / 1.6))
    lane_w = (road_r - road_l) / n_lanes
    for _ in range(int(rng.integers(0, 7))):
        cls = C.VEHICLES[int(rng.choice(3, p=_VEHICLE_P))]
        lane = int(rng.integers(0, n_lanes))
        x = road_l + (lane + 0.5) * lane_w + rng.uniform(-0.15, 0.15) * lane_w
        objs.append({"kind": cls, "s": 1.0 / rng.uniform(1.0, 8.0), "x": x, "scale": rng.uniform(0.92, 1.08)})
    for _ in range(int(rng.integers(0, 6))):
        if rng.random() < 0.15:
            x = rng.uniform(road_l, road_r)
        else:
            i = int(rng.integers(0, 2))
            x = rng.uniform(min(st["road"][i], st["side"][i]), max(st["road"][i], st["side"][i]))
        objs.append({"kind": C.PERSON, "s": 1.0 / rng.uniform(0.9, 8.0), "x": x, "scale": rng.uniform(0.85, 1.1)})
    return objs


def _paint_objects(canvas: _Canvas, objects: list[dict], horizon: float, unit: float, vx: float):
    """Paint far to near. Things get id*1000+k with k counted far to near per class."""
    counts = {cls: 0 for cls in C.THINGS}
    placed: list[dict[str, Any]] = []
    lamps: list[list[float]] = []
    for o in objects:
        s = o["s"]
        px = unit * s                               # pixels per world unit at this depth
        cx = vx + o["x"] * px
        bottom = horizon + px
        kind = o["kind"]
        if kind == "tree":
            k = o["scale"]
            canvas.box(cx, bottom, 0.16 * px * k, 1.5 * px * k, C.VEGETATION, C.VEGETATION)
            canvas.ellipse(bottom - 2.4 * px * k, cx, 1.0 * px * k, 0.85 * px * k, C.VEGETATION)
        elif kind == "pole":
            _paint_pole(canvas, o, cx, bottom, px, lamps)
        else:
            w, h = _SIZES[kind]
            w, h = w * px * o["scale"], h * px * o["scale"]
            box = _bounding_box(cx, bottom, w, h)
            if box[2] <= 0 or box[0] >= canvas.h or box[3] <= 0 or box[1] >= canvas.w:
                continue                             # wholly outside the image: not an instance
            iid = kind * C.INSTANCE_BASE + counts[kind]
            counts[kind] += 1
            _paint_thing(canvas, kind, iid, cx, bottom, w, h)
            placed.append({"cls": kind, "id": iid, "box": box, "s": s})
    return placed, lamps


def _paint_pole(canvas: _Canvas, o: dict, cx: float, bottom: float, px: float, lamps: list) -> None:
    h = o["height"] * px
    canvas.box(cx, bottom, max(0.09 * px, 1.0), h, C.POLE, C.POLE)
    top = bottom - h
    if o["top"] == "sign":
        canvas.box(cx, top + 0.55 * px, 0.5 * px, 0.5 * px, C.TRAFFIC_SIGN, C.TRAFFIC_SIGN)
    elif o["top"] == "light":
        canvas.box(cx, top + 0.8 * px, 0.3 * px, 0.8 * px, C.TRAFFIC_LIGHT, C.TRAFFIC_LIGHT)
    else:                                          # street lamp: an arm over the road and a head
        arm_cx = cx - o["side"] * 0.35 * px
        canvas.box(arm_cx, top + max(0.08 * px, 1.0), 0.7 * px, max(0.08 * px, 1.0), C.POLE, C.POLE)
        head_x = cx - o["side"] * 0.7 * px
        canvas.box(head_x, top + 0.18 * px, 0.3 * px, 0.15 * px, C.POLE, C.POLE)
        lamps.append([top + 0.2 * px, head_x, o["s"]])


def _bounding_box(cx: float, bottom: float, w: float, h: float) -> list[int]:
    """[y0, x0, y1, x1] (unclipped) of a w x h object standing on row ``bottom``."""
    x0, x1 = _span(cx, w)
    y1 = math.floor(bottom + 0.5)
    return [min(y1 - 1, math.floor(bottom - h + 0.5)), x0, y1, x1]


def _paint_thing(canvas: _Canvas, cls: int, iid: int, cx: float, bottom: float, w: float, h: float) -> None:
    """Rear-view silhouettes made of a few rectangles."""
    if cls == C.CAR:
        canvas.box(cx, bottom, w, 0.55 * h, cls, iid)                 # body
        canvas.box(cx, bottom - 0.5 * h, 0.76 * w, 0.5 * h, cls, iid)  # cabin
    elif cls == C.TRUCK:
        canvas.box(cx, bottom, 0.86 * w, 0.25 * h, cls, iid)          # chassis
        canvas.box(cx, bottom - 0.2 * h, w, 0.8 * h, cls, iid)         # cargo box
    elif cls == C.BUS:
        canvas.box(cx, bottom, w, h, cls, iid)
    else:                                                             # person: legs, torso, head
        canvas.box(cx, bottom, 0.75 * w, 0.45 * h, cls, iid)
        canvas.box(cx, bottom - 0.42 * h, w, 0.42 * h, cls, iid)
        canvas.box(cx, bottom - 0.82 * h, 0.5 * w, 0.18 * h, cls, iid)
