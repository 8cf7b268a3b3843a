"""Per-latent-cell loss weights from the target's layout: things and boundaries count more.

Why: in plain MSE a pedestrian is a few cells of road-sized error, so the model can leave a
layout's small objects undrawn (a car as two tail lights on a dark road) at almost no cost,
and the label then lies. Weighting the cells that hold thing pixels or class / instance edges
makes drawing them worth what drawing the road is.

Weights are built at pixel level (1 + ``thing_weight`` on thing pixels + ``boundary_weight`` on
edge pixels), average-pooled to the latent grid, and scaled to mean 1 per sample so the loss
keeps its scale and learning rate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from amgen_core.labels import THING_IDS

_IS_THING = torch.zeros(256, dtype=torch.bool)
_IS_THING[list(THING_IDS)] = True


def edge_pixels(label: torch.Tensor, instance: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: pixels whose label or instance differs from a 4-neighbour."""
    edge = torch.zeros_like(label, dtype=torch.bool)
    for m in (label, instance):
        dy = m[:, 1:, :] != m[:, :-1, :]
        dx = m[:, :, 1:] != m[:, :, :-1]
        edge[:, 1:, :] |= dy
        edge[:, :-1, :] |= dy
        edge[:, :, 1:] |= dx
        edge[:, :, :-1] |= dx
    return edge


def layout_cell_weights(label: torch.Tensor, instance: torch.Tensor, latent_hw: tuple[int, int],
                        thing_weight: float, boundary_weight: float) -> torch.Tensor | None:
    """(B, 1, h, w) float32 weights with mean 1 per sample, or None when both weights are 0."""
    if thing_weight == 0 and boundary_weight == 0:
        return None
    label, instance = label.long().cpu(), instance.long().cpu()
    w = torch.ones(label.shape, dtype=torch.float32)
    if thing_weight:
        w += thing_weight * _IS_THING[label.clamp(0, 255)].float()
    if boundary_weight:
        w += boundary_weight * edge_pixels(label, instance).float()
    h, wd = latent_hw
    if label.shape[1] % h or label.shape[2] % wd:
        raise ValueError(f"label maps {tuple(label.shape[1:])} do not tile the latent grid {latent_hw}")
    cells = F.avg_pool2d(w[:, None], kernel_size=(label.shape[1] // h, label.shape[2] // wd))
    return cells / cells.mean(dim=(1, 2, 3), keepdim=True)

