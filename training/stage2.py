"""Stage 2: the matcher (the adapter) only; every other weight is frozen.

Same pairs and noising as stage 1; the generation branch runs with the adapter on
(``am_adapter``). The matching cost is built per sample from the pair's own label maps; with
probability ``p_instance`` a step matches at instance granularity (things match the same
instance id, stuff its class) and with ``p_mapping`` through an instance mapping, so the
instance paths, used for one-to-one and M-to-N transfer, are trained too. Toy-town gives instance ground truth for free: two crops of one image keep
their instance ids, and one appearance paints instance k of a class with the same colour on
any layout.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from training.diffusion import (CheckpointSwitch, DiffusionConfig, PairTask, checkpointed, noised_pair, prediction_loss,
                                       uniform)


class Stage2Config(DiffusionConfig):
    stage: Literal["stage2"] = "stage2"
    lr: float = Field(1e-3, gt=0)
    # Per step, the matching cost is: instance granularity with p_instance; class granularity
    # plus an instance mapping (every thing instance seen in both maps -> itself) with
    # p_mapping, the path of user-given one-to-one / M-to-N mappings; else class granularity.
    p_instance: float = Field(0.3, ge=0.0, le=1.0)
    p_mapping: float = Field(0.3, ge=0.0, le=1.0)
    label_sampling: Literal["majority", "nearest"] = "majority"
    snr_gamma: float | None = Field(None, gt=0)  # Min-SNR loss weighting; None: plain MSE
    # "near_zero": start the matcher from a (near) zero output (Matcher.start_near_zero_), so
    # training starts at sa_aug; "keep": train the matcher init_from holds, as it is.
    matcher_init: Literal["keep", "near_zero"] = "keep"

    @model_validator(mode="after")
    def _needs_stage1(self) -> "Stage2Config":
        if self.p_instance + self.p_mapping > 1.0:
            raise ValueError(f"p_instance + p_mapping must be <= 1, got {self.p_instance} + {self.p_mapping}")
        if not (self.init_from or self.sd15_dir or self.allow_random_vae):
            raise ValueError("stage 2 starts from stage 1: set init_from to its pipeline folder (runs/.../pipeline)")
        return self


class Stage2Step(CheckpointSwitch, torch.nn.Module):
    def __init__(self, pipe, config: Stage2Config):
        super().__init__()
        self.matcher = pipe.matcher
        if config.matcher_init == "near_zero":
            self.matcher.start_near_zero_()
        # frozen parts, registered so .to() moves them and a test can check they stay put
        self.unet, self.vae, self.structure_net, self.text_embeds = pipe.unet, pipe.vae, pipe.structure_net, pipe.text_embeds
        for m in (self.unet, self.vae, self.structure_net, self.text_embeds):
            m.requires_grad_(False)
        self.matcher.requires_grad_(True)
        self.pipe = pipe
        self.config = config

    def forward(self, batch, generator: torch.Generator):
        pipe, c = self.pipe, self.config
        x = noised_pair(pipe, batch, generator, c.high_noise_bias, c.exemplar_t_fraction, c.thing_weight,
                        c.boundary_weight)
        u = uniform(generator)
        kind = "instance" if u < c.p_instance else "mapping" if u < c.p_instance + c.p_mapping else "class"
        with torch.no_grad():
            _, tokens = pipe.appearance_tokens(x.exemplar, x.timesteps, x.exemplar_cond)
        cost_fn = pair_costs(batch, kind, c.label_sampling, x.target.dtype)
        eps = checkpointed(
            self.checkpoint_passes,
            lambda z, t, cond: pipe.generation_eps(z, t, cond, tokens=tokens, mode="am_adapter", cost=cost_fn),
            x.target, x.timesteps, x.target_cond)
        loss = prediction_loss(eps, x.clean_target, x.noise_target, x.timesteps, pipe.scheduler, c.snr_gamma,
                                   x.target_weights)
        return {"loss": loss, "granularity": float(GRANULARITIES.index(kind))}


GRANULARITIES = ("class", "instance", "mapping")


def shared_things(target_instance: np.ndarray, exemplar_instance: np.ndarray) -> dict[int, list[int]]:
    """{id: [id]} for thing instances present in both maps: two crops of one image keep their ids,
    and toy-town paints instance k of a class alike on every layout of one appearance."""
    common = np.intersect1d(np.unique(target_instance), np.unique(exemplar_instance))
    return {int(i): [int(i)] for i in common if i >= 1000}


def pair_costs(batch, kind: str, sampling: str, dtype):
    """cost_fn(q_grid, e_grid) -> (B, Nq, Ne): sample i's target against sample i's own exemplar."""
    from amadapter.cost import CostSpec

    labels_t = batch["target_label"].cpu().numpy()
    labels_e = batch["exemplar_label"].cpu().numpy()
    inst_t = batch["target_instance"].cpu().numpy()
    inst_e = batch["exemplar_instance"].cpu().numpy()
    specs = [CostSpec([labels_t[i]], labels_e[i], target_instances=[inst_t[i]], exemplar_instance=inst_e[i],
                      granularity="instance" if kind == "instance" else "class", sampling=sampling,
                      instance_mapping=shared_things(inst_t[i], inst_e[i]) if kind == "mapping" else None)
             for i in range(len(labels_t))]
    device = batch["target_image"].device  # the maps stay on the CPU (training/loop.py _to_device)

    def cost_fn(q_hw, e_hw):
        return torch.cat([s.cost(q_hw, e_hw, device=device, dtype=dtype) for s in specs])

    return cost_fn


class Stage2Task(PairTask):
    step_class = Stage2Step

    def trainable_prefixes(self) -> tuple[str, ...]:
        return ("matcher.",)
