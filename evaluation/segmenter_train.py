"""Training the judge segmenter: a plain seeded PyTorch loop on one CPU, with checkpoint/resume.

Data comes from the caller as *sample sources*: objects with ``__getitem__(i) -> (image HxWx3
uint8, label HxW uint8 Cityscapes ids)`` and ``size`` (how many samples; ``None`` for an endless
procedural source such as :class:`ToyTownScenes`). A map-style dataset (``len`` and ``[i]``: a torch
Dataset, a list) or any finite iterable of (image, label) pairs works too (:func:`as_samples`).
The batch of step ``s`` is a pure function of ``(seed, s)``: a resumed run sees exactly the batches
an uninterrupted one would.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.metrics import ConfusionAccumulator
from evaluation.plateau import PlateauRule
from evaluation.segmenter import Segmenter, SegmenterConfig
from amgen_core.labels import IGNORE_TRAIN_ID, to_train_ids

# Seed ranges of toy-town scenes, disjoint from one another and from TRAIN's generative-model
# data (documented in docs/quality.md). A scene's seed is ``base + index``.
SEGMENTER_TRAIN_SEED_BASE = 50_000_000   # segmenter training scenes (endless, index = step*batch + j)
SEGMENTER_HELDOUT_SEED_BASE = 60_000_000  # segmenter held-out scenes (its own mIoU)


class SampleSource(Protocol):
    size: int | None
    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]: ...


class IndexedSamples:
    """A map-style dataset (``len`` and ``[i]``) as a finite sample source; ``[i]`` may return
    (image, label, ...) tuples or layout records (``image`` and ``label`` attributes)."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.size = len(dataset)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        sample = self.dataset[i]
        image, label = (sample.image, sample.label) if hasattr(sample, "label") else (sample[0], sample[1])
        if image is None:
            raise ValueError(f"segmenter data, sample {i}: no image; the segmenter trains on images")
        return image, label


def as_samples(data) -> SampleSource:
    """A sample source as it is (``size`` and ``[i]``), a map-style dataset wrapped, any other
    finite iterable of (image, label) pairs read once into a list."""
    if hasattr(data, "size") and hasattr(data, "__getitem__"):
        return data
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        return IndexedSamples(data)
    if hasattr(data, "__iter__"):
        return IndexedSamples(list(data))
    raise TypeError(f"segmenter data must be a sample source, a dataset or an iterable of (image, label), "
                    f"got {type(data).__name__}")


class ToyTownScenes:
    """Endless real toy-town scenes: layout and appearance (all domains) drawn from ``base + i``."""

    def __init__(self, seed_base: int, height: int = 64, width: int = 128, limit: int | None = None):
        self.seed_base, self.height, self.width, self.size = seed_base, height, width, limit

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        from toytown import render, sample_appearance, sample_layout

        rng = np.random.default_rng(self.seed_base + int(i))
        layout = sample_layout(rng, height=self.height, width=self.width)
        appearance = sample_appearance(rng)
        return render(layout, appearance, seed=int(rng.integers(2**31))), layout.label


class ConcatSource:
    """Finite sources side by side; index i runs through them in order."""

    def __init__(self, *sources: SampleSource):
        if any(s.size is None for s in sources):
            raise ValueError("ConcatSource: every source must be finite")
        self.sources = sources
        self.offsets = np.cumsum([0] + [s.size for s in sources])
        self.size = int(self.offsets[-1])

    def __getitem__(self, i: int):
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.sources[k][i - int(self.offsets[k])]


@dataclass
class SegmenterTrainConfig:
    steps: int = 1200  # fixed steps (unused with until_plateau, below)
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    threads: int = 1
    # Class-balanced loss: weight = (median frequency / frequency) ** class_balance, measured
    # on the first ``balance_samples`` training samples. Thin classes (poles, signs) need it.
    class_balance: float = 0.0
    balance_samples: int = 256
    # Train until the loss plateaus (evaluation/plateau.py) instead of for ``steps``: warm-up, then
    # a constant lr cut at each plateau; ``max_steps`` caps it.
    until_plateau: bool = False
    plateau_window: int = 100
    plateau_min_improvement: float = 0.02
    plateau_lr_drops: int = 2
    max_steps: int = 3000

    def plateau_rule(self) -> PlateauRule | None:
        if not self.until_plateau:
            return None
        return PlateauRule(window=self.plateau_window, min_improvement=self.plateau_min_improvement,
                           lr_drops=self.plateau_lr_drops, max_steps=self.max_steps)

    @property
    def step_cap(self) -> int:
        return self.max_steps if self.until_plateau else self.steps


def class_weights(source: SampleSource, cfg: SegmenterTrainConfig, num_classes: int) -> torch.Tensor | None:
    if cfg.class_balance <= 0:
        return None
    n = cfg.balance_samples if source.size is None else min(cfg.balance_samples, source.size)
    counts = np.zeros(num_classes, np.float64)
    for i in range(n):
        ids = to_train_ids(source[i][1])
        counts += np.bincount(ids[ids != IGNORE_TRAIN_ID], minlength=num_classes)[:num_classes]
    present = counts > 0
    freq = counts / counts.sum()
    weights = np.ones(num_classes)
    weights[present] = (np.median(freq[present]) / freq[present]) ** cfg.class_balance
    return torch.tensor(np.clip(weights, 0.1, 10.0), dtype=torch.float32)


def _draw_indices(rng: np.random.Generator, size: int | None, cfg: SegmenterTrainConfig, step: int) -> list[int]:
    if size is None:
        return [step * cfg.batch_size + j for j in range(cfg.batch_size)]
    return rng.integers(0, size, cfg.batch_size).tolist()


def batch_indices(size: int | None, cfg: SegmenterTrainConfig, step: int) -> list[int]:
    """The sample indices step ``step`` trains on, for a source of ``size`` samples (the step's
    first draws, so replaying them tells what a run saw without rereading any sample)."""
    return _draw_indices(np.random.default_rng([cfg.seed, step]), size, cfg, step)


def _batch(source: SampleSource, cfg: SegmenterTrainConfig, step: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([cfg.seed, step])
    idx = _draw_indices(rng, source.size, cfg, step)
    images, labels = zip(*(source[i] for i in idx))
    images, labels = np.stack(images), to_train_ids(np.stack(labels))
    flip = rng.random(cfg.batch_size) < 0.5  # horizontal flips keep a driving scene plausible
    images[flip], labels[flip] = images[flip][:, :, ::-1], labels[flip][:, :, ::-1]
    return images, labels


def _lr_at(cfg: SegmenterTrainConfig, step: int, plateau_scale: float = 1.0) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.until_plateau:  # no end is known in advance: constant, cut at each plateau
        return cfg.lr * plateau_scale
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + np.cos(np.pi * min(1.0, frac)))


def train_segmenter(
    source,
    run_dir: str | Path,
    cfg: SegmenterTrainConfig | None = None,
    model_config: SegmenterConfig | None = None,
    log: Callable[[str], None] = print,
) -> Segmenter:
    """Train (or resume) on ``source`` (see :func:`as_samples`) in ``run_dir``: ``checkpoint.pt``,
    ``log.jsonl``; returns the model."""
    source = as_samples(source)
    cfg = cfg or SegmenterTrainConfig()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(source, Path(run_dir), cfg, model_config, log)
    finally:
        torch.set_num_threads(threads_before)


# An endless source is fingerprinted by its first samples.
ENDLESS_PROBE = 64


def data_fingerprint(source) -> str:
    """sha256 of every sample's image and label (shape, dtype, bytes) in order, and the size: a
    checkpoint remembers what it was trained on, so a rerun never resumes it on other data."""
    h = hashlib.sha256(f"size={source.size}".encode())
    for i in range(source.size if source.size is not None else ENDLESS_PROBE):
        for a in source[i][:2]:
            a = np.ascontiguousarray(a)
            h.update(f"{a.shape}{a.dtype}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def _raises_the_cap(old: dict, new: dict, step: int) -> bool:
    """A plateau run asked to go on under a higher cap: its lr never depended on the cap and its
    batches are a function of (seed, step), so going on gives the bytes of one run at the new cap."""
    return (old.get("until_plateau") and new.get("until_plateau") and new["max_steps"] > step
            and {k: v for k, v in old.items() if k != "max_steps"} == {k: v for k, v in new.items() if k != "max_steps"})


def _train(source, run_dir: Path, cfg: SegmenterTrainConfig, model_config, log) -> Segmenter:
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = Segmenter(model_config)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    weight = class_weights(source, cfg, model.config.num_classes)
    ckpt_path = run_dir / "checkpoint.pt"
    fingerprint = data_fingerprint(source)
    start = 0
    rule = cfg.plateau_rule()
    plateau = rule.start() if rule else None
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        raised = _raises_the_cap(state["train_config"], asdict(cfg), int(state["step"]))
        if state["train_config"] != asdict(cfg) and not raised:
            raise ValueError(f"{ckpt_path}: checkpoint was made with a different training config; use a new run dir")
        made_on = state.get("data_fingerprint")
        if made_on is None:
            log(f"{ckpt_path}: made before checkpoints recorded their data; resumed unchecked")
        elif made_on != fingerprint:
            raise ValueError(f"{ckpt_path}: checkpoint was trained on other data (fingerprint {made_on[:12]}, "
                             f"these data {fingerprint[:12]}); use a new run dir")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        plateau = state.get("plateau", plateau)
        if raised and plateau["stopped"] == "max_steps":
            plateau["stopped"] = ""  # the old cap ended it, the new one lets it go on
        log(f"resumed from {ckpt_path} at step {start}")
    model.train()
    t0 = time.time()
    scale = lambda: plateau["lr_scale"] if plateau else 1.0  # noqa: E731
    with open(run_dir / "log.jsonl", "a") as logf:
        for step in range(start, cfg.step_cap):
            if plateau and plateau["stopped"]:
                break
            images, labels = _batch(source, cfg, step)
            for group in opt.param_groups:
                group["lr"] = _lr_at(cfg, step, scale())
            logits = model(model.to_input(images))
            loss = F.cross_entropy(logits, torch.from_numpy(labels.astype(np.int64)), weight=weight,
                                   ignore_index=IGNORE_TRAIN_ID)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done = step + 1
            lr = _lr_at(cfg, step, scale())
            if plateau is not None:
                rule.update(plateau, done, loss.item())
            last = done == cfg.step_cap or bool(plateau and plateau["stopped"])
            if done % cfg.checkpoint_every == 0 or last:
                tmp = ckpt_path.with_suffix(".tmp")
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": done,
                            "train_config": asdict(cfg), "plateau": plateau, "data_fingerprint": fingerprint}, tmp)
                tmp.replace(ckpt_path)
            if done % cfg.log_every == 0 or last:
                rec = {"step": done, "loss": round(loss.item(), 5), "lr": lr, "elapsed_s": round(time.time() - t0, 1)}
                if plateau is not None:
                    rec.update(ema_loss=round(plateau["ema"], 5), stopped=plateau["stopped"])
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                log(f"step {done}/{cfg.step_cap} loss {rec['loss']:.4f} ({rec['elapsed_s']} s)")
            start = done
    # What the run did, for the caller's record: steps taken and why it ended.
    model.training_record = {"steps": start, "stopped": (plateau or {}).get("stopped") or "steps",
                             "plateau_lr_drops_at": list((plateau or {}).get("drop_steps", [])),
                             "final_ema_loss": round(plateau["ema"], 5) if plateau and plateau["ema"] is not None else None}
    return model.eval()


def evaluate_segmenter(model: Segmenter, source, n: int, batch_size: int = 32) -> ConfusionAccumulator:
    """Pooled confusion of ``model`` on the first ``n`` samples of ``source`` (see :func:`as_samples`)."""
    source = as_samples(source)
    if source.size is not None and n > source.size:
        raise ValueError(f"evaluate_segmenter: {n} samples asked for, the held-out data holds {source.size}")
    acc = ConfusionAccumulator(model.config.num_classes)
    for lo in range(0, n, batch_size):
        images, labels = zip(*(source[i] for i in range(lo, min(n, lo + batch_size))))
        for pred, label in zip(model.predict(np.stack(images)), labels):
            acc.add(pred, label)
    return acc
