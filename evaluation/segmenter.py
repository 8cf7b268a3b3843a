"""A small fully-convolutional segmenter: the judge of semantic alignment.

A compact U-Net (about 0.4M parameters) maps a 64x128 RGB image to 19 Cityscapes trainIds.
It is trained on toy-town renderings only (see ``evaluation.segmenter_train``) and
committed under ``evaluation/weights/segmenter`` as safetensors + a JSON config, like a
diffusers model: ``Segmenter.from_pretrained(dir)`` / ``save_pretrained(dir)``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from amgen_core.labels import NUM_TRAIN_IDS

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DEFAULT_DIR = Path(str(files("evaluation") / "weights" / "segmenter"))


class SegmenterFileError(FileNotFoundError):
    """A segmenter folder that is missing or does not hold a usable model."""


@dataclass
class SegmenterConfig:
    num_classes: int = NUM_TRAIN_IDS
    widths: tuple[int, ...] = (16, 32, 64, 96)  # one per resolution level; the last is the bottleneck
    image_size: tuple[int, int] = (64, 128)  # what it was trained on (it runs on any multiple of 8)
    meta: dict = field(default_factory=dict)  # training facts: steps, seeds, held-out mIoU


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class Segmenter(nn.Module):
    def __init__(self, config: SegmenterConfig | None = None):
        super().__init__()
        self.config = config or SegmenterConfig()
        w = list(self.config.widths)
        self.down = nn.ModuleList([_conv_block(3, w[0])] + [_conv_block(a, b) for a, b in zip(w[:-1], w[1:])])
        self.up = nn.ModuleList([_conv_block(w[i + 1] + w[i], w[i]) for i in reversed(range(len(w) - 1))])
        self.head = nn.Conv2d(w[0], self.config.num_classes, 1)
        # Fixed input normalisation: images arrive as uint8 RGB.
        self.register_buffer("_scale", torch.tensor(1.0 / 127.5), persistent=False)

    @property
    def stride(self) -> int:
        return 2 ** (len(self.config.widths) - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, 3, H, W) float in [-1, 1] -> logits (N, C, H, W)."""
        skips = []
        x = images
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1))
        return self.head(x)

    def to_input(self, images: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> normalised (N, 3, H, W) float tensor, checked."""
        arr = np.asarray(images)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"Segmenter: expected N x H x W x 3 uint8 images, got {arr.shape} {arr.dtype}")
        h, w = arr.shape[1:3]
        if h % self.stride or w % self.stride:
            raise ValueError(f"Segmenter: image size {h}x{w} must be a multiple of {self.stride}")
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()
        return x * self._scale - 1.0

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """(N, H, W, 3) uint8 RGB -> (N, H, W) uint8 trainIds (0..18)."""
        was_training = self.training
        self.eval()
        try:
            x = self.to_input(images)
            out = [self(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(out).to(torch.uint8).numpy()

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = asdict(self.config)
        (path / (CONFIG_NAME + ".tmp")).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path / (WEIGHTS_NAME + ".tmp")))
        (path / (CONFIG_NAME + ".tmp")).replace(path / CONFIG_NAME)
        (path / (WEIGHTS_NAME + ".tmp")).replace(path / WEIGHTS_NAME)
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path = DEFAULT_DIR) -> "Segmenter":
        path = Path(path)
        cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
        for f in (cfg_file, weights_file):
            if not f.is_file():
                raise SegmenterFileError(f"{f}: segmenter file missing (train one with `amgen eval segmenter --train`)")
        try:
            raw = json.loads(cfg_file.read_text())
            config = SegmenterConfig(
                num_classes=int(raw["num_classes"]),
                widths=tuple(int(w) for w in raw["widths"]),
                image_size=tuple(int(s) for s in raw["image_size"]),
                meta=dict(raw.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SegmenterFileError(f"{cfg_file}: not a segmenter config ({exc})") from exc
        model = cls(config)
        try:
            model.load_state_dict(load_file(str(weights_file)))
        except RuntimeError as exc:
            raise SegmenterFileError(f"{weights_file}: weights do not fit the config ({exc})") from exc
        return model.eval()


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
