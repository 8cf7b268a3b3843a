"""Training pairs, made on the fly and deterministic by (seed, step, rank): no dataset on disk.

A pair is an exemplar (image, label ids, instances) and a target (the same three); the target
image is the denoising target, so its appearance must be the one the exemplar shows:

- **shared appearance** (toy-town only): one palette rendered on two independent layouts. The
  target is the exemplar's appearance on another street, which is the task at inference time.
- **two crops** (the release's pairs): one image, two independent random crops resized back to
  the training size. Works for any source with images, e.g. a user's Cityscapes tree.

Images go out as float tensors in [-1, 1] (B,3,H,W); labels as int64 (B,H,W) Cityscapes ids;
instances as int64 (B,H,W) (id*1000+k for things, the plain id for stuff).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from training.loop import DataConfig


@dataclass
class Pair:
    exemplar_image: np.ndarray      # HxWx3 uint8
    exemplar_label: np.ndarray      # HxW uint8
    exemplar_instance: np.ndarray   # HxW int32
    target_image: np.ndarray
    target_label: np.ndarray
    target_instance: np.ndarray
    kind: str                       # "shared_appearance" | "crops"


def rng_for(seed: int, step: int, rank: int, index: int, salt: int = 0) -> np.random.Generator:
    """Independent stream per sample: SeedSequence mixes all parts, so (step, rank, i) never collide."""
    return np.random.default_rng([int(seed), int(salt), int(step), int(rank), int(index)])


# ---------------------------------------------------------------------------------------------
# crops


def random_crop(rng: np.random.Generator, image: np.ndarray, label: np.ndarray, instance: np.ndarray,
                scale: tuple[float, float], flip: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A crop with the frame's aspect ratio, area fraction drawn from ``scale``, resized back."""
    H, W = label.shape
    s = float(np.sqrt(rng.uniform(scale[0] ** 2, scale[1] ** 2)))  # side factor; uniform in area
    h, w = max(2, int(round(H * s))), max(2, int(round(W * s)))
    y0 = int(rng.integers(0, H - h + 1))
    x0 = int(rng.integers(0, W - w + 1))
    do_flip = bool(flip and rng.random() < 0.5)
    crop = (slice(y0, y0 + h), slice(x0, x0 + w))
    img, lab, ins = image[crop], label[crop], instance[crop]
    if (h, w) != (H, W):
        img = np.asarray(Image.fromarray(img).resize((W, H), Image.BILINEAR))
        lab = resize_nearest(lab, H, W)
        ins = resize_nearest(ins, H, W)
    if do_flip:
        img, lab, ins = img[:, ::-1], lab[:, ::-1], ins[:, ::-1]
    return np.ascontiguousarray(img), np.ascontiguousarray(lab), np.ascontiguousarray(ins)


def resize_nearest(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize by index arithmetic (exact ids, no interpolation, any int dtype)."""
    h, w = arr.shape[:2]
    ys = ((np.arange(height) + 0.5) * h / height).astype(np.int64).clip(0, h - 1)
    xs = ((np.arange(width) + 0.5) * w / width).astype(np.int64).clip(0, w - 1)
    return arr[ys[:, None], xs[None, :]]


def crop_pair(rng: np.random.Generator, image, label, instance, config: DataConfig) -> Pair:
    ex = random_crop(rng, image, label, instance, config.crop_scale, config.flip)
    tg = random_crop(rng, image, label, instance, config.crop_scale, config.flip)
    return Pair(*ex, *tg, kind="crops")


# ---------------------------------------------------------------------------------------------
# sources


class ToyTownPairs:
    """Pairs from toy-town, rendered on demand."""

    def __init__(self, config: DataConfig):
        import toytown

        self.config = config
        self._tt = toytown

    def scene(self, rng: np.random.Generator):
        layout = self._tt.sample_layout(rng, height=self.config.height, width=self.config.width)
        return layout

    def image(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One rendered scene: image, label, instance (the VAE's data)."""
        layout = self.scene(rng)
        appearance = self._tt.sample_appearance(rng, domain=self.config.domain)
        img = self._tt.render(layout, appearance, seed=int(rng.integers(2**31)))
        return img, layout.label, layout.instance

    def pair(self, rng: np.random.Generator) -> Pair:
        if rng.random() < self.config.p_shared_appearance:
            a, b = self.scene(rng), self.scene(rng)
            appearance = self._tt.sample_appearance(rng, domain=self.config.domain)
            ia = self._tt.render(a, appearance, seed=int(rng.integers(2**31)))
            ib = self._tt.render(b, appearance, seed=int(rng.integers(2**31)))
            return Pair(ia, a.label, a.instance, ib, b.label, b.instance, kind="shared_appearance")
        image, label, instance = self.image(rng)
        return crop_pair(rng, image, label, instance, self.config)


class SourcePairs:
    """Release-style pairs (two crops of one image) from a layout source with images, e.g. a
    Cityscapes tree. The item list is read once; one item is decoded per pair."""

    def __init__(self, config: DataConfig, source=None):
        if source is None:
            from connectors.cityscapes import CityscapesSource

            source = CityscapesSource(config.root, split=config.split)
        self.config = config
        self.source = source
        self.items = source.list_items()
        if not self.items:
            raise FileNotFoundError(f"{config.root}: no {config.split!r} items found for training")

    def _read(self, rng: np.random.Generator):
        item = self.items[int(rng.integers(len(self.items)))]
        layout = self.source.read_item(item)
        if layout.image is None:
            raise ValueError(f"{item.get('path', item)}: training needs images, this layout has none")
        instance = layout.instance if layout.instance is not None else layout.label.astype(np.int32)
        image, label = layout.image, layout.label
        if image.shape[:2] != label.shape:
            raise ValueError(f"{item.get('path', item)}: image {image.shape[:2]} and label {label.shape} differ in size")
        return image, label, instance

    def _read_framed(self, rng: np.random.Generator):
        """One item resized to the training frame (image bicubic, ids nearest)."""
        image, label, instance = self._read(rng)
        H, W = self.config.height, self.config.width
        if image.shape[:2] != (H, W):
            image = np.asarray(Image.fromarray(image).resize((W, H), Image.BICUBIC))
            label, instance = resize_nearest(label, H, W), resize_nearest(instance, H, W)
        return image, label, instance

    def image(self, rng: np.random.Generator):
        return self._read_framed(rng)

    def pair(self, rng: np.random.Generator) -> Pair:
        # Resize to the training frame first, then crop: crops then keep the frame's aspect.
        return crop_pair(rng, *self._read_framed(rng), self.config)


def make_source(config: DataConfig):
    return ToyTownPairs(config) if config.source == "toytown" else SourcePairs(config)


# ---------------------------------------------------------------------------------------------
# batches


def to_unit_range(images: np.ndarray) -> torch.Tensor:
    """(B,H,W,3) uint8 -> (B,3,H,W) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def pair_batch(source, seed: int, step: int, rank: int, batch_size: int) -> dict[str, Any]:
    pairs = [source.pair(rng_for(seed, step, rank, i)) for i in range(batch_size)]
    stack = lambda name, dtype: torch.from_numpy(np.stack([getattr(p, name) for p in pairs]).astype(dtype))  # noqa: E731
    return {
        "exemplar_image": to_unit_range(np.stack([p.exemplar_image for p in pairs])),
        "exemplar_label": stack("exemplar_label", np.int64),
        "exemplar_instance": stack("exemplar_instance", np.int64),
        "target_image": to_unit_range(np.stack([p.target_image for p in pairs])),
        "target_label": stack("target_label", np.int64),
        "target_instance": stack("target_instance", np.int64),
        "shared_appearance": torch.tensor([p.kind == "shared_appearance" for p in pairs]),
    }


def image_batch(source, seed: int, step: int, rank: int, batch_size: int) -> dict[str, Any]:
    images = [source.image(rng_for(seed, step, rank, i, salt=1))[0] for i in range(batch_size)]
    return {"image": to_unit_range(np.stack(images))}


BatchFn = Callable[[int, int, int], dict[str, Any]]
