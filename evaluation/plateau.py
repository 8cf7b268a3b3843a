"""When a segmenter has stopped learning: the plateau rule of the downstream tests.

A test that stops its segmenters before they converge mostly measures how fast each arm learns,
not what its data is worth. The rule: an exponential moving average of the training loss (span
``window`` steps) is compared every ``window`` steps with its value a window earlier. If it fell
by less than ``min_improvement`` (relative), the learning rate is cut by ``lr_factor``; at the
plateau after ``lr_drops`` such cuts, training stops (the schedule torch's ReduceLROnPlateau
follows, ending in a stop). ``max_steps`` caps a run that keeps improving.

The state is a small dict, saved in the checkpoint, so a resumed run decides exactly as an
uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class PlateauRule:
    window: int = 100
    min_improvement: float = 0.02
    lr_factor: float = 0.3
    lr_drops: int = 2
    max_steps: int = 3000

    def __post_init__(self) -> None:
        if self.window < 2 or not 0 < self.lr_factor < 1 or self.lr_drops < 0 or self.max_steps < 1:
            raise ValueError(f"plateau rule: window >= 2, 0 < lr_factor < 1, lr_drops >= 0, max_steps >= 1; got {self}")

    def start(self) -> dict[str, Any]:
        return {"ema": None, "last_check": None, "lr_scale": 1.0, "drops": 0, "stopped": "", "drop_steps": []}

    def update(self, state: dict[str, Any], step: int, loss: float) -> dict[str, Any]:
        """Take step ``step``'s loss (steps count from 1); returns the state (``stopped`` set to
        "plateau" or "max_steps" when training should end after this step)."""
        alpha = 2.0 / (self.window + 1)
        state["ema"] = loss if state["ema"] is None else (1 - alpha) * state["ema"] + alpha * loss
        if step % self.window == 0:
            last = state["last_check"]
            if last is not None and state["ema"] > last * (1 - self.min_improvement):
                if state["drops"] >= self.lr_drops:
                    state["stopped"] = "plateau"
                else:
                    state["drops"] += 1
                    state["lr_scale"] *= self.lr_factor
                    state["drop_steps"].append(step)
            state["last_check"] = state["ema"]
        if not state["stopped"] and step >= self.max_steps:
            state["stopped"] = "max_steps"
        return state
