"""Categorical matching cost between a target layout and an exemplar layout.

C[i, j] = 1 where the target's label at query position i matches the exemplar's label
at key position j: rows are target positions, columns exemplar positions (the logits'
orientation). Labels are *ids* resampled to each layer's token grid by nearest or
majority (mode-of-block) sampling, never blurred colours, so thin classes survive.

Decision on unlabeled pixels: id 0 ("unlabeled") matches nothing, not even itself;
every other Cityscapes id matches the same id (including classes ignored in evaluation,
which are still real, consistent regions such as "ground" or "static").

``sampling="release_colour"`` is the public release's cost, for imported release weights only
(Matcher ``release_compat``): the colourised maps are resized bilinearly and positions match
when all three colour channels are exactly equal (src/pipelines/pipeline_ours.py:1096-1098 of
cvlab-kaist/AM-Adapter). Blended boundary colours then match only identical blends, and
unlabeled (black, shared by ids 0-4) matches black.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from amgen_core.labels import colorize

UNLABELED_ID = 0
SAMPLING = ("majority", "nearest")
RELEASE_COLOUR = "release_colour"  # the release's colour-equality cost (imported weights only)


def resample_ids(ids: np.ndarray, size: tuple[int, int], method: str = "majority") -> np.ndarray:
    """Resample an integer map (H, W) to ``size`` = (h, w).

    ``nearest`` takes the pixel at each cell's centre; ``majority`` takes the most frequent
    value in each cell (ties go to the smallest value). Works for any ratio of sizes.
    """
    ids = np.asarray(ids)
    h, w = size
    H, W = ids.shape
    if (H, W) == (h, w):
        return ids.copy()
    if method == "nearest":
        ys = ((np.arange(h) + 0.5) * H / h).astype(np.int64)
        xs = ((np.arange(w) + 0.5) * W / w).astype(np.int64)
        return ids[np.ix_(ys, xs)]
    if method != "majority":
        raise ValueError(f"unknown label sampling {method!r}; choose one of {SAMPLING}")
    values, inverse = np.unique(ids, return_inverse=True)
    cy = (np.arange(H) * h) // H
    cx = (np.arange(W) * w) // W
    cell = (cy[:, None] * w + cx[None, :]).ravel()
    counts = np.bincount(cell * len(values) + inverse.ravel(), minlength=h * w * len(values))
    return values[counts.reshape(h * w, len(values)).argmax(1)].reshape(h, w)


def _maps(m) -> list:
    """One (H, W) map or a sequence of them -> list of maps."""
    if isinstance(m, np.ndarray) and m.ndim == 2:
        return [m]
    return list(m)


def instance_class(instance: np.ndarray) -> np.ndarray:
    """Class id of each instance id (``id*1000+k`` for things, the plain id for stuff)."""
    inst = np.asarray(instance, dtype=np.int64)
    return np.where(inst >= 1000, inst // 1000, inst)


def _pairwise(t_keys: np.ndarray, e_keys: np.ndarray, rule) -> torch.Tensor:
    """(Nq, Ne) bool from a rule on the *unique* keys (cheap), gathered to all positions."""
    tu, ti = np.unique(t_keys.ravel(), return_inverse=True)
    eu, ei = np.unique(e_keys.ravel(), return_inverse=True)
    table = torch.from_numpy(rule(tu, eu))
    return table[torch.from_numpy(ti.ravel())][:, torch.from_numpy(ei.ravel())]


def release_colours(ids: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Label ids (H, W) -> the release's resized colour map (h*w, 3), float32.

    As the release reads its colour PNGs: uint8 colours / 255 in float32, then a bilinear
    resize without antialiasing (align_corners=False)."""
    rgb = torch.from_numpy(colorize(ids).astype(np.float32) / np.float32(255.0)).permute(2, 0, 1)[None]
    if tuple(size) != tuple(rgb.shape[-2:]):
        rgb = F.interpolate(rgb, size=tuple(size), mode="bilinear", align_corners=False)
    return rgb[0].reshape(3, -1).T


def release_colour_cost(target: np.ndarray, exemplar: np.ndarray, q_hw, e_hw) -> torch.Tensor:
    """(Nq, Ne) bool: target cell i matches exemplar cell j when their resized colours are
    exactly equal in all three channels."""
    t, e = release_colours(target, q_hw), release_colours(exemplar, e_hw)
    return (t[:, None, :] == e[None, :, :]).all(-1)


def _class_rule(tu: np.ndarray, eu: np.ndarray) -> np.ndarray:
    return (tu[:, None] == eu[None, :]) & (tu[:, None] != UNLABELED_ID)


class CostSpec:
    """Everything needed to build the matching cost of N targets against one exemplar, at
    any pair of token grids; results are cached per grid pair.

    granularity="class": label ids. granularity="instance": instance ids (things match the
    same instance id, stuff its class). ``instance_mapping`` {exemplar_instance_id:
    [target_instance_ids]}: mapped target instances match exactly their mapped exemplar
    instances (one-to-one or M-to-N); every other target position matches by class.

    ``exemplar_label`` / ``exemplar_instance`` may also be sequences of N maps (training
    batches of (target, exemplar) pairs): target i is then matched against exemplar i.
    """

    def __init__(
        self,
        target_labels: Sequence[np.ndarray],
        exemplar_label: np.ndarray,
        *,
        target_instances: Sequence[np.ndarray] | None = None,
        exemplar_instance: np.ndarray | None = None,
        granularity: str = "class",
        instance_mapping: Mapping[int, Sequence[int]] | None = None,
        sampling: str = "majority",
    ):
        if granularity not in ("class", "instance"):
            raise ValueError(f"unknown granularity {granularity!r}; choose 'class' or 'instance'")
        if sampling not in (*SAMPLING, RELEASE_COLOUR):
            raise ValueError(f"unknown label sampling {sampling!r}; choose one of {(*SAMPLING, RELEASE_COLOUR)}")
        uses_instances = granularity == "instance" or instance_mapping is not None
        if sampling == RELEASE_COLOUR and uses_instances:
            raise ValueError(f"label sampling {RELEASE_COLOUR!r} (the release's colour cost) compares class colours only; "
                             "it takes no instance granularity or instance_mapping")
        if uses_instances and (exemplar_instance is None or target_instances is None):
            raise ValueError("instance granularity / instance_mapping need exemplar_instance and target_instances")
        self.granularity = granularity
        self.sampling = sampling
        self.mapping = {int(k): [int(v) for v in vs] for k, vs in (instance_mapping or {}).items()}
        source_t, source_e = (target_instances, exemplar_instance) if uses_instances else (target_labels, exemplar_label)
        self.targets = [np.asarray(t, np.int64) for t in source_t]
        self.exemplars = [np.asarray(e, np.int64) for e in _maps(source_e)]
        if len(self.exemplars) not in (1, len(self.targets)):
            raise ValueError(f"{len(self.exemplars)} exemplar maps for {len(self.targets)} targets (need 1 or one each)")
        self.uses_instances = uses_instances
        self._cache: dict[tuple, torch.Tensor] = {}

    def _rule(self, tu: np.ndarray, eu: np.ndarray) -> np.ndarray:
        if not self.uses_instances:
            return _class_rule(tu, eu)
        tc, ec = instance_class(tu), instance_class(eu)
        if self.granularity == "instance":
            table = (tu[:, None] == eu[None, :]) & (tc[:, None] != UNLABELED_ID)
        else:
            table = _class_rule(tc, ec)
        if self.mapping:
            mapped = np.zeros((len(tu), len(eu)), bool)
            t_pos = {int(v): i for i, v in enumerate(tu)}
            e_pos = {int(v): j for j, v in enumerate(eu)}
            for ex_id, t_ids in self.mapping.items():
                for t_id in t_ids:
                    if t_id in t_pos and ex_id in e_pos:
                        mapped[t_pos[t_id], e_pos[ex_id]] = True
            # a mapped target row keeps only its mapped exemplar columns
            rows = np.isin(tu, [t for ts in self.mapping.values() for t in ts])
            table = np.where(rows[:, None], mapped, _class_rule(tc, ec))
        return table

    def cost(self, q_hw: tuple[int, int], e_hw: tuple[int, int], device=None, dtype=torch.float32) -> torch.Tensor:
        """(N, Nq, Ne) cost at target grid ``q_hw`` and exemplar grid ``e_hw``."""
        key = (tuple(q_hw), tuple(e_hw), str(device), dtype)
        if key not in self._cache and self.sampling == RELEASE_COLOUR:
            mats = [release_colour_cost(t, self.exemplars[i % len(self.exemplars)], q_hw, e_hw)
                    for i, t in enumerate(self.targets)]
            self._cache[key] = torch.stack(mats).to(device=device, dtype=dtype)
        if key not in self._cache:
            e_small = [resample_ids(e, e_hw, self.sampling) for e in self.exemplars]
            mats = [_pairwise(resample_ids(t, q_hw, self.sampling), e_small[i % len(e_small)], self._rule)
                    for i, t in enumerate(self.targets)]
            self._cache[key] = torch.stack(mats).to(device=device, dtype=dtype)
        return self._cache[key]

    def subset(self, index: int) -> "CostSpec":
        """The spec of target ``index`` alone (used to run samples one by one)."""
        clone = object.__new__(CostSpec)
        clone.__dict__.update(self.__dict__)
        clone.targets = [self.targets[index]]
        clone.exemplars = [self.exemplars[index % len(self.exemplars)]]
        clone._cache = {}
        return clone
