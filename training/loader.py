"""Batches through ``torch.utils.data.DataLoader``: worker processes, pinned memory, prefetch.

The dataset is indexed by step: item ``s`` is ``task.batch(s, rank, world_size)``, which is a pure
function of (config seed, step, rank) (training/data.py). A worker that renders step s therefore
produces the bytes the training process would have produced, so the loop's batches do not depend
on how many workers there are or which one made which batch. The sampler is the step range, so a
resumed run's loader starts at the resume step.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from training.loop import LoaderConfig


class StepBatches(Dataset):
    """Item ``step``: the batch of (step, rank), as the task makes it."""

    def __init__(self, make_batch: Callable[[int, int, int], dict[str, Any]], rank: int, world_size: int):
        self.make_batch = make_batch
        self.rank = rank
        self.world_size = world_size

    def __getitem__(self, step: int) -> dict[str, Any]:
        return self.make_batch(int(step), self.rank, self.world_size)


def _as_made(batch: dict[str, Any]) -> dict[str, Any]:
    """No collation: a task's batch is already stacked (batch_size=None turns automatic batching off)."""
    return batch


def pins_memory(config: LoaderConfig, device: torch.device) -> bool:
    return device.type == "cuda" if config.pin_memory == "auto" else bool(config.pin_memory and device.type != "cpu")


def step_loader(make_batch: Callable[[int, int, int], dict[str, Any]], config: LoaderConfig, *, rank: int,
                world_size: int, start: int, end: int, device: torch.device) -> DataLoader:
    """The batches of steps ``start .. end - 1`` in step order."""
    workers = config.num_workers
    return DataLoader(
        StepBatches(make_batch, rank, world_size), batch_size=None, sampler=range(start, end), collate_fn=_as_made,
        num_workers=workers, prefetch_factor=config.prefetch_factor if workers else None,
        pin_memory=pins_memory(config, device), persistent_workers=False,
    )


def step_batches(loader: DataLoader) -> Iterator[dict[str, Any]]:
    """Iterate ``loader``, shutting its workers down when the loop stops early (an error, max_steps)."""
    it = iter(loader)
    try:
        yield from it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
