"""Assemble trained parts into the bundled model folder, and draw a preview grid.

``assemble`` takes the stage-2 pipeline folder and, optionally, a fine-tuned VAE whose encoder
must be bit-identical to the pipeline's (a decoder-only fine-tune: the latent space the UNet
learned is unchanged). It writes an AMAdapterPipeline folder (safetensors), optionally in fp16
(from_pretrained upcasts them to fp32 unless given ``dtype``), checks the size
budget and that the folder loads back with the same model hash.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

from training.history import HISTORY_FILE

_ENCODER_PREFIXES = ("encoder.", "quant_conv.")


class ExportError(ValueError):
    """The parts cannot be assembled (mismatched VAE, size budget, unreadable folder)."""


def folder_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def assemble(pipeline_dir: str | Path, out_dir: str | Path, *, vae_dir: str | Path | None = None,
             fp16: bool = False, max_mb: float = 25.0) -> dict:
    from diffusers import AutoencoderKL

    from amadapter.pipeline import AMAdapterPipeline

    pipe = AMAdapterPipeline.from_pretrained(pipeline_dir)
    if vae_dir is not None:
        if not isinstance(pipe.vae, AutoencoderKL):
            raise ExportError(f"{pipeline_dir}: its autoencoder is a {type(pipe.vae).__name__} (lossless, no "
                              "decoder to fine-tune); --vae swaps in decoders of a learned AutoencoderKL only")
        vae = AutoencoderKL.from_pretrained(vae_dir)
        old, new = pipe.vae.state_dict(), vae.state_dict()
        differ = [k for k in old if k.startswith(_ENCODER_PREFIXES) and not torch.equal(old[k], new[k])]
        if differ or vae.config.scaling_factor != pipe.vae.config.scaling_factor:
            raise ExportError(f"{vae_dir}: its encoder or scaling factor differs from {pipeline_dir}/vae "
                              f"({len(differ)} encoder tensors differ); only a decoder-only fine-tune can be swapped in")
        pipe.vae = vae.eval().requires_grad_(False)
    if fp16:
        pipe.to(dtype=torch.float16)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    size = folder_bytes(tmp)
    if size > max_mb * 2**20:
        shutil.rmtree(tmp)
        raise ExportError(f"{out_dir}: {size / 2**20:.1f} MB exceeds the {max_mb} MB budget (try fp16)")
    # keep what else lives in the folder (the model card, pictures), replace the components
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in tmp.iterdir():
        target = out_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    tmp.rmdir()
    # the training history travels with the weights (model-card curves, continue_from_init)
    history = Path(pipeline_dir) / HISTORY_FILE
    if history.is_file():
        shutil.copyfile(history, out_dir / HISTORY_FILE)
    loaded = AMAdapterPipeline.from_pretrained(out_dir)  # upcasts fp16 files to fp32 (exactly)
    expected = pipe.to(dtype=torch.float32).model_hash()
    if loaded.model_hash() != expected:
        raise ExportError(f"{out_dir}: reloads with a different model hash")
    files = {str(p.relative_to(out_dir)): p.stat().st_size for p in sorted(out_dir.rglob("*.safetensors"))}
    return {"path": str(out_dir), "bytes": folder_bytes(out_dir), "safetensors": files,
            "model_hash": expected, "dtype": "float16" if fp16 else "float32"}  # hash as loaded (fp32)


def preview_grid(pipe, triples, path: str | Path, *, modes=("structure_only", "sa_aug", "am_adapter"),
                 num_inference_steps: int = 20, guidance_scale: float = 7.5, seed: int = 0, scale: int = 2,
                 mapping: bool = False) -> Path:
    """Rows: exemplar | target layout | ground truth | one column per mode. With ``mapping`` the
    am_adapter column uses the triple's vehicle instance map (controllable transfer)."""
    from PIL import Image

    from amgen_core.labels import colorize

    rows = []
    for i, tr in enumerate(triples):
        cells = [tr.exemplar_image, colorize(tr.target_label), tr.target_image]
        bank = None
        for mode in modes:
            if mode != "structure_only" and bank is None:
                bank = pipe.encode_exemplar(tr.exemplar_image, tr.exemplar_label, tr.exemplar_instance,
                                            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
            kwargs = {}
            if mode == "am_adapter" and mapping and tr.instance_map:
                inv: dict[int, list[int]] = {}
                for t_id, e_id in tr.instance_map.items():
                    inv.setdefault(int(e_id), []).append(int(t_id))
                kwargs = {"instance_mapping": inv, "target_instances": [tr.target_instance],
                          "exemplar_instance": tr.exemplar_instance}
            out = pipe(tr.target_label, bank=None if mode == "structure_only" else bank, mode=mode, seeds=[seed + i],
                       num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, **kwargs)
            cells.append(out.images[0])
        rows.append(np.concatenate(cells, axis=1))
    grid = np.concatenate(rows, axis=0)
    img = Image.fromarray(grid)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    img.save(path)
    return path
