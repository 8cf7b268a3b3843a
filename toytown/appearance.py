"""Toy-town appearance: everything about colour, drawn independently of the geometry.

An ``Appearance`` is a palette per class, a colour per instance slot (vehicles, people), texture
parameters and the light of a domain (day, dusk, night, fog). Any appearance renders on any
layout (render.py), which is what gives exemplar-to-target synthesis a known ground truth.
Colours are floats in [0, 1] before the domain light is applied.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from . import classes as C

from amgen_core.domains import DOMAINS
DOMAIN_P: tuple[float, ...] = (0.4, 0.2, 0.2, 0.2)   # when no domain is asked for
N_SLOTS = 8                                           # instance k uses slot k % N_SLOTS

# Per-class colour ranges in HSV: (hue lo, hue hi), (sat lo, hi), (val lo, hi). Hue ranges wrap.
_HSV_RANGES: dict[int, tuple[tuple[float, float], ...]] = {
    C.ROAD: ((0.0, 1.0), (0.0, 0.12), (0.26, 0.48)),
    C.SIDEWALK: ((0.0, 1.0), (0.05, 0.3), (0.56, 0.8)),
    C.BUILDING: ((0.0, 1.0), (0.15, 0.6), (0.35, 0.85)),
    C.WALL: ((0.03, 0.14), (0.15, 0.45), (0.45, 0.75)),
    C.FENCE: ((0.05, 0.12), (0.35, 0.65), (0.28, 0.52)),
    C.POLE: ((0.0, 1.0), (0.0, 0.15), (0.2, 0.42)),
    C.TRAFFIC_LIGHT: ((0.0, 1.0), (0.0, 0.2), (0.06, 0.18)),
    C.VEGETATION: ((0.22, 0.42), (0.45, 0.85), (0.25, 0.55)),
    C.TERRAIN: ((0.1, 0.2), (0.3, 0.6), (0.5, 0.72)),
}
_SIGN_HUES = (0.0, 0.6, 0.14)            # red, blue, yellow signs
# Zenith and horizon sky colours per domain, HSV ranges as above.
_SKY_RANGES: dict[str, tuple[tuple, tuple]] = {
    "day": (((0.55, 0.62), (0.45, 0.75), (0.72, 0.92)), ((0.55, 0.62), (0.1, 0.3), (0.88, 1.0))),
    "dusk": (((0.66, 0.8), (0.4, 0.7), (0.35, 0.55)), ((0.02, 0.1), (0.6, 0.9), (0.85, 1.0))),
    "night": (((0.6, 0.7), (0.5, 0.8), (0.02, 0.06)), ((0.6, 0.7), (0.3, 0.6), (0.08, 0.16))),
    "fog": (((0.55, 0.62), (0.0, 0.06), (0.7, 0.84)), ((0.55, 0.62), (0.0, 0.04), (0.8, 0.9))),
}
# Grain (per-pixel noise) amplitude by class; others use the default.
_GRAIN = {C.ROAD: 0.035, C.VEGETATION: 0.06, C.TERRAIN: 0.05, C.BUILDING: 0.03, C.SKY: 0.008}
_GRAIN_DEFAULT = 0.025


@dataclass
class Appearance:
    domain: str
    palette: np.ndarray        # (256, 3) float32 class colours by label id
    sky: np.ndarray            # (2, 3) zenith, horizon
    vehicle_slots: np.ndarray  # (N_SLOTS, 3) paint of vehicle instance k -> slot k % N_SLOTS
    person_slots: np.ndarray   # (N_SLOTS, 3) clothes of person instance k
    skin: np.ndarray           # (3,)
    glass: np.ndarray          # (3,) vehicle and building windows
    marking: np.ndarray        # (3,) road paint
    window_grid: np.ndarray    # (4,) period y, period x (fractions of image height), fill y, fill x
    grain: np.ndarray          # (256,) per-class per-pixel noise amplitude
    blotch: float              # low-frequency colour noise amplitude
    gain: float                # overall brightness of the light
    tint: np.ndarray           # (3,) colour of the light
    fog_density: float         # 0 = clear
    fog_colour: np.ndarray     # (3,)
    lamp_strength: float       # glow of street lamps and tail lights (night, dusk)
    lit_windows: float         # fraction of building windows lit from inside

    def slot_table(self) -> np.ndarray:
        """(256, N_SLOTS, 3): the colour of thing class c, slot j (other rows repeat the palette)."""
        table = np.repeat(self.palette[:, None, :], N_SLOTS, axis=1)
        for cls in C.VEHICLES:
            table[cls] = self.vehicle_slots
        table[C.PERSON] = self.person_slots
        return table

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; float32 values survive the round trip exactly."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "palette":    # only the classes toy-town draws are non-zero
                v = {str(i): v[i].tolist() for i in C.TOYTOWN_IDS}
            elif f.name == "grain":
                v = {str(i): float(v[i]) for i in C.TOYTOWN_IDS}
            elif isinstance(v, np.ndarray):
                v = v.tolist()
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Appearance":
        kw: dict[str, Any] = {}
        for f in fields(cls):
            v = d[f.name]
            if f.name == "palette":
                arr = np.zeros((256, 3), np.float32)
                for k, rgb in v.items():
                    arr[int(k)] = rgb
                v = arr
            elif f.name == "grain":
                arr = np.full(256, _GRAIN_DEFAULT, np.float32)
                for k, a in v.items():
                    arr[int(k)] = a
                v = arr
            elif isinstance(v, list):
                v = np.asarray(v, np.float32)
            kw[f.name] = v
        return cls(**kw)


def _hsv(rng: np.random.Generator, h: tuple, s: tuple, v: tuple) -> np.ndarray:
    hue = rng.uniform(h[0], h[1]) % 1.0
    return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(*s), rng.uniform(*v)), np.float32)


def _vehicle_paint(rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.3:                          # white, silver, grey, black
        return _hsv(rng, (0.0, 1.0), (0.0, 0.08), (0.1, 0.95))
    return _hsv(rng, (0.0, 1.0), (0.5, 0.95), (0.35, 0.95))


def _light(rng: np.random.Generator, domain: str) -> dict[str, Any]:
    grey = rng.uniform(0.7, 0.85)
    fog_colour = np.array([grey, grey + 0.01, grey + 0.03], np.float32)
    if domain == "day":
        tint = 1.0 + rng.uniform(-0.04, 0.04, 3)
        return dict(gain=rng.uniform(0.95, 1.1), tint=tint, fog_density=0.0, lamp_strength=0.0, lit_windows=0.0,
                    fog_colour=fog_colour)
    if domain == "dusk":
        tint = np.array([rng.uniform(1.1, 1.2), rng.uniform(0.82, 0.9), rng.uniform(0.6, 0.72)])
        return dict(gain=rng.uniform(0.65, 0.8), tint=tint, fog_density=0.0, lamp_strength=0.3,
                    lit_windows=rng.uniform(0.05, 0.2), fog_colour=fog_colour)
    if domain == "night":
        tint = np.array([0.8, 0.9, 1.15]) + rng.uniform(-0.05, 0.05, 3)
        return dict(gain=rng.uniform(0.2, 0.32), tint=tint, fog_density=0.0, lamp_strength=rng.uniform(0.7, 1.0),
                    lit_windows=rng.uniform(0.2, 0.45), fog_colour=fog_colour)
    tint = 1.0 + rng.uniform(-0.03, 0.03, 3)
    return dict(gain=rng.uniform(0.9, 1.0), tint=tint, fog_density=rng.uniform(0.25, 0.55), lamp_strength=0.1,
                lit_windows=0.0, fog_colour=fog_colour)


def sample_appearance(rng: np.random.Generator, domain: str | None = None,
                      domain_p: tuple[float, ...] | None = None) -> Appearance:
    """Draw one appearance. ``domain=None`` draws the domain too, with weights ``domain_p``
    (one per DOMAINS entry, summing to 1; default DOMAIN_P)."""
    if domain is None:
        domain = DOMAINS[int(rng.choice(len(DOMAINS), p=DOMAIN_P if domain_p is None else domain_p))]
    if domain not in DOMAINS:
        raise ValueError(f"unknown toy-town domain {domain!r}; expected one of {', '.join(DOMAINS)}")
    palette = np.zeros((256, 3), np.float32)
    for cls, (h, s, v) in _HSV_RANGES.items():
        palette[cls] = _hsv(rng, h, s, v)
    sign_hue = _SIGN_HUES[int(rng.integers(0, len(_SIGN_HUES)))]
    palette[C.TRAFFIC_SIGN] = _hsv(rng, (sign_hue - 0.02, sign_hue + 0.02), (0.7, 1.0), (0.7, 0.95))
    zenith, horizon = (_hsv(rng, *r) for r in _SKY_RANGES[domain])
    sky = np.stack([zenith, horizon])
    palette[C.SKY] = sky.mean(0)
    vehicle_slots = np.stack([_vehicle_paint(rng) for _ in range(N_SLOTS)])
    person_slots = np.stack([_hsv(rng, (0.0, 1.0), (0.35, 0.9), (0.25, 0.85)) for _ in range(N_SLOTS)])
    for cls in C.THINGS:                  # palette entry of a thing class: its mean slot colour
        palette[cls] = (person_slots if cls == C.PERSON else vehicle_slots).mean(0)
    grain = np.full(256, _GRAIN_DEFAULT, np.float32)
    for cls, amp in _GRAIN.items():
        grain[cls] = amp
    grain *= np.float32(rng.uniform(0.7, 1.3))
    light = _light(rng, domain)
    return Appearance(
        domain=domain,
        palette=palette,
        sky=sky.astype(np.float32),
        vehicle_slots=vehicle_slots,
        person_slots=person_slots,
        skin=_hsv(rng, (0.04, 0.1), (0.25, 0.6), (0.45, 0.9)),
        glass=_hsv(rng, (0.5, 0.65), (0.1, 0.4), (0.08, 0.28)),
        marking=_hsv(rng, (0.12, 0.15), (0.0, 0.8) if rng.random() < 0.3 else (0.0, 0.05), (0.85, 1.0)),
        window_grid=np.array([rng.uniform(0.07, 0.12), rng.uniform(0.05, 0.09),
                              rng.uniform(0.4, 0.65), rng.uniform(0.4, 0.65)], np.float32),
        grain=grain,
        blotch=float(rng.uniform(0.015, 0.04)),
        gain=float(light["gain"]),
        tint=np.asarray(light["tint"], np.float32),
        fog_density=float(light["fog_density"]),
        fog_colour=light["fog_colour"],
        lamp_strength=float(light["lamp_strength"]),
        lit_windows=float(light["lit_windows"]),
    )
