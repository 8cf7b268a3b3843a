"""Ground-truth triples for evaluation: exemplar, target layout, and the target in the exemplar's look.

Triple j draws one appearance and two independent layouts from streams of (seed, j) that no
tree scene uses. The exemplar is its layout rendered in that appearance; the ground truth is the
target layout rendered in the *same* appearance. ``instance_map`` pairs target vehicles with
exemplar vehicles that wear the same paint: same colour slot (k % N_SLOTS), same class when
possible (else any vehicle class), the largest visible one; only vehicles visible in both.

On disk (``write_triples``/``read_triples``), PNG + JSON so files are byte-deterministic:

    DIR/triples.json                       {"format", "version", "count", "ids", "params"}
    DIR/{id}/exemplar_image.png            RGB
    DIR/{id}/exemplar_label.png            uint8 ids        DIR/{id}/target_label.png
    DIR/{id}/exemplar_instance.png         uint16           DIR/{id}/target_instance.png
    DIR/{id}/target_image.png              RGB, the ground truth
    DIR/{id}/triple.json                   instance_map, domain, seeds, appearance, layout metas
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from amgen_core.image_io import read_image, read_label_png

from . import classes as C
from .appearance import N_SLOTS, Appearance, sample_appearance
from .layout import ToyLayout, sample_layout
from .files import write_json, write_png
from .render import render
from .seeds import STREAM_TRIPLES, as_int, scene_streams

FORMAT = "amgen-toytown-triples"
VERSION = 1
_ARRAYS = ("exemplar_image", "exemplar_label", "exemplar_instance", "target_label", "target_instance",
           "target_image")


@dataclass
class GroundTruthTriple:
    triple_id: str
    exemplar_image: np.ndarray       # HxWx3 uint8
    exemplar_label: np.ndarray       # HxW uint8
    exemplar_instance: np.ndarray    # HxW int32
    target_label: np.ndarray
    target_instance: np.ndarray
    target_image: np.ndarray         # ground truth: target layout in the exemplar's appearance
    instance_map: dict[int, int]     # target instance id -> exemplar instance id (vehicles)
    domain: str
    seeds: dict[str, int]            # render seeds ("exemplar", "target") and (seed, index)
    appearance: Appearance
    exemplar_meta: dict[str, Any] = field(default_factory=dict)
    target_meta: dict[str, Any] = field(default_factory=dict)

    @property
    def exemplar_layout(self) -> ToyLayout:
        return ToyLayout(self.exemplar_label, self.exemplar_instance, self.exemplar_meta)

    @property
    def target_layout(self) -> ToyLayout:
        return ToyLayout(self.target_label, self.target_instance, self.target_meta)


def make_triple(seed: int, index: int, domain: str | None = None, height: int = 64, width: int = 128
                ) -> GroundTruthTriple:
    ex_ss, tg_ss, look_ss, ex_render_ss, tg_render_ss = scene_streams(STREAM_TRIPLES, seed, index, 5)
    exemplar = sample_layout(np.random.default_rng(ex_ss), height, width)
    target = sample_layout(np.random.default_rng(tg_ss), height, width)
    look = sample_appearance(np.random.default_rng(look_ss), domain)
    seeds = {"seed": seed, "index": index, "exemplar": as_int(ex_render_ss), "target": as_int(tg_render_ss)}
    return GroundTruthTriple(
        triple_id=f"{index:06d}",
        exemplar_image=render(exemplar, look, seeds["exemplar"]),
        exemplar_label=exemplar.label, exemplar_instance=exemplar.instance,
        target_label=target.label, target_instance=target.instance,
        target_image=render(target, look, seeds["target"]),
        instance_map=match_vehicles(target.instance, exemplar.instance),
        domain=look.domain, seeds=seeds, appearance=look,
        exemplar_meta=exemplar.meta, target_meta=target.meta,
    )


def make_triples(n: int, seed: int = 0, domain: str | None = None, height: int = 64, width: int = 128,
                 start: int = 0) -> Iterator[GroundTruthTriple]:
    """Triples ``start .. start+n-1`` of ``seed`` (triple j is the same whatever n is)."""
    for index in range(start, start + n):
        yield make_triple(seed, index, domain, height, width)


def visible_vehicles(instance: np.ndarray) -> dict[int, int]:
    """{instance id: visible pixels} of the vehicles in an instance map."""
    ids, counts = np.unique(instance[instance >= C.INSTANCE_BASE], return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, counts) if int(i) // C.INSTANCE_BASE in C.VEHICLES}


def match_vehicles(target_instance: np.ndarray, exemplar_instance: np.ndarray) -> dict[int, int]:
    """Target vehicle -> exemplar vehicle with the same colour slot (same class first, then largest)."""
    exemplar = visible_vehicles(exemplar_instance)
    out: dict[int, int] = {}
    for tid in visible_vehicles(target_instance):
        slot, cls = (tid % C.INSTANCE_BASE) % N_SLOTS, tid // C.INSTANCE_BASE
        same_slot = [e for e in exemplar if (e % C.INSTANCE_BASE) % N_SLOTS == slot]
        if same_slot:
            out[tid] = max(same_slot, key=lambda e: (e // C.INSTANCE_BASE == cls, exemplar[e], -e))
    return out


def write_triples(out_dir: str | os.PathLike, triples: Iterable[GroundTruthTriple],
                  params: dict[str, Any] | None = None) -> int:
    """Write triples (see module doc); returns how many. Same triples -> identical bytes."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    ids: list[str] = []
    for t in triples:
        d = root / t.triple_id
        d.mkdir(exist_ok=True)
        for name in _ARRAYS:
            write_png(d / f"{name}.png", getattr(t, name))
        side = {"triple_id": t.triple_id, "domain": t.domain, "seeds": t.seeds,
                "instance_map": {str(k): v for k, v in sorted(t.instance_map.items())},
                "appearance": t.appearance.to_dict(), "exemplar_meta": t.exemplar_meta,
                "target_meta": t.target_meta}
        write_json(d / "triple.json", side)
        ids.append(t.triple_id)
    write_json(root / "triples.json", {"format": FORMAT, "version": VERSION, "count": len(ids), "ids": ids,
                                        "params": params or {}})
    return len(ids)


def read_triples(in_dir: str | os.PathLike) -> Iterator[GroundTruthTriple]:
    """Read what ``write_triples`` wrote, in the order written."""
    root = Path(in_dir)
    index_path = root / "triples.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path}: not a toy-town triples folder (no triples.json)")
    index = json.loads(index_path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{index_path}: format {index.get('format')!r} is not {FORMAT!r}")
    for tid in index["ids"]:
        d = root / tid
        side = json.loads((d / "triple.json").read_text())
        arrays = {name: (read_image if name.endswith("image") else read_label_png)(d / f"{name}.png")
                  for name in _ARRAYS}
        for name in ("exemplar_instance", "target_instance"):
            arrays[name] = arrays[name].astype(np.int32)
        yield GroundTruthTriple(
            triple_id=tid, **arrays,
            instance_map={int(k): int(v) for k, v in side["instance_map"].items()},
            domain=side["domain"], seeds=side["seeds"], appearance=Appearance.from_dict(side["appearance"]),
            exemplar_meta=side["exemplar_meta"], target_meta=side["target_meta"],
        )
