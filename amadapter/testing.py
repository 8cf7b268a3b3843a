"""A tiny preset-shaped config for fast tests (CPU, seconds): 32x32 images, stride 4.

Not a product preset (hence not in PRESETS). Its matcher aggregates on at most 8x8 per
side so that the 16x16 layers exercise the resize-aggregate-resize path.
"""
from __future__ import annotations

import contextlib

import numpy as np

from amadapter.presets import get_preset

TINY_SIZE = (32, 32)


def tiny_config(heads: int = 2) -> dict:
    p = get_preset("toy")
    p["name"] = "tiny"
    p["image_size"] = TINY_SIZE
    p["unet"].update(
        sample_size=(16, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(16, 32),
        cross_attention_dim=16, attention_head_dim=heads, norm_num_groups=8,
    )
    # A learned AutoencoderKL (SD1.5's kind) with SD's epsilon schedule, so tests keep that path covered.
    p["unet"].update(in_channels=4, out_channels=4)
    p["vae"] = dict(
        sample_size=TINY_SIZE, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, scaling_factor=0.18215,
    )
    p["scheduler"] = get_preset("sd15")["scheduler"]
    p["structure_net"].update(
        stem_channels=(8, 8, 16), stem_strides=(1, 1, 1), stem_groups=2, stage_channels=(16, 16),
        stage_groups=(4, 4), mid_groups=4, out_channels=16, time_proj_dim=16, time_embed_dim=16,
    )
    p["matcher"].update(num_heads=heads, max_side=8)
    p["text_embeds"].update(seq_len=2, cross_attention_dim=16)
    return p


def tiny_pipeline(seed: int = 0, heads: int = 2, **kwargs):
    from amadapter.pipeline import AMAdapterPipeline

    return AMAdapterPipeline.from_preset(tiny_config(heads), seed=seed, **kwargs)


def tiny_scene(seed: int = 0, size=TINY_SIZE, cars: int = 2):
    """(image uint8 HxWx3, label ids HxW, instance int32 HxW): sky, building, road, cars."""
    rng = np.random.default_rng(seed)
    h, w = size
    label = np.full((h, w), 23, np.uint8)  # sky
    label[h // 4 : h // 2] = 11  # building
    label[h // 2 :] = 7  # road
    instance = label.astype(np.int32)
    for k in range(cars):
        y = int(rng.integers(h // 2, h - 6))
        x = int(rng.integers(0, w - 8))
        label[y : y + 5, x : x + 8] = 26
        instance[y : y + 5, x : x + 8] = 26000 + k
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return image, label, instance


def make_tiny_sd15_folder(path, seed: int = 0, heads: int = 2):
    """Write a tiny random SD1.5-shaped diffusers folder (unet, vae, scheduler, text_encoder,
    tokenizer) for offline tests of :meth:`AMAdapterPipeline.from_sd15` and the importer."""
    import json
    from pathlib import Path

    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    cfg = tiny_config(heads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        UNet2DConditionModel(**dict(cfg["unet"], cross_attention_dim=32)).save_pretrained(path / "unet")
        AutoencoderKL(**cfg["vae"]).save_pretrained(path / "vae")
        # SD1.5 ships a PNDM config; from_sd15 must turn it into our DDIM settings
        PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      skip_prk_steps=True, steps_offset=1).save_pretrained(path / "scheduler")
        letters = "abcdefghijklmnopqrstuvwxyz<>"
        vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
        for ch in letters:
            vocab.setdefault(ch, len(vocab))
            vocab.setdefault(ch + "</w>", len(vocab))
        tok_dir = path / "tokenizer"
        tok_dir.mkdir(parents=True, exist_ok=True)
        (tok_dir / "vocab.json").write_text(json.dumps(vocab))
        (tok_dir / "merges.txt").write_text("#version: 0.2\n")
        CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77).save_pretrained(tok_dir)
        text_cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                  pad_token_id=1)
        CLIPTextModel(text_cfg).save_pretrained(path / "text_encoder")
    return path


@contextlib.contextmanager
def single_thread():
    """Run tiny models on one torch thread: a second one only adds sync overhead, and on a
    loaded shared machine it made the model tests 6x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
