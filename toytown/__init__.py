"""Toy-town: a procedural driving world in Cityscapes label space, with known ground truth.

Layout (geometry) and appearance (colour, texture, light) are drawn independently, so one
appearance renders on any layout:

    rng = np.random.default_rng(0)
    layout = sample_layout(rng, 64, 128)            # ToyLayout(label, instance, meta)
    look = sample_appearance(rng, domain="night")   # Appearance
    image = render(layout, look, seed=1)            # 64x128x3 uint8
"""
from .appearance import DOMAINS, N_SLOTS, Appearance, sample_appearance
from .layout import ToyLayout, sample_layout
from .render import render
from .triples import GroundTruthTriple, make_triple, make_triples, read_triples, write_triples
from .tree import TreeSummary, make_scene, make_tree

__all__ = ["DOMAINS", "N_SLOTS", "Appearance", "ToyLayout", "render", "sample_appearance", "sample_layout",
           "TreeSummary", "make_scene", "make_tree",
           "GroundTruthTriple", "make_triple", "make_triples", "read_triples", "write_triples"]
