"""Stage 1: the generation UNet, the structure net and the toy null embedding.

Each step: the appearance branch (the same UNet) denoises the exemplar at timestep t, guided by
the exemplar's label map, and records its attn1 tokens; the generation branch denoises the
target at the same t, guided by the target's map, attending to [own ; exemplar] tokens
(``sa_aug``; the adapter is stage 2's). Loss: epsilon-MSE on the target, plus (weighted) the
appearance branch's own epsilon-MSE, which it computes anyway and which trains the plain
self-attention path the sampler's unconditional half and DDIM inversion use.

Condition dropout: with probability ``p_drop_exemplar`` a step drops the exemplar and the
target is denoised with plain self-attention, which is exactly how the sampler's unconditional
CFG half runs.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from training.diffusion import (CheckpointSwitch, DiffusionConfig, PairTask, checkpointed, noised_pair, prediction_loss,
                                       uniform)


class Stage1Config(DiffusionConfig):
    stage: Literal["stage1"] = "stage1"
    p_drop_exemplar: float = Field(0.1, ge=0.0, le=1.0)
    appearance_grad: bool = True          # train the UNet through the tokens it records
    exemplar_loss_weight: float = Field(0.5, ge=0.0)
    train_text_embeds: bool = True        # the toy's learned null embedding (no effect for prompt embeddings)
    snr_gamma: float | None = Field(None, gt=0)  # Min-SNR loss weighting (5.0 is usual); None: plain MSE

    @model_validator(mode="after")
    def _exemplar_loss_needs_same_t(self) -> "Stage1Config":
        if self.appearance_grad and self.exemplar_loss_weight > 0 and tuple(self.exemplar_t_fraction) != (1.0, 1.0):
            raise ValueError("the exemplar's own epsilon loss needs it noised at t: with exemplar_t_fraction "
                             f"{self.exemplar_t_fraction} set exemplar_loss_weight: 0 or appearance_grad: false")
        return self


class Stage1Step(CheckpointSwitch, torch.nn.Module):
    def __init__(self, pipe, config: Stage1Config):
        super().__init__()
        self.unet, self.structure_net, self.text_embeds = pipe.unet, pipe.structure_net, pipe.text_embeds
        self.vae, self.matcher = pipe.vae, pipe.matcher   # frozen; registered so .to() moves them
        self.pipe = pipe  # not a Module: a plain attribute
        self.config = config
        self.unet.requires_grad_(True)
        self.structure_net.requires_grad_(True)
        self.text_embeds.requires_grad_(config.train_text_embeds)

    def forward(self, batch, generator: torch.Generator):
        pipe, c = self.pipe, self.config
        x = noised_pair(pipe, batch, generator, c.high_noise_bias, c.exemplar_t_fraction, c.thing_weight,
                        c.boundary_weight)
        drop = uniform(generator) < c.p_drop_exemplar
        out = {}
        ck = self.checkpoint_passes
        if drop:
            eps = checkpointed(ck, lambda z, t, cond: pipe.generation_eps(z, t, cond, mode="structure_only"),
                               x.target, x.timesteps, x.target_cond)
            loss = prediction_loss(eps, x.clean_target, x.noise_target, x.timesteps, pipe.scheduler, c.snr_gamma,
                                   x.target_weights)
            out["loss_target"] = loss.detach()
        else:
            grad_ctx = torch.enable_grad() if c.appearance_grad else torch.no_grad()
            with grad_ctx:
                eps_e, tokens = checkpointed(
                    ck, lambda z, t, cond: pipe.appearance_tokens(z, t, cond, grad=c.appearance_grad),
                    x.exemplar, x.timesteps, x.exemplar_cond)
            eps = checkpointed(ck, lambda z, t, cond: pipe.generation_eps(z, t, cond, tokens=tokens, mode="sa_aug"),
                               x.target, x.timesteps, x.target_cond)
            loss_t = prediction_loss(eps, x.clean_target, x.noise_target, x.timesteps, pipe.scheduler, c.snr_gamma,
                                   x.target_weights)
            out["loss_target"] = loss_t.detach()
            loss = loss_t
            if c.appearance_grad and c.exemplar_loss_weight > 0:
                loss_e = prediction_loss(eps_e, x.clean_exemplar, x.noise_exemplar, x.timesteps, pipe.scheduler, c.snr_gamma)
                out["loss_exemplar"] = loss_e.detach()
                loss = loss + c.exemplar_loss_weight * loss_e
        out["loss"] = loss
        out["dropped"] = float(drop)
        return out


class Stage1Task(PairTask):
    step_class = Stage1Step

    def trainable_prefixes(self) -> tuple[str, ...]:
        return ("unet.", "structure_net.", "text_embeds.")
