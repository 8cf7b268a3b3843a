"""What stage 1 and stage 2 share: building the pipeline to train, and one noised pair.

Both stages train on (exemplar, target) pairs: the target latent is noised at a random
timestep t and the exemplar latent at the *same* t with its own noise, as the appearance net
sees the exemplar's trajectory at the step the generation net is at during sampling.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field, model_validator

from training.data import PairData, pair_batch
from training.history import continued_rows, write_history
from training.layout_weights import layout_cell_weights
from training.loop import TrainConfig, TrainConfigError, read_loss_log


class DiffusionConfig(TrainConfig):
    """Where the pipeline to train comes from (exactly one of the three, or a random toy VAE
    for tests): a trained amgen pipeline folder, a local SD1.5 folder, or the toy preset with
    the VAE from the VAE stage."""

    init_from: str | None = None      # amgen pipeline folder (AMAdapterPipeline.save_pretrained)
    sd15_dir: str | None = None       # local diffusers SD1.5 folder (preset sd15)
    vae_path: str | None = None       # toy: folder written by `amgen train vae` (runs/toy_vae/vae)
    allow_random_vae: bool = False    # tests only: train on an untrained VAE
    # Probability of drawing t from the noisiest 30% of the schedule instead of uniformly: the
    # sampler's first steps, where an untrained model leaves blotches the later steps keep.
    high_noise_bias: float = Field(0.0, ge=0.0, le=1.0)
    # The exemplar is noised at t_e = t * U(lo, hi) while the appearance net still runs at t.
    # Why: at sampling time its latents come from DDIM inversion, which keeps far more of the
    # image than random noise at the same t (measured on the toy model: correlation with the clean
    # latent 0.45 at t=901, where random noise leaves 0.12; about the level of random noise at
    # 0.6 t). Same-t noising (1, 1) hides that signal in training, so the generation net never
    # learns to read the exemplar's colours at the high-noise steps where they are decided.
    exemplar_t_fraction: tuple[float, float] = (1.0, 1.0)
    # Extra loss weight on the target's thing pixels and class / instance edges
    # (training/layout_weights.py): small objects cost what their labels claim.
    thing_weight: float = Field(0.0, ge=0.0)
    boundary_weight: float = Field(0.0, ge=0.0)
    # init_from is this stage's own export and its checkpoint is gone: carry on from the last step
    # its training log records (training/history.py), not from step 0.
    continue_from_init: bool = False

    @model_validator(mode="after")
    def _exemplar_t_fraction(self) -> "DiffusionConfig":
        lo, hi = self.exemplar_t_fraction
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"exemplar_t_fraction must satisfy 0 <= lo <= hi <= 1, got {self.exemplar_t_fraction}")
        return self

    @model_validator(mode="after")
    def _one_source(self) -> "DiffusionConfig":
        given = [k for k in ("init_from", "sd15_dir", "vae_path") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"give only one of init_from / sd15_dir / vae_path, got {given}")
        if not given and not self.allow_random_vae and not _lossless_latent(self.preset):
            raise ValueError("no starting point: set vae_path (toy, after `amgen train vae`), sd15_dir or init_from")
        if self.continue_from_init and not self.init_from:
            raise ValueError("continue_from_init needs init_from: the exported folder to carry on from")
        if self.sd15_dir and self.preset != "sd15":
            raise ValueError(f"sd15_dir given but preset is {self.preset!r}; set preset: sd15")
        return self


def _lossless_latent(preset: str) -> bool:
    """Whether the preset's autoencoder needs no training (pixel unshuffle)."""
    from amadapter.presets import get_preset

    try:
        return get_preset(preset)["vae"].get("_class") == "PixelUnshuffleAutoencoder"
    except KeyError:
        return False


def build_pipeline(config: DiffusionConfig, device: torch.device):
    """The AMAdapterPipeline a stage starts from, on ``device`` (all weights frozen; stages
    switch on what they train)."""
    from diffusers import AutoencoderKL

    from amadapter.pipeline import AMAdapterPipeline

    if config.init_from:
        _need_dir(config.init_from, "init_from")
        pipe = AMAdapterPipeline.from_pretrained(config.init_from)
    elif config.sd15_dir:
        _need_dir(config.sd15_dir, "sd15_dir")
        pipe = AMAdapterPipeline.from_sd15(config.sd15_dir, seed=config.seed)
    else:
        pipe = AMAdapterPipeline.from_preset(config.preset, seed=config.seed)
        if config.vae_path:
            _need_dir(config.vae_path, "vae_path")
            vae = AutoencoderKL.from_pretrained(config.vae_path)
            vae.requires_grad_(False)
            pipe.vae = vae.eval()
    return pipe.to(device)


def _need_dir(path: str, key: str) -> None:
    if not Path(path).is_dir():
        raise TrainConfigError(f"{key}: {path} is not a folder")


@dataclass
class NoisedPair:
    target: torch.Tensor        # noisy target latents (B, C, h, w)
    exemplar: torch.Tensor      # noisy exemplar latents, same t
    clean_target: torch.Tensor  # the latents before noising (the v and x0 targets need them)
    clean_exemplar: torch.Tensor
    noise_target: torch.Tensor
    noise_exemplar: torch.Tensor
    timesteps: torch.Tensor     # (B,); both nets run at these (the exemplar may be noised less)
    target_cond: torch.Tensor   # colourised maps (B, 3, H, W) for the structure net
    exemplar_cond: torch.Tensor
    target_weights: torch.Tensor | None = None  # (B, 1, h, w) loss weights per latent cell, or None


@torch.no_grad()
def encode(pipe, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> scaled latents (the posterior mean, as the sampler encodes)."""
    vae = pipe.vae
    return vae.encode(images.to(vae.dtype)).latent_dist.mean * vae.config.scaling_factor


def sample_timesteps(n: int, num_train_timesteps: int, high_noise_bias: float, generator: torch.Generator) -> torch.Tensor:
    t = torch.randint(0, num_train_timesteps, (n,), generator=generator)
    if high_noise_bias > 0:
        lo = int(0.7 * num_train_timesteps)
        high = torch.randint(lo, num_train_timesteps, (n,), generator=generator)
        t = torch.where(torch.rand(n, generator=generator) < high_noise_bias, high, t)
    return t


def exemplar_timesteps(t: torch.Tensor, fraction: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """t_e = round(t * U(lo, hi)) per sample (see DiffusionConfig.exemplar_t_fraction); t itself for (1, 1)."""
    lo, hi = fraction
    if (lo, hi) == (1.0, 1.0):
        return t
    u = lo + (hi - lo) * torch.rand(t.shape, generator=generator)
    return (t.float().cpu() * u).round().long().to(t.device)


def _noise(z_t: torch.Tensor, z_e: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's noise for both latents. On the CPU from the step's generator itself. On a GPU
    from a device generator seeded by one draw of it: the same for a (seed, step, rank) on a given
    device, though not the CPU's values; drawing 2 x 6.3 M values (batch 256) on the CPU took
    62-82 ms of a core (docs/performance.md), most of a step's budget at 3,000 samples/s."""
    if z_t.device.type == "cpu":
        return (torch.randn(z_t.shape, generator=generator).to(z_t),
                torch.randn(z_e.shape, generator=generator).to(z_e))
    device_gen = torch.Generator(device=z_t.device).manual_seed(int(torch.randint(2**62, (), generator=generator)))
    return tuple(torch.randn(z.shape, generator=device_gen, device=z.device).to(z.dtype) for z in (z_t, z_e))


def noised_pair(pipe, batch, generator: torch.Generator, high_noise_bias: float = 0.0,
                exemplar_t_fraction: tuple[float, float] = (1.0, 1.0),
                thing_weight: float = 0.0, boundary_weight: float = 0.0) -> NoisedPair:
    z_t = encode(pipe, batch["target_image"])
    z_e = encode(pipe, batch["exemplar_image"])
    B = z_t.shape[0]
    sched = pipe.scheduler
    # Draws from the step's generator (CPU), in this order, then to the device.
    t = sample_timesteps(B, sched.config.num_train_timesteps, high_noise_bias, generator)
    n_t, n_e = _noise(z_t, z_e, generator)
    t_e = exemplar_timesteps(t, exemplar_t_fraction, generator)
    t, t_e = t.to(z_t.device), t_e.to(z_t.device)
    return NoisedPair(
        target=sched.add_noise(z_t, n_t, t), exemplar=sched.add_noise(z_e, n_e, t_e),
        clean_target=z_t, clean_exemplar=z_e,
        noise_target=n_t, noise_exemplar=n_e, timesteps=t,
        target_cond=pipe.prepare_condition(batch["target_label"]),
        exemplar_cond=pipe.prepare_condition(batch["exemplar_label"]),
        target_weights=layout_cell_weights(batch["target_label"], batch["target_instance"], tuple(z_t.shape[-2:]),
                                           thing_weight, boundary_weight),
    )


def checkpointed(enabled: bool, fn, *args):
    """``fn(*args)``, as one non-reentrant activation checkpoint when ``enabled``.

    Why whole UNet passes and not diffusers' per-block ``unet.enable_gradient_checkpointing()``:
    the attention processors read the pipeline's AttentionState (recording / generating,
    exemplar tokens, matcher), which the pipeline sets only while a pass runs. Per-block
    recomputation happens later, during backward, with that state gone, and computes a different
    graph. Recomputing the whole pass re-enters the pipeline call, which sets the state again.
    """
    if not (enabled and torch.is_grad_enabled()):
        return fn(*args)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(fn, *args, use_reentrant=False)


class CheckpointSwitch:
    """Mixin for the stage modules: the loop's gradient_checkpointing switch."""

    checkpoint_passes = False

    def enable_gradient_checkpointing(self) -> None:
        self.checkpoint_passes = True


def _per_sample(err: torch.Tensor, cell_weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error per sample; ``cell_weights`` (B, 1, h, w) weigh the latent cells."""
    sq = err.pow(2)
    if cell_weights is not None:
        sq = sq * cell_weights.to(sq.device, sq.dtype)
    return sq.flatten(1).mean(1)


def eps_loss(pred: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, scheduler,
             snr_gamma: float | None, cell_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Epsilon MSE; with ``snr_gamma`` each sample is weighted min(SNR, gamma) / SNR (Min-SNR).

    Why: in epsilon space the high-noise steps have tiny losses, although their x0 errors are
    the largest; they are where the layout must come from the structure guidance. Down-weighting
    the easy low-noise steps gives them a larger share of the gradient (Hang et al., 2023).
    """
    per_sample = _per_sample(pred.float() - noise.float(), cell_weights)
    if snr_gamma is None:
        return per_sample.mean()
    from diffusers.training_utils import compute_snr

    # alpha_bar / (1 - alpha_bar), via square roots: equal to the direct quotient to float32
    # rounding (<= 3.5e-7 relative over all 1000 steps; tests/test_library_calls.py).
    snr = compute_snr(scheduler, timesteps.to(per_sample.device))
    weight = torch.clamp(snr, max=snr_gamma) / snr
    return (weight * per_sample).mean()


def prediction_loss(pred: torch.Tensor, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    scheduler, snr_gamma: float | None, cell_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The loss for the scheduler's ``prediction_type``: :func:`eps_loss` for "epsilon"; for
    "v_prediction" MSE against v = sqrt(a) eps - sqrt(1 - a) x0, with Min-SNR's v form
    min(SNR, gamma) / (SNR + 1) when ``snr_gamma`` is set; for "sample" MSE against x0 itself,
    Min-SNR weight min(SNR, gamma). ``cell_weights``: see training/layout_weights.py."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return eps_loss(pred, noise, timesteps, scheduler, snr_gamma, cell_weights)
    if kind == "v_prediction":
        target = scheduler.get_velocity(clean.float(), noise.float(), timesteps.to(clean.device))
    elif kind == "sample":
        target = clean.float()
    else:
        raise ValueError(f"prediction_type {kind!r} is not trained here (epsilon, v_prediction or sample)")
    per_sample = _per_sample(pred.float() - target, cell_weights)
    if snr_gamma is None:
        return per_sample.mean()
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps.to(per_sample.device))
    # Min-SNR in each parameterisation: the x0 error weighted by min(SNR, gamma)
    weight = torch.clamp(snr, max=snr_gamma) / (snr + 1 if kind == "v_prediction" else 1)
    return (weight * per_sample).mean()


def uniform(generator: torch.Generator) -> float:
    """One U(0,1) draw from the step's generator (exemplar dropout, granularity choice)."""
    return float(torch.rand((), generator=generator))


class PairTask:
    """The Task side stage 1 and stage 2 share: pairs from ``data`` (built by the caller, see
    training/sources.py), a pipeline folder as result. Subclasses give ``step_class`` (the module
    wrapping the pipeline) and ``trainable_prefixes``."""

    step_class: type

    def __init__(self, config: DiffusionConfig, data: PairData):
        self.config = config
        self.data = data

    def build(self, device: torch.device) -> torch.nn.Module:
        pipe = build_pipeline(self.config, device)
        if _lossless_latent(self.config.preset) and not self.config.init_from:
            fit_pixel_statistics(pipe, self.data, self.config.seed)
        return self.step_class(pipe, self.config)

    def batch(self, step: int, rank: int, world_size: int):
        return pair_batch(self.data, self.config.seed, step, rank, self.config.batch_size)

    def continued_rows(self) -> list[dict]:
        """Loss-log rows a restart from ``init_from`` carries on after (none for a fresh run)."""
        if not self.config.continue_from_init:
            return []
        return continued_rows(self.config.init_from, self.config.stage)

    def export(self, module, out_dir: Path) -> Path:
        path = export_pipeline(module.pipe, out_dir / "pipeline")
        write_history(path, self.config.stage, read_loss_log(out_dir / "loss.jsonl"), self.config.init_from,
                      self.config.continue_from_init)
        return path


def fit_pixel_statistics(pipe, data: PairData, seed: int, batches: int = 8, batch_size: int = 32) -> None:
    """Per-colour mean/std of the pixel-unshuffle latent from 256 training targets (deterministic
    in ``seed``; drawn from step indices the training loop never reaches)."""
    images = [pair_batch(data, seed, 10**9 + i, 0, batch_size)["target_image"] for i in range(batches)]
    pipe.vae.fit(torch.cat(images))


def export_pipeline(pipe, path: Path) -> Path:
    """Save the pipeline with every weight frozen and in eval mode (what from_pretrained gives)."""
    for m in (pipe.unet, pipe.vae, pipe.structure_net, pipe.matcher, pipe.text_embeds):
        m.eval().requires_grad_(False)
    return pipe.save_pretrained(path)
