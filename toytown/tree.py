"""Write toy-town scenes as a Cityscapes-format tree, read back by connectors/cityscapes.py.

    OUT/leftImg8bit/{split}/{city}/{city}_{seq:06d}_{frame:06d}_leftImg8bit.png
    OUT/gtFine/{split}/{city}/{city}_{seq:06d}_{frame:06d}_gtFine_labelIds.png     (uint8 ids)
    OUT/gtFine/{split}/{city}/..._gtFine_instanceIds.png                           (uint16)
    OUT/gtFine/{split}/{city}/..._gtFine_color.png                                 (RGB palette)
    OUT/gtFine/{split}/{city}/..._toytown.json      (domain, seeds, layout meta, appearance)
    OUT/toytown_{split}.json                        (what was generated, with which settings)

Scene i uses streams derived from (seed, i) only, so it is the same whatever n is, and it is
stored as sequence i // 1000, frame i % 1000. The city is ``{city_prefix}-{domain}`` (no
underscores: Cityscapes splits names on them), so the domain is also visible in the path.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from amgen_core.labels import colorize

from .appearance import DOMAINS, sample_appearance
from .layout import sample_layout
from .files import write_json, write_png
from .render import render
from .seeds import STREAM_TREE, as_int, scene_streams

GENERATOR_VERSION = 1
SIDECAR_SUFFIX = "_toytown.json"


@dataclass
class TreeSummary:
    root: Path
    split: str
    written: int
    seconds: float
    domains: dict[str, int] = field(default_factory=dict)

    @property
    def scenes_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else float("inf")


def city_name(domain: str, city_prefix: str = "toytown") -> str:
    if "_" in city_prefix or "/" in city_prefix or not city_prefix:
        raise ValueError(f"city_prefix {city_prefix!r} must be non-empty, without '_' or '/'")
    return f"{city_prefix}-{domain}"


def scene_stem(city: str, index: int) -> str:
    return f"{city}_{index // 1000:06d}_{index % 1000:06d}"


def make_scene(seed: int, index: int, domain: str | None = None, height: int = 64, width: int = 128):
    """Scene ``index`` of a tree with ``seed``: (layout, appearance, render seed, image)."""
    layout_ss, look_ss, render_ss = scene_streams(STREAM_TREE, seed, index, 3)
    layout = sample_layout(np.random.default_rng(layout_ss), height, width)
    look = sample_appearance(np.random.default_rng(look_ss), domain)
    render_seed = as_int(render_ss)
    return layout, look, render_seed, render(layout, look, render_seed)


def make_tree(out_dir: str | os.PathLike, n: int, seed: int = 0, domain: str | None = None, split: str = "train",
              city_prefix: str = "toytown", height: int = 64, width: int = 128, start: int = 0,
              progress: Callable[[int], None] | None = None) -> TreeSummary:
    """Write scenes ``start .. start+n-1``. Same arguments -> identical bytes."""
    if domain is not None and domain not in DOMAINS:
        raise ValueError(f"unknown toy-town domain {domain!r}; expected one of {', '.join(DOMAINS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    root = Path(out_dir)
    t0 = time.perf_counter()
    domains: dict[str, int] = {}
    made_dirs: set[str] = set()
    for index in range(start, start + n):
        layout, look, render_seed, image = make_scene(seed, index, domain, height, width)
        city = city_name(look.domain, city_prefix)
        img_dir = root / "leftImg8bit" / split / city
        gt_dir = root / "gtFine" / split / city
        if city not in made_dirs:
            img_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            made_dirs.add(city)
        stem = scene_stem(city, index)
        write_png(img_dir / f"{stem}_leftImg8bit.png", image)
        write_png(gt_dir / f"{stem}_gtFine_labelIds.png", layout.label)
        write_png(gt_dir / f"{stem}_gtFine_instanceIds.png", layout.instance)
        write_png(gt_dir / f"{stem}_gtFine_color.png", colorize(layout.label))
        sidecar = {"generator": "toytown", "version": GENERATOR_VERSION, "seed": seed, "index": index,
                   "domain": look.domain, "render_seed": render_seed, "layout_meta": layout.meta,
                   "appearance": look.to_dict()}
        write_json(gt_dir / f"{stem}{SIDECAR_SUFFIX}", sidecar)
        domains[look.domain] = domains.get(look.domain, 0) + 1
        if progress is not None:
            progress(1)
    seconds = time.perf_counter() - t0
    write_json(root / f"toytown_{split}.json", {
        "generator": "toytown", "version": GENERATOR_VERSION, "split": split, "seed": seed, "start": start, "n": n,
        "domain": domain, "city_prefix": city_prefix, "height": height, "width": width,
        "domains": dict(sorted(domains.items())),
    })
    return TreeSummary(root, split, n, seconds, dict(sorted(domains.items())))
