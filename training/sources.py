"""Where training data comes from: the one place a training config's ``data`` section becomes
the data object the tasks receive (``amgen train`` calls :func:`training_data`).

- ``source: toytown``: :class:`ToyTownPairs`, rendered on demand (nothing on disk);
- ``source: cityscapes``: a Cityscapes-format tree read through ``connectors.cityscapes``, as
  release-style pairs (:class:`training.data.LayoutPairs`).

Any other layouts (a ``connectors`` source, a torch Dataset of layouts or of (image, label)
tuples) go straight into ``LayoutPairs(config.data, layouts)``: the tasks only see ``pair(rng)``
and ``image(rng)``.
"""
from __future__ import annotations

import numpy as np

from amgen_core.domains import DOMAINS
from toytown import render, sample_appearance, sample_layout
from training.data import LayoutPairs, Pair, PairData, crop_pair
from training.loop import DataConfig


class ToyTownPairs:
    """Pairs from toy-town, rendered on demand. Half of them (``p_shared_appearance``) are one
    palette on two independent layouts, which only a generator can give; the rest two crops."""

    def __init__(self, config: DataConfig):
        self.config = config
        weights = config.domain_weights
        self.domain_p = None if weights is None else tuple(
            weights.get(d, 0.0) / sum(weights.values()) for d in DOMAINS)

    def scene(self, rng: np.random.Generator):
        return sample_layout(rng, height=self.config.height, width=self.config.width)

    def _look(self, rng: np.random.Generator):
        return sample_appearance(rng, domain=self.config.domain, domain_p=self.domain_p)

    def image(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One rendered scene: image, label, instance (the VAE's data)."""
        layout = self.scene(rng)
        look = self._look(rng)
        img = render(layout, look, seed=int(rng.integers(2**31)))
        return img, layout.label, layout.instance

    def pair(self, rng: np.random.Generator) -> Pair:
        if rng.random() < self.config.p_shared_appearance:
            a, b = self.scene(rng), self.scene(rng)
            appearance = self._look(rng)
            ia = render(a, appearance, seed=int(rng.integers(2**31)))
            ib = render(b, appearance, seed=int(rng.integers(2**31)))
            return Pair(ia, a.label, a.instance, ib, b.label, b.instance, kind="shared_appearance")
        image, label, instance = self.image(rng)
        return crop_pair(rng, image, label, instance, self.config)


def training_data(config: DataConfig) -> PairData:
    """The data a training config's ``data`` section names."""
    if config.source == "toytown":
        return ToyTownPairs(config)
    from connectors.cityscapes import CityscapesSource

    source = CityscapesSource(config.root, split=config.split)
    if not source.list_items():
        raise FileNotFoundError(f"{config.root}: no {config.split!r} items found for training")
    return LayoutPairs(config, source, name=f"{config.root} ({config.split})")
