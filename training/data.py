"""Training pairs and batches, deterministic by (seed, step, rank), from data the caller chooses.

A pair is an exemplar (image, label ids, instances) and a target (the same three); the target
image is the denoising target, so its appearance must be the one the exemplar shows:

- **shared appearance** (toy-town only, training/sources.py): one palette rendered on two
  independent layouts. The target is the exemplar's appearance on another street, which is the
  task at inference time.
- **two crops** (the release's pairs, :class:`LayoutPairs`): one image, two independent random
  crops resized back to the training size. Works for any layouts with images, e.g. a user's
  Cityscapes tree.

The tasks take a :class:`PairData` as an argument; ``training/sources.py`` builds one from a
training config's ``data`` section.

Images go out as float tensors in [-1, 1] (B,3,H,W); labels as int64 (B,H,W) Cityscapes ids;
instances as int64 (B,H,W) (id*1000+k for things, the plain id for stuff).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

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
# pair data: what the tasks receive (built by the caller, see training/sources.py)


class PairData(Protocol):
    """What a training task draws from; every draw is a pure function of ``rng``."""

    def pair(self, rng: np.random.Generator) -> Pair:
        """One (exemplar, target) pair (stage 1 and stage 2)."""

    def image(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One frame: image HxWx3 uint8, label HxW uint8, instance HxW int (the VAE's data)."""


class SourceLayouts:
    """A layout source (``list_items()`` + ``read_item(item)``, e.g. any ``connectors`` source) as a
    map-style dataset (``len`` and ``[i]``, torch's Dataset protocol): items are listed once, one is
    decoded per index."""

    def __init__(self, source):
        self.source = source
        self.items = source.list_items()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.source.read_item(self.items[i])


def as_dataset(layouts):
    """Random access to ``layouts``: a layout source, a map-style dataset (``len`` and ``[i]``: a torch
    Dataset, a list), or any other finite iterable, which is read once into a list."""
    if hasattr(layouts, "list_items") and hasattr(layouts, "read_item"):
        return SourceLayouts(layouts)
    if hasattr(layouts, "__len__") and hasattr(layouts, "__getitem__"):
        return layouts
    return list(layouts)


def sample_arrays(sample, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, label, instance) of one sample: a layout record (``image``, ``label``, ``instance``
    attributes) or a tuple (image, label) / (image, label, instance). Without instances, the label
    ids stand in (every class one region)."""
    if hasattr(sample, "label"):
        image, label, instance = getattr(sample, "image", None), sample.label, getattr(sample, "instance", None)
    elif isinstance(sample, (tuple, list)) and len(sample) in (2, 3):
        image, label, instance = (*sample, None)[:3]
    else:
        raise TypeError(f"{where}: a training sample is a layout record or an (image, label[, instance]) tuple, "
                        f"got {type(sample).__name__}")
    if image is None:
        raise ValueError(f"{where}: training needs images, this layout has none")
    image, label = np.asarray(image), np.asarray(label)
    if image.shape[:2] != label.shape:
        raise ValueError(f"{where}: image {image.shape[:2]} and label {label.shape} differ in size")
    instance = label.astype(np.int32) if instance is None else np.asarray(instance)
    return image, label, instance


def _sample_name(sample, index: int, name: str) -> str:
    meta = getattr(sample, "meta", None) or {}
    return str(meta.get("image_path") or meta.get("path") or getattr(sample, "layout_id", None) or f"{name} sample {index}")


class LayoutPairs:
    """Release-style pairs (two crops of one image) from any layouts with images, e.g. a Cityscapes
    tree read through ``connectors.cityscapes``. One sample is decoded per pair, picked by ``rng``."""

    def __init__(self, config: DataConfig, layouts, name: str = "training data"):
        self.config = config
        self.name = name
        self.layouts = as_dataset(layouts)
        if len(self.layouts) == 0:
            raise ValueError(f"{name}: holds no samples to train on")

    def _read(self, rng: np.random.Generator):
        index = int(rng.integers(len(self.layouts)))
        sample = self.layouts[index]
        return sample_arrays(sample, _sample_name(sample, index, self.name))

    def _read_framed(self, rng: np.random.Generator):
        """One sample resized to the training frame (image bicubic, ids nearest)."""
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


# ---------------------------------------------------------------------------------------------
# batches


def to_unit_range(images: np.ndarray) -> torch.Tensor:
    """(B,H,W,3) uint8 -> (B,3,H,W) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def pair_batch(data: PairData, seed: int, step: int, rank: int, batch_size: int) -> dict[str, Any]:
    pairs = [data.pair(rng_for(seed, step, rank, i)) for i in range(batch_size)]
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


def image_batch(data: PairData, seed: int, step: int, rank: int, batch_size: int) -> dict[str, Any]:
    images = [data.image(rng_for(seed, step, rank, i, salt=1))[0] for i in range(batch_size)]
    return {"image": to_unit_range(np.stack(images))}

