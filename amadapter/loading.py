"""One way from a model spec to a pipeline, shared by the synthesize stage and the evaluation runner.

Specs: ``"toy"`` (the bundled trained toy model; a random-weight toy model, seed 0, while the
package ships none), ``"random:<preset>"`` (random weights from a preset, seed 0: exercises the code,
measures nothing), ``"sd15"`` (a local SD1.5 diffusers folder plus optional adapter weights) or a
model folder (either on-disk layout, see :mod:`amadapter.folder_format`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amadapter.bundled import toy_model_dir
from amadapter.speed import apply_speed_options

RANDOM_PREFIX = "random:"


@dataclass
class LoadedModel:
    pipe: Any  # AMAdapterPipeline
    name: str  # what run manifests show: "toy", "toy-random", "sd15" or the folder's name


def bundled_toy_available(path: Path | None = None) -> bool:
    """True once the trained toy model has been saved into the package (see training/)."""
    return ((path or toy_model_dir()) / "model_index.json").is_file()


def load_model(spec: str | Path, *, device=None, dtype=None, sd15_dir=None, adapter_dir=None,
               channels_last: bool | None = None, compile: str = "off", **pipeline_kwargs) -> LoadedModel:
    """``spec`` -> the pipeline on ``device`` in ``dtype`` (None: as loaded, fp32) and its display
    name. ``channels_last`` and ``compile`` are the speed options of :mod:`amadapter.speed`
    (defaults: channels-last on CUDA only, no compile). ``pipeline_kwargs`` go to the pipeline
    (``bank_cache_size``, ``bank_cache_bytes``).
    A folder without ``model_index.json`` raises FileNotFoundError naming it."""
    loaded = _load(str(spec), device, dtype, sd15_dir, adapter_dir, pipeline_kwargs)
    apply_speed_options(loaded.pipe, channels_last=channels_last, compile=compile)
    return loaded


def _load(spec: str, device, dtype, sd15_dir, adapter_dir, pipeline_kwargs: dict) -> LoadedModel:
    from amadapter.pipeline import AMAdapterPipeline

    if spec == "toy":
        if bundled_toy_available():
            return LoadedModel(AMAdapterPipeline.from_pretrained(toy_model_dir(), device=device, dtype=dtype,
                                                                 **pipeline_kwargs), "toy")
        spec = RANDOM_PREFIX + "toy"
    if spec.startswith(RANDOM_PREFIX):
        preset = spec[len(RANDOM_PREFIX):]
        pipe = AMAdapterPipeline.from_preset(preset, seed=0, **pipeline_kwargs).to(device, dtype)
        return LoadedModel(pipe, f"{preset}-random")
    if spec == "sd15":
        if sd15_dir is None:
            raise ValueError("model 'sd15' needs sd15_dir (a local SD1.5 diffusers folder)")
        return LoadedModel(AMAdapterPipeline.from_sd15(sd15_dir, adapter_dir=adapter_dir, device=device, dtype=dtype,
                                                       **pipeline_kwargs), "sd15")
    return LoadedModel(AMAdapterPipeline.from_pretrained(spec, device=device, dtype=dtype, **pipeline_kwargs),
                       Path(spec).name)
