"""AMAdapterPipeline: exemplar-based semantic image synthesis on stock diffusers parts.

Components: ``unet`` (one UNet2DConditionModel serving as both the appearance net and the
generation net, which share weights), ``vae``, ``scheduler`` (DDIM), ``structure_net``
(hooked in after the UNet's first down block), ``matcher`` (the adapter) and
``text_embeds`` (fixed cond/uncond embeddings).

Sampling: the exemplar is VAE-encoded and DDIM-inverted; step by step the appearance net
denoises the exemplar trajectory and records its attn1 tokens (:meth:`encode_exemplar` ->
:class:`ExemplarBank`); the generation net then denoises any number of targets reading
that bank. Exemplars may have a different size from the targets (both must be
multiples of :attr:`stride`): the matching works across grids, nothing is resized.

It is a ``diffusers.DiffusionPipeline``: components are registered modules, ``save_pretrained``
writes diffusers' folder layout (``model_index.json`` naming ``["amadapter", "StructureNet"]``
etc.), and ``DiffusionPipeline.from_pretrained(folder)`` returns an AMAdapterPipeline once
this module is imported (diffusers resolves a pipeline class name on its own package, see
:func:`_register_with_diffusers`). Offloading, progress bars and ``callback_on_step_end``
behave as in diffusers' own pipelines.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMInverseScheduler, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import logging as diffusers_logging

from amadapter.attention import AttentionState, install_processors
from amadapter import folder_format
from amadapter.bank import DEFAULT_BANK_CACHE_BYTES, BankCache, ExemplarBank
from amadapter.cost import RELEASE_COLOUR, CostSpec
from amgen_core.labels import check_label_ids, colorize
from amadapter.matcher import Matcher
from amadapter.pixel_autoencoder import PixelUnshuffleAutoencoder
from amadapter.presets import get_preset
from amadapter.structure_net import StructureInjector, StructureNet
from amadapter.text_embeds import TextEmbeds

MODES = ("structure_only", "sa_aug", "am_adapter")
_MODEL_COMPONENTS = ("unet", "vae", "structure_net", "matcher", "text_embeds")
_CLASSES = {
    "unet": UNet2DConditionModel,
    "vae": AutoencoderKL,
    "scheduler": DDIMScheduler,
    "structure_net": StructureNet,
    "matcher": Matcher,
    "text_embeds": TextEmbeds,
}  # the order model_hash() reads them in: do not reorder


class InputError(ValueError):
    """An input the pipeline cannot use (shape, size, dtype, mode); the message names it."""


@dataclass
class AMAdapterOutput:
    images: np.ndarray  # (N, H, W, 3) uint8
    latents: torch.Tensor | None = None  # (N, C, h, w) final latents, before decoding


def _as_maps(maps, where: str, dtype=None) -> list[np.ndarray]:
    if maps is None:
        return None
    if isinstance(maps, np.ndarray) and maps.ndim == 2:
        maps = [maps]
    out = [np.asarray(m) for m in maps]
    if not out:
        raise InputError(f"{where}: no maps given")
    return out


def _deprecated_callback(callback):
    if callback is not None:
        warnings.warn("callback(i, n) is deprecated; use callback_on_step_end(pipe, i, t, callback_kwargs) "
                      "or pipe.set_progress_bar_config(...)", FutureWarning, stacklevel=4)  # past torch.no_grad's wrapper
    return callback


def autoencoder_from_config(config: Mapping):
    """A preset's ``vae`` entry -> the autoencoder it names (``_class``; AutoencoderKL by default)."""
    config = dict(config)
    kind = config.pop("_class", "AutoencoderKL")
    classes = {"AutoencoderKL": AutoencoderKL, "PixelUnshuffleAutoencoder": PixelUnshuffleAutoencoder}
    if kind not in classes:
        raise ValueError(f"vae: unknown autoencoder class {kind!r}; known: {sorted(classes)}")
    return classes[kind](**config)


def _register_with_diffusers(cls) -> None:
    """``DiffusionPipeline.from_pretrained`` looks a folder's ``_class_name`` up on the diffusers
    package itself; naming our class there lets it load our folders (after ``import amadapter``
    has made the components resolvable as ``["amadapter", ...]``)."""
    if getattr(diffusers, cls.__name__, None) is not cls:
        setattr(diffusers, cls.__name__, cls)


def _package_level(entry):
    """``("amadapter.structure_net", "StructureNet")`` -> ``("amadapter", "StructureNet")``: the
    package exports our component classes, so model_index.json need not name private modules."""
    if isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str) \
            and entry[0].startswith("amadapter.") and entry[1] in folder_format.PACKAGE_CLASSES:
        return ("amadapter", entry[1])
    return entry


class AMAdapterPipeline(DiffusionPipeline):
    # The UNet and the VAE are the big parts; the structure net, matcher and text embeddings are
    # small and are read outside their forward() (matcher.refine_, text_embeds.pair), which
    # accelerate's offload hooks would not see, so they stay on the accelerator.
    model_cpu_offload_seq = "unet->vae"
    _exclude_from_cpu_offload = ["structure_net", "matcher", "text_embeds"]
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL | PixelUnshuffleAutoencoder, scheduler: DDIMScheduler,
                 structure_net: StructureNet, matcher: Matcher, text_embeds: TextEmbeds, *,
                 preset: str | None = None, bank_cache_size: int | None = None,
                 bank_cache_bytes: int = DEFAULT_BANK_CACHE_BYTES):
        super().__init__()
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler, structure_net=structure_net,
                              matcher=matcher, text_embeds=text_embeds)
        self.register_to_config(preset=preset)
        self.preset = preset
        self.attn_state = AttentionState()
        self.attn_layers = install_processors(unet, self.attn_state)
        self.injector = StructureInjector(unet)
        self.bank_cache = BankCache(max_items=bank_cache_size, max_bytes=bank_cache_bytes)
        for module in self._torch_modules().values():
            module.eval()
            module.requires_grad_(False)

    def register_to_config(self, **kwargs):
        super().register_to_config(**{k: _package_level(v) for k, v in kwargs.items()})

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_preset(cls, name: str | Mapping, seed: int = 0, **kwargs) -> "AMAdapterPipeline":
        """Random-weight pipeline from ``PRESETS[name]`` (or a preset-shaped dict),
        deterministic in ``seed``."""
        p = get_preset(name) if isinstance(name, str) else dict(name)
        name = name if isinstance(name, str) else p.get("name")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(**p["unet"])
            vae = autoencoder_from_config(p["vae"])
            structure_net = StructureNet(**p["structure_net"])
            matcher = Matcher(**p["matcher"])
            te = dict(p["text_embeds"])
            text_embeds = TextEmbeds(**te)
        return cls(unet, vae, DDIMScheduler(**p["scheduler"]), structure_net, matcher, text_embeds,
                   preset=name, **kwargs)

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, **kwargs) -> "AMAdapterPipeline":
        """Load a model folder: diffusers' layout (what :meth:`save_pretrained` writes) through
        ``DiffusionPipeline.from_pretrained``, or the older amgen layout (``format_version: 1``).

        ``dtype`` None keeps fp32 (fp16 files are upcast exactly); ``kwargs`` go to the pipeline
        (``bank_cache_bytes``, ...) or, for the diffusers layout, to diffusers' loader."""
        path = Path(path)
        index = folder_format.read_index(path, cls.__name__)
        if folder_format.is_legacy(index):
            classes = dict(_CLASSES)
            if index["components"].get("vae") == PixelUnshuffleAutoencoder.__name__:
                classes["vae"] = PixelUnshuffleAutoencoder
            parts = folder_format.load_legacy_components(path, classes, dtype)
            pipe = cls(**parts, preset=index.get("preset"), **kwargs)
        else:
            folder_format.check_component_folders(path, index)
            if dtype is not None:
                kwargs[folder_format.dtype_kwarg()] = dtype
            # no accelerate meta-device init: the same tensors (and hash) whether accelerate is installed or not
            kwargs.setdefault("low_cpu_mem_usage", False)
            bar_was_on = diffusers_logging.is_progress_bar_enabled()
            diffusers_logging.disable_progress_bar()  # no "Loading pipeline components" bar, as before
            try:
                pipe = super().from_pretrained(str(path), **kwargs)
            finally:
                if bar_was_on:
                    diffusers_logging.enable_progress_bar()
        # Both loaders already gave every part ``dtype``; casting again would only make diffusers warn
        # that modules "should be kept in float32" (an empty list of them) on every load.
        return pipe.to(device, None if dtype is None or pipe.dtype == dtype else dtype)

    def save_pretrained(self, path, **kwargs) -> Path:
        """diffusers' layout: one folder per component (safetensors) and ``model_index.json``,
        which also records :meth:`model_hash` (as ``_model_hash``, which loaders skip)."""
        path = Path(path)
        super().save_pretrained(str(path), **kwargs)
        folder_format.finish_index(path, self.model_hash())
        return path

    @classmethod
    def from_sd15(cls, sd_dir, adapter_dir=None, *, device=None, dtype=None, seed: int = 0,
                  prompt: str | None = None, negative_prompt: str | None = None, **kwargs) -> "AMAdapterPipeline":
        """SD1.5 backbone from a local diffusers folder (unet/, vae/, scheduler/, text_encoder/,
        tokenizer/). The structure net and matcher come from ``adapter_dir`` (an amgen folder
        or one holding structure_net/ and matcher/), else random (seeded) from the sd15 preset.
        The prompt is encoded once here; no text encoder is kept."""
        from transformers import CLIPTextModel, CLIPTokenizer

        sd_dir = Path(sd_dir)
        for sub in ("unet", "vae", "scheduler", "text_encoder", "tokenizer"):
            if not (sd_dir / sub).is_dir():
                raise FileNotFoundError(f"{sd_dir / sub}: missing from the SD1.5 folder")
        p = get_preset("sd15")
        cast = {} if dtype is None else {folder_format.dtype_kwarg(): dtype}  # loaded in it: no fp32 copy first
        unet = UNet2DConditionModel.from_pretrained(sd_dir, subfolder="unet", **cast)
        vae = AutoencoderKL.from_pretrained(sd_dir, subfolder="vae", **cast)
        base = DDIMScheduler.from_pretrained(sd_dir, subfolder="scheduler")
        scheduler = DDIMScheduler.from_config(base.config, **{k: p["scheduler"][k] for k in
                                                              ("steps_offset", "clip_sample", "set_alpha_to_one")})
        tokenizer = CLIPTokenizer.from_pretrained(sd_dir, subfolder="tokenizer", local_files_only=True)
        encoder = CLIPTextModel.from_pretrained(sd_dir, subfolder="text_encoder", local_files_only=True)
        text_embeds = TextEmbeds.from_text_encoder(
            encoder, tokenizer,
            prompt if prompt is not None else p["text_embeds"]["prompt"],
            negative_prompt if negative_prompt is not None else p["text_embeds"]["negative_prompt"],
        )
        del encoder
        if adapter_dir is not None:
            adapter_dir = Path(adapter_dir)
            structure_net = StructureNet.from_pretrained(adapter_dir / "structure_net")
            matcher = Matcher.from_pretrained(adapter_dir / "matcher")
        else:
            heads = unet.config.attention_head_dim
            heads = heads[0] if isinstance(heads, (list, tuple)) else heads
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                sn_cfg = dict(p["structure_net"], out_channels=unet.config.block_out_channels[0])
                structure_net = StructureNet(**sn_cfg)
                matcher = Matcher(**dict(p["matcher"], num_heads=heads))
        pipe = cls(unet, vae, scheduler, structure_net, matcher, text_embeds, preset="sd15", **kwargs)
        return pipe.to(device, dtype)

    # ----------------------------------------------------------------- basics
    def _torch_modules(self) -> dict[str, torch.nn.Module]:
        return {n: getattr(self, n) for n in _MODEL_COMPONENTS}

    def to(self, *args, **kwargs) -> "AMAdapterPipeline":
        """diffusers' ``to`` (``to(device)``, ``to(dtype)``, ``to(device, dtype)``, keywords);
        ``to(None, None)`` changes nothing. Cached banks are dropped when anything moves."""
        if all(a is None for a in args) and kwargs.get("device") is None and kwargs.get("dtype") is None:
            return self
        args, kwargs = self._cast_quietly(args, kwargs)
        if args or kwargs.get("device") is not None or kwargs.get("dtype") is not None:
            kwargs.setdefault("silence_dtype_warnings", True)  # fp16 on CPU is how export.py saves fp16 files
            super().to(*args, **kwargs)
        self.bank_cache.clear()  # banks hold tensors of the old device/dtype
        return self

    def _cast_quietly(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Apply the dtype of a ``to`` call to the components here and return the call without it.

        diffusers' ``ModelMixin.to`` warns on every cast that "modules ... should be kept in
        float32: []", even for a model that keeps none (each of ours: one line per component
        and load). A component with such modules is left to diffusers' ``to``, warning and all."""
        rest, dtype = dict(kwargs), None
        if "dtype" in rest:
            dtype = rest.pop("dtype")
            device_args = args
        elif args and len(args) <= 2 and isinstance(args[-1], torch.dtype):
            dtype, device_args = args[-1], args[:-1]
        modules = [m for m in self.components.values() if isinstance(m, torch.nn.Module)]
        if dtype is None or any(getattr(m, "_keep_in_fp32_modules", None) for m in modules):
            return args, kwargs
        for m in modules:
            torch.nn.Module.to(m, dtype=dtype)
        return tuple(a for a in device_args if a is not None), rest

    @property
    def vae_scale_factor(self) -> int:
        if isinstance(self.vae, PixelUnshuffleAutoencoder):
            return self.vae.config.factor
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def stride(self) -> int:
        """Image sizes must be multiples of this (VAE factor x UNet downsampling)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def _device(self) -> torch.device:
        """Where inputs go: the accelerator under model CPU offload, else the UNet's device."""
        return self._execution_device

    def model_hash(self) -> str:
        """sha256 over every component's config and weights (names, dtypes, shapes, bytes)."""
        h = hashlib.sha256()
        for name in _CLASSES:
            comp = getattr(self, name)
            h.update(name.encode())
            config = {k: v for k, v in dict(comp.config).items() if not k.startswith("_")}  # no paths/versions
            # Options added after models were published leave the hash alone at their default:
            # the same weights with the same behaviour keep their identity.
            for key, default in getattr(comp, "_hash_neutral_defaults", {}).items():
                if config.get(key) == default:
                    config.pop(key)
            h.update(json.dumps(config, sort_keys=True, default=str).encode())
            if isinstance(comp, torch.nn.Module):
                for key, t in sorted(comp.state_dict().items()):
                    t = t.detach().cpu().contiguous()
                    h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
                    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    # ----------------------------------------------------------------- conversions
    def prepare_condition(self, label_ids) -> torch.Tensor:
        """Label ids (H, W) or (N, H, W) -> colourised maps (N, 3, H, W) in [0, 1], what the
        structure net reads (matching costs use the ids, never these colours)."""
        ids = label_ids.cpu().numpy() if torch.is_tensor(label_ids) else np.asarray(label_ids)
        if ids.ndim == 2:
            ids = ids[None]
        rgb = torch.from_numpy(colorize(ids)).permute(0, 3, 1, 2)
        return rgb.to(device=self._device, dtype=self.dtype) / 255.0

    @torch.no_grad()
    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> scaled latents (N, C, H/f, W/f); the posterior mean."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        x = x.to(device=self._device, dtype=self.dtype) / 127.5 - 1.0
        return self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        x = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.permute(0, 2, 3, 1).cpu().numpy()

    def _scheduler(self, num_inference_steps: int) -> DDIMScheduler:
        sched = DDIMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(num_inference_steps, device=self._device)
        return sched

    def _embeds(self, n: int, cfg: bool) -> tuple[torch.Tensor, int]:
        """Encoder states for n samples; with CFG [uncond x n ; cond x n]. Returns (states, cond_start)."""
        uncond, cond = self.text_embeds.pair()
        cond = cond.to(self.dtype).expand(n, -1, -1)
        if not cfg:
            return cond, 0
        return torch.cat([uncond.to(self.dtype).expand(n, -1, -1), cond]), n

    # ----------------------------------------------------------------- UNet passes (training-facing)
    def _unet(self, latents, timestep, states, guidance):
        with self.injector.guide(guidance, self.structure_net.config.scale):
            return self.unet(latents, timestep, encoder_hidden_states=states).sample

    def appearance_tokens(self, noisy_latents: torch.Tensor, timestep, exemplar_cond: torch.Tensor, *,
                          encoder_hidden_states: torch.Tensor | None = None, cond_start: int = 0,
                          grad: bool = False, guidance: torch.Tensor | None = None):
        """Appearance net: run the UNet on noisy exemplar latents (B, C, h, w) guided by the
        exemplar's colourised map (B, 3, H, W) and record every attn1 input.

        Returns (noise prediction, {layer: (B - cond_start, N, C) tokens}); tokens keep their
        graph when ``grad`` (stage-1 training through the shared UNet)."""
        if encoder_hidden_states is None:
            encoder_hidden_states, cond_start = self._embeds(noisy_latents.shape[0], cfg=False)
        if guidance is None:
            guidance = self.structure_net(exemplar_cond, timestep)
        with self.attn_state.recording(noisy_latents.shape[-2:], cond_start, keep_grad=grad,
                                       keep_uncond=self.matcher.config.release_compat) as rec:
            eps = self._unet(noisy_latents, timestep, encoder_hidden_states, guidance)
            tokens = dict(rec)
        return eps, tokens

    def generation_eps(self, noisy_latents: torch.Tensor, timestep, target_cond: torch.Tensor, *,
                       tokens: Mapping[str, torch.Tensor] | None = None, exemplar_hw=None,
                       mode: str = "am_adapter", cost: CostSpec | Callable | None = None,
                       encoder_hidden_states: torch.Tensor | None = None, cond_start: int = 0,
                       guidance: torch.Tensor | None = None) -> torch.Tensor:
        """Generation net: noise prediction for noisy target latents (B, C, h, w) guided by the
        target's colourised map, reading exemplar ``tokens`` (from :meth:`appearance_tokens`,
        batch 1 or B) in mode "sa_aug" or "am_adapter" (needs ``cost``: a CostSpec or a
        callable (q_grid, e_grid) -> (B or 1, Nq, Ne)); "structure_only" ignores tokens.
        ``exemplar_hw`` is the exemplar's latent size (default: the target's)."""
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}; choose one of {MODES}")
        if encoder_hidden_states is None:
            encoder_hidden_states, cond_start = self._embeds(noisy_latents.shape[0], cfg=False)
        if guidance is None:
            guidance = self.structure_net(target_cond, timestep)
        latent_hw = tuple(noisy_latents.shape[-2:])
        if mode == "structure_only" or tokens is None:
            if mode != "structure_only":
                raise InputError(f"mode {mode!r} needs exemplar tokens")
            return self._unet(noisy_latents, timestep, encoder_hidden_states, guidance)
        matcher = cost_fn = None
        if mode == "am_adapter":
            if cost is None:
                raise InputError("mode 'am_adapter' needs a matching cost")
            matcher = self.matcher
            cost_fn = cost
            if isinstance(cost, CostSpec):
                def cost_fn(q_hw, e_hw):
                    return cost.cost(q_hw, e_hw, device=noisy_latents.device, dtype=noisy_latents.dtype)
        with self.attn_state.generating(tokens, latent_hw, exemplar_hw or latent_hw, cond_start, matcher, cost_fn):
            return self._unet(noisy_latents, timestep, encoder_hidden_states, guidance)

    # ----------------------------------------------------------------- validation
    def _check_size(self, hw, where: str) -> None:
        s = self.stride
        if hw[0] == 0 or hw[1] == 0:
            raise InputError(f"{where}: empty ({hw[0]}x{hw[1]})")
        if hw[0] % s or hw[1] % s:
            raise InputError(f"{where}: size {hw[0]}x{hw[1]} is not a multiple of the model stride {s}")

    def _check_exemplar(self, image, label, instance) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        if image is None or label is None:
            raise InputError("exemplar: both exemplar_image and exemplar_label are required for this mode")
        image, label = np.asarray(image), np.asarray(label)
        if image.size == 0 or label.size == 0:
            raise InputError(f"exemplar: empty exemplar (image shape {image.shape}, label shape {label.shape})")
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"exemplar_image: expected HxWx3 uint8, got shape {image.shape} dtype {image.dtype}")
        label = check_label_ids(label, "exemplar_label")
        if image.shape[:2] != label.shape:
            raise InputError(f"exemplar: image is {image.shape[0]}x{image.shape[1]} but its label map is "
                             f"{label.shape[0]}x{label.shape[1]}")
        if instance is not None:
            instance = np.asarray(instance)
            if instance.shape != label.shape:
                raise InputError(f"exemplar_instance: shape {instance.shape} differs from the label map's {label.shape}")
        self._check_size(label.shape, "exemplar")
        return image, label, instance

    # ----------------------------------------------------------------- exemplar bank
    def guidance_memo(self, cond_map: torch.Tensor):
        """``guidance_at(t)``: the structure net's output on ``cond_map`` at t, computed once per t
        (inversion and the appearance pass visit the same timesteps)."""
        memo: dict[int, torch.Tensor] = {}

        def guidance_at(t):
            if int(t) not in memo:
                memo[int(t)] = self.structure_net(cond_map, t)
            return memo[int(t)]

        return guidance_at

    def _inverse_scheduler(self, sched: DDIMScheduler) -> DDIMInverseScheduler:
        """diffusers' DDIM inversion on the sampling scheduler's timesteps, starting from alpha 1
        (or alphas_cumprod[0], as ``set_alpha_to_one`` says) and never clipping x0. It takes
        epsilon (see :meth:`_epsilon_at`), whatever the model predicts."""
        inverse = DDIMInverseScheduler.from_config(self.scheduler.config, clip_sample=False, prediction_type="epsilon")
        inverse.set_timesteps(sched.num_inference_steps, device=sched.timesteps.device)
        if not torch.equal(inverse.timesteps.cpu(), sched.timesteps.flip(0).cpu()):
            raise ValueError(f"DDIM inversion timesteps {inverse.timesteps.tolist()} are not the sampling "
                             f"timesteps {sched.timesteps.tolist()} reversed (scheduler config mismatch)")
        return inverse

    def _invert(self, z0: torch.Tensor, guidance_at, sched: DDIMScheduler, on_step=None) -> torch.Tensor:
        """Deterministic DDIM inversion (uncond embedding, exemplar structure guidance) over the
        timesteps of ``sched`` in reverse. ``on_step(t, z)`` sees the latent after each step."""
        uncond, _ = self.text_embeds.pair()
        states = uncond.to(self.dtype).expand(z0.shape[0], -1, -1)
        inverse = self._inverse_scheduler(sched)
        z = z0
        for t in inverse.timesteps:
            eps = self._epsilon_at(self._unet(z, t, states, guidance_at(t)), t, z)
            z = inverse.step(eps, t, z).prev_sample
            if on_step is not None:
                on_step(int(t), z)
        return z

    def _epsilon_at(self, prediction: torch.Tensor, t, z: torch.Tensor) -> torch.Tensor:
        """The noise the model's output at timestep ``t`` implies for its input ``z``.

        Inversion evaluates the model at the next timestep t on a latent one step less noisy, and
        DDIMInverseScheduler would convert an x0 or v output with the *current* (lower) noise level:
        for an x0 model on the clean exemplar that divides its residual detail by sqrt(1 - alpha_0)
        = 0.03 and floods the inverted latent (bench/inversion_signal.py). Converting at t, the
        level the model assumed, gives what an epsilon model would have said."""
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return prediction
        a = self.scheduler.alphas_cumprod[int(t)].to(device=z.device, dtype=torch.float32)
        if kind == "sample":
            eps = (z.float() - a.sqrt() * prediction.float()) / (1 - a).sqrt()
        elif kind == "v_prediction":
            eps = a.sqrt() * prediction.float() + (1 - a).sqrt() * z.float()
        else:
            raise ValueError(f"DDIM inversion: prediction_type {kind!r} is not supported")
        return eps.to(prediction.dtype)

    @torch.no_grad()
    def encode_exemplar(self, image, label, instance=None, *, num_inference_steps: int = 20,
                        guidance_scale: float = 7.5, key=None, callback=None) -> ExemplarBank:
        """VAE encode, DDIM inversion and the step-locked appearance pass of one exemplar
        (``callback(i, n)`` after each appearance step: deprecated, kept for old callers).

        With ``key`` the bank is cached (bounded LRU) under (key, steps, guidance, size,
        device, dtype); change weights -> call ``pipe.bank_cache.clear()``."""
        image, label, instance = self._check_exemplar(image, label, instance)
        callback = _deprecated_callback(callback)
        cache_key = None
        if key is not None:
            cache_key = (key, int(num_inference_steps), float(guidance_scale), label.shape, str(self._device), str(self.dtype))
            hit = self.bank_cache.get(cache_key)
            if hit is not None:
                return hit
        sched = self._scheduler(num_inference_steps)
        cond_map = self.prepare_condition(label)
        guidance_at = self.guidance_memo(cond_map)
        z = self._invert(self.encode_images(image[None]), guidance_at, sched)
        cfg = guidance_scale > 1.0 and not self.text_embeds.identical_halves
        states, cond_start = self._embeds(1, cfg)
        tokens = []
        n = len(sched.timesteps)
        for i, t in enumerate(sched.timesteps):
            latents = torch.cat([z, z]) if cfg else z
            eps, rec = self.appearance_tokens(latents, t, cond_map, encoder_hidden_states=states,
                                              cond_start=cond_start, guidance=guidance_at(t))
            tokens.append(rec)
            if cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            if i + 1 < n:
                z = sched.step(eps, t, z).prev_sample
            if callback is not None:
                callback(i + 1, n)
        bank = ExemplarBank(
            timesteps=tuple(int(t) for t in sched.timesteps), tokens=tokens, label=label,
            instance=None if instance is None else np.asarray(instance), latent_hw=tuple(z.shape[-2:]),
            guidance_scale=float(guidance_scale), key=key,
        )
        if cache_key is not None:
            self.bank_cache.put(cache_key, bank)
        return bank

    # ----------------------------------------------------------------- sampling
    def initial_noise(self, seeds: Sequence[int], latent_hw) -> torch.Tensor:
        """One CPU generator per sample, so a sample never depends on its batch neighbours."""
        c = self.unet.config.in_channels
        noise = [torch.randn((c, *latent_hw), generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
        return torch.stack(noise).to(device=self._device, dtype=self.dtype)

    @torch.no_grad()
    def __call__(
        self,
        target_labels,
        exemplar_image=None,
        exemplar_label=None,
        *,
        bank: ExemplarBank | None = None,
        exemplar_instance=None,
        target_instances=None,
        instance_mapping: Mapping[int, Sequence[int]] | None = None,
        granularity: str = "class",
        seeds,
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        mode: str = "am_adapter",
        exemplar_guidance_end: float = 1.0,
        callback: Callable[[int, int], None] | None = None,
        exemplar_key=None,
        label_sampling: str = "majority",
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> AMAdapterOutput:
        """Sample one image per target label map (and seed), reading ``bank`` or the exemplar.

        ``callback_on_step_end(pipe, i, t, callback_kwargs)`` runs after each step with the
        tensors named in ``callback_on_step_end_tensor_inputs`` (``"latents"``); a dict it
        returns may replace them. ``callback(i, n)`` is the older progress hook (deprecated).

        ``exemplar_guidance_end`` is the fraction of steps that read the exemplar, counted from the
        noisiest, as diffusers' ``control_guidance_end``: colour is settled at the noisy steps,
        and the rest then draw the layout with plain self-attention (structure_only)."""
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise InputError(f"callback_on_step_end_tensor_inputs: {unknown} not among {self._callback_tensor_inputs}")
        callback = _deprecated_callback(callback)
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}; choose one of {MODES}")
        if not 0.0 <= exemplar_guidance_end <= 1.0:
            raise InputError(f"exemplar_guidance_end: {exemplar_guidance_end} is not within [0, 1]")
        targets = [check_label_ids(t, f"target_labels[{i}]") for i, t in enumerate(_as_maps(target_labels, "target_labels"))]
        hw = targets[0].shape
        for i, t in enumerate(targets):
            if t.shape != hw:
                raise InputError(f"target_labels[{i}]: size {t.shape} differs from target_labels[0]'s {hw}")
        self._check_size(hw, "target_labels")
        seeds = [int(s) for s in (seeds if isinstance(seeds, (Sequence, np.ndarray)) else [seeds])]
        if len(seeds) != len(targets):
            raise InputError(f"seeds: {len(seeds)} seeds for {len(targets)} targets")
        instances = _as_maps(target_instances, "target_instances")
        if instances is not None:
            if len(instances) != len(targets):
                raise InputError(f"target_instances: {len(instances)} maps for {len(targets)} targets")
            for i, m in enumerate(instances):
                if m.shape != hw:
                    raise InputError(f"target_instances[{i}]: shape {m.shape} differs from the label map's {hw}")

        cost = None
        if mode != "structure_only":
            if bank is None:
                bank = self.encode_exemplar(exemplar_image, exemplar_label, exemplar_instance,
                                            num_inference_steps=num_inference_steps,
                                            guidance_scale=guidance_scale, key=exemplar_key)
            elif bank.num_inference_steps != num_inference_steps:
                raise InputError(f"bank: made for {bank.num_inference_steps} steps, sampling asks for {num_inference_steps}")
            if mode == "am_adapter":
                ex_instance = bank.instance if exemplar_instance is None else np.asarray(exemplar_instance)
                cost = CostSpec(targets, bank.label, target_instances=instances, exemplar_instance=ex_instance,
                                granularity=granularity, instance_mapping=instance_mapping,
                                sampling=RELEASE_COLOUR if self.matcher.config.release_compat else label_sampling)

        sched = self._scheduler(num_inference_steps)
        n = len(targets)
        f = self.vae_scale_factor
        latent_hw = (hw[0] // f, hw[1] // f)
        z = self.initial_noise(seeds, latent_hw)
        cond_map = self.prepare_condition(np.stack(targets))
        cfg = guidance_scale > 1.0 and not (mode == "structure_only" and self.text_embeds.identical_halves)
        states, cond_start = self._embeds(n, cfg)
        steps = len(sched.timesteps)
        for i, t in enumerate(self.progress_bar(sched.timesteps)):
            latents = torch.cat([z, z]) if cfg else z
            reads = bank is not None and (i + 1) / steps <= exemplar_guidance_end
            eps = self.generation_eps(
                latents, t, cond_map, tokens=bank.tokens[i] if reads else None,
                exemplar_hw=bank.latent_hw if reads else None, mode=mode if reads else "structure_only",
                cost=cost if reads else None, encoder_hidden_states=states, cond_start=cond_start,
            )
            if cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            z = sched.step(eps, t, z).prev_sample
            if callback_on_step_end is not None:
                tensors = {"latents": z}
                returned = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
                z = (returned or {}).get("latents", z)
            if callback is not None:
                callback(i + 1, steps)
        images = self.decode_latents(z)
        self.maybe_free_model_hooks()
        return AMAdapterOutput(images=images, latents=z)


_register_with_diffusers(AMAdapterPipeline)
