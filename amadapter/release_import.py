"""Import the public AM-Adapter release's checkpoints into an amgen model folder.

The release ships three files: the fine-tuned SD1.5 UNet (a diffusers UNet state dict,
safetensors), the ControlNeXt structure net (safetensors) and the matcher (a torch .pth
of its ``OurModel``: three ``Encoder4D`` stacks for down/mid/up). Their key names were
read from the release's source (src/models/matching_module.py, its conv4d Encoder4D /
Conv4d, inference.py) and ControlNeXt's SD1.5 ControlNeXtModel; the tables below map
them onto ours. Any unexpected, missing or wrongly shaped key fails the import with a
message naming the file and the keys.

The imported matcher gets ``release_compat=True`` (saved in matcher/config.json, so it travels
with the weights): sampling then reproduces the release's inference, which these weights were
trained and tuned with (the down stack for every layer, one max over the CFG pair, the fixed
32x32 colour cost resized as a flattened matrix, the transposed cost, an fp16 bank; see
docs/architecture.md, "Release compatibility"). tests/fixtures/release_keys.json lists the
release's key names and shapes with the source lines they come from.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from amadapter.matcher import Matcher
from amadapter.presets import get_preset
from amadapter.structure_net import StructureNet

# ControlNeXt key prefix -> StructureNet key prefix (the layer layouts are the same).
CONTROLNEXT_PREFIXES = (
    ("time_embedding.", "time_embedding."),
    ("embedding.", "stem."),
    ("down_res.", "resnets."),
    ("down_sample.", "downsamplers."),
    ("mid_convs.0.", "mid."),
    ("mid_convs.1.", "conv_out."),
)
# Matcher: encoders.{block}.conv4d.{layer}.{0: Conv4d, 1: GroupNorm}.<...>
MATCHER_BLOCKS = {"0": "phi_down", "1": "phi_mid", "2": "phi_up"}
MATCHER_PARTS = {"0.query_conv": "query_conv", "0.supp_conv": "exemplar_conv"}
_MATCHER_KEY = re.compile(r"^encoders\.(\d+)\.conv4d\.(\d+)\.(0\.query_conv|0\.supp_conv|1)\.(weight|bias)$")


class ReleaseImportError(ValueError):
    """A release checkpoint whose keys or shapes do not fit the model."""


def _strip_module(sd: dict) -> dict:
    # checkpoints saved from DistributedDataParallel carry a "module." prefix
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def convert_controlnext_keys(sd: dict, source: str = "controlnext") -> dict:
    out, unknown = {}, []
    for key, value in _strip_module(sd).items():
        for theirs, ours in CONTROLNEXT_PREFIXES:
            if key.startswith(theirs):
                out[ours + key[len(theirs):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ReleaseImportError(f"{source}: unexpected keys {sorted(unknown)[:20]}")
    return out


def convert_matcher_keys(sd: dict, source: str = "matcher") -> dict:
    out, unknown = {}, []
    for key, value in _strip_module(sd).items():
        m = _MATCHER_KEY.match(key)
        if m is None or m.group(1) not in MATCHER_BLOCKS:
            unknown.append(key)
            continue
        block, layer, part, param = m.groups()
        name = f"norms.{layer}" if part == "1" else f"convs.{layer}.{MATCHER_PARTS[part]}"
        out[f"{MATCHER_BLOCKS[block]}.{name}.{param}"] = value
    if unknown:
        raise ReleaseImportError(f"{source}: unexpected keys {sorted(unknown)[:20]}")
    return out


def load_checked(module: torch.nn.Module, sd: dict, source: str) -> None:
    """load_state_dict, but every missing/unexpected/mis-shaped key is an error naming ``source``."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in set(sd) & set(own)
                    if tuple(sd[k].shape) != tuple(own[k].shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys {missing[:20]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys {unexpected[:20]}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (file vs model) {shapes[:20]}")
    if problems:
        raise ReleaseImportError(f"{source}: does not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


def _read(path, kind: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: release {kind} checkpoint not found")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ReleaseImportError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


def import_structure_net(sd: dict, source: str, out_channels: int = 320) -> StructureNet:
    """A ControlNeXt state dict -> a loaded StructureNet (sd15 preset, ``out_channels`` wide)."""
    structure_net = StructureNet(**dict(get_preset("sd15")["structure_net"], out_channels=out_channels))
    load_checked(structure_net, convert_controlnext_keys(sd, source), source)
    return structure_net


def import_matcher(sd: dict, source: str) -> Matcher:
    """An ``OurModel`` state dict -> a loaded Matcher with ``release_compat`` on (heads read
    from the first conv: its input channels are H + 1)."""
    m_sd = convert_matcher_keys(sd, source)
    first = m_sd.get("phi_down.convs.0.query_conv.weight")
    if first is None:
        raise ReleaseImportError(f"{source}: missing keys ['encoders.0.conv4d.0.0.query_conv.weight']")
    heads = first.shape[1] - 1
    matcher = Matcher(**dict(get_preset("sd15")["matcher"], num_heads=heads, cost_transposed=True, release_compat=True))
    load_checked(matcher, m_sd, source)
    return matcher


def import_release(unet_safetensors, controlnext_safetensors, matcher_pth, sd15_dir, out_dir):
    """Release checkpoints + a local SD1.5 diffusers folder -> an amgen model folder.

    Returns the loaded :class:`AMAdapterPipeline` (already saved to ``out_dir``)."""
    from amadapter.pipeline import AMAdapterPipeline

    pipe = AMAdapterPipeline.from_sd15(sd15_dir)
    load_checked(pipe.unet, _strip_module(_read(unet_safetensors, "UNet")), str(unet_safetensors))

    structure_net = import_structure_net(_read(controlnext_safetensors, "ControlNeXt"), str(controlnext_safetensors),
                                         out_channels=pipe.unet.config.block_out_channels[0])
    matcher = import_matcher(_read(matcher_pth, "matcher"), str(matcher_pth))

    pipe.structure_net = structure_net.eval().requires_grad_(False)
    pipe.matcher = matcher.eval().requires_grad_(False)
    pipe.preset = "sd15-release"
    pipe.save_pretrained(out_dir)
    return pipe
