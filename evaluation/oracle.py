"""Oracle routing: what perfect matching would give this generation net (an analysis tool).

The adapter's job is routing: moving each target query's exemplar attention to the matching
exemplar region. ``OracleRouter`` stands in for the matcher and routes by the ground-truth
matching cost itself, a fixed bias on the exemplar logits: ``+boost`` where C = 1 and
``-suppress`` where C = 0. With ``keep_mass`` each query's exemplar logits are shifted back so
their log-sum-exp is unchanged: the exemplar keeps its share of the joint softmax against the
query's own tokens, and only its distribution over exemplar positions changes. If no oracle beats
plain augmented attention (sa_aug), a better trained matcher cannot either: the limit is the
generation net, not the routing.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import SimpleNamespace

import torch


class OracleRouter:
    """Duck-types ``Matcher.refine_``; nothing is learned."""

    # The attention processor reads the matcher's release_compat switch; the oracle routes as amgen does.
    config = SimpleNamespace(release_compat=False)

    def __init__(self, boost: float = 0.0, suppress: float = 0.0, keep_mass: bool = False):
        if boost < 0 or suppress < 0:
            raise ValueError(f"boost and suppress must be >= 0, got {boost}, {suppress}")
        self.boost, self.suppress, self.keep_mass = float(boost), float(suppress), bool(keep_mass)

    @property
    def name(self) -> str:
        parts = [f"boost {self.boost:g}"] if self.boost else []
        parts += [f"suppress {self.suppress:g}"] if self.suppress else []
        parts += ["mass kept"] if self.keep_mass else []
        return "oracle (" + ", ".join(parts or ["none"]) + ")"

    def refine_(self, logits: torch.Tensor, cost_fn: Callable, q_hw, e_hw, block: str,
                uncond_logits: torch.Tensor | None = None) -> torch.Tensor:
        c = cost_fn(tuple(q_hw), tuple(e_hw)).to(logits.dtype)  # (B or 1, Nq, Ne) on the layer's own grids
        before = torch.logsumexp(logits, -1, keepdim=True) if self.keep_mass else None
        logits.add_((self.boost * c - self.suppress * (1 - c))[:, None])
        if self.keep_mass:
            logits.add_(before - torch.logsumexp(logits, -1, keepdim=True))
        return logits


@contextlib.contextmanager
def routed_by(pipe, router):
    """Run ``am_adapter`` with ``router`` in place of the pipeline's matcher."""
    previous, pipe.matcher = pipe.matcher, router
    try:
        yield pipe
    finally:
        pipe.matcher = previous
