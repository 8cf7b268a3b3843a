"""The run configuration: YAML validated by pydantic, with ``--set a.b=c`` overrides.

Every model forbids unknown keys, so a typo is an error rather than a silently ignored setting.
Errors are ``ConfigError`` and always name the file and the dotted key.

``config_hash`` fingerprints what decides the output bytes; where the output goes and how many
workers compute it are left out, so moving OUT or adding actors does not invalidate a resume.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from amgen_core.yaml_files import read_yaml_mapping


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


SourceKind = Literal["toytown", "cityscapes", "bdd100k", "folder", "parquet"]


class ToytownMake(_Strict):
    """How to create a toy-town tree at ``source.root`` when it is absent (toytown sources only)."""

    n: int = Field(96, ge=1)
    seed: int = 0
    domain: str | None = None  # None = mixed domains (toy-town draws one per scene)
    height: int = Field(64, ge=8)
    width: int = Field(128, ge=8)


class SourceConfig(_Strict):
    kind: SourceKind = "toytown"
    root: str
    split: str = "train"
    limit: int | None = Field(None, ge=1)  # first N items in the connector's (sorted) order
    options: dict[str, Any] = Field(default_factory=dict)  # extra keyword arguments of the connector
    make: ToytownMake | None = None  # toytown only: create the tree if root is missing

    @model_validator(mode="after")
    def _make_only_for_toytown(self) -> "SourceConfig":
        if self.make is not None and self.kind != "toytown":
            raise ValueError("'make' is only allowed for kind: toytown")
        return self


class ExemplarsConfig(_Strict):
    source: SourceConfig | None = None  # None: exemplars come from the target dataset itself
    index: str | None = None  # index folder; None: build one into OUT/index
    index_shards: int = Field(1, ge=1)  # shards when the index is built here
    k: int = Field(1, ge=1)  # exemplars per target = samples per target
    candidates: int = Field(32, ge=1)  # ANN candidates reranked exactly
    diversity: float = Field(0.0, ge=0.0, le=1.0)  # 0 = pure score, higher = more varied top-k
    filters: dict[str, Any] = Field(default_factory=dict)  # metadata equality filters, e.g. {domain: night}
    exclude_self: bool = True  # never use a target as its own exemplar
    retrieve_actors: int = Field(2, ge=1)  # retrieval actor pool: 1 to this many (each holds the index)


class HFlipOp(_Strict):
    op: Literal["hflip"] = "hflip"
    p: float = Field(0.5, ge=0.0, le=1.0)


def _check_range(scale: tuple[float, float], lowest: float, what: str) -> None:
    lo, hi = scale
    if not lowest <= lo <= hi <= 1.0:
        raise ValueError(f"scale must satisfy {lowest:g} <= low <= high <= 1 (mild {what} only)")


class CropOp(_Strict):
    """Crop a random window of ``scale`` of the area (same aspect), resized back to the output size."""

    op: Literal["random_resized_crop"] = "random_resized_crop"
    p: float = Field(1.0, ge=0.0, le=1.0)
    scale: tuple[float, float] = (0.8, 1.0)

    @model_validator(mode="after")
    def _range(self) -> "CropOp":
        _check_range(self.scale, 0.25, "crops")
        return self


class ZoomOutOp(_Strict):
    """Shrink around the centre by a factor in ``scale``; the border becomes ignore (0, unlabeled)."""

    op: Literal["zoom_out"] = "zoom_out"
    p: float = Field(0.5, ge=0.0, le=1.0)
    scale: tuple[float, float] = (0.9, 1.0)

    @model_validator(mode="after")
    def _range(self) -> "ZoomOutOp":
        _check_range(self.scale, 0.5, "zoom")
        return self


class BrightnessContrastOp(_Strict):
    """Photometric change of the target's own image (when it has one); labels are untouched."""

    op: Literal["brightness_contrast"] = "brightness_contrast"
    p: float = Field(0.5, ge=0.0, le=1.0)
    brightness: float = Field(0.1, ge=0.0, le=0.5)
    contrast: float = Field(0.1, ge=0.0, le=0.5)


AugmentOp = Annotated[Union[HFlipOp, CropOp, ZoomOutOp, BrightnessContrastOp], Field(discriminator="op")]


class AugmentConfig(_Strict):
    enabled: bool = True
    seed: int = 0  # mixed with each target id: every target has its own stable draw
    size: tuple[int, int] | None = None  # (H, W) of every target after augmentation; None = keep
    ops: list[AugmentOp] = Field(default_factory=lambda: [HFlipOp(), CropOp()])


class ModelConfig(_Strict):
    path: str = "toy"  # "toy" (bundled toy weights), "sd15" (sd15_dir + adapter_dir) or a saved folder
    sd15_dir: str | None = None  # local Stable Diffusion 1.5 (diffusers layout), path: sd15 only
    adapter_dir: str | None = None  # trained AM-Adapter parts for SD1.5, path: sd15 only
    device: Literal["cpu", "cuda", "auto"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    steps: int = Field(20, ge=1)
    guidance_scale: float = Field(7.5, ge=0.0)
    mode: Literal["am_adapter", "sa_aug", "structure_only"] = "am_adapter"
    # fraction of the steps, noisiest first, that read the exemplar; the rest draw the layout alone
    exemplar_guidance_end: float = Field(1.0, ge=0.0, le=1.0)
    granularity: Literal["class", "instance"] = "class"
    # speed options (amadapter/speed.py): channels-last weights, None = on for CUDA and off on CPU;
    # torch.compile of the UNet ("reduce-overhead" adds CUDA graphs), off until a GPU measures it
    channels_last: bool | None = None
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"

    @field_validator("compile", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        """YAML reads ``compile: off`` as false (and ``on`` as true)."""
        return {False: "off", True: "default"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _sd15_needs_dirs(self) -> "ModelConfig":
        if self.path == "sd15" and not self.sd15_dir:
            raise ValueError("path: sd15 needs sd15_dir (a local Stable Diffusion 1.5 folder)")
        return self


class SynthesisConfig(_Strict):
    actors: int = Field(1, ge=1)  # size of the model actor pool
    num_gpus: float = Field(0.0, ge=0.0)  # GPUs per actor
    num_cpus: float = Field(1.0, gt=0.0)  # CPUs per actor
    torch_threads: int | None = Field(None, ge=1)  # None: = num_cpus of the actor
    batch_size: int = Field(8, ge=1)  # targets per model call; a batch shares one exemplar
    prefetch_batches: int = Field(2, ge=0)  # loaded batches queued at each actor while it computes one
    allow_cpu_fallback: bool = False  # no GPU in the cluster: run on CPU instead of failing
    bank_cache_size: int = Field(64, ge=0)  # exemplar banks kept per actor at most (LRU)
    bank_cache_bytes: int = Field(2 << 30, ge=0)  # and their tensor bytes at most (2 GiB, as amadapter.bank)
    gpu_wait_s: float = Field(0.0, ge=0.0)  # autoscaling cluster: ask for the GPUs and wait this long


class ScoreConfig(_Strict):
    enabled: bool = False
    segmenter: str | None = None  # checkpoint of the scoring segmenter (evaluation)
    actors: int = Field(2, ge=1)  # scorer actors (each holds the segmenter), cut to the CPUs left


class GateConfig(_Strict):
    """The quality gate: samples whose rendering disagrees with their label leave the dataset for
    ``filtered/`` (stages/gate.py). Off by default; off, it is left out of the config hash, so a
    run without it writes the same bytes as before the key existed."""

    enabled: bool = False
    # judge_miou: the judge's mIoU (score.segmenter) on the sample vs its label; judge_thing_miou:
    # the same over the thing classes present (person, rider, vehicles), all classes if none
    metric: Literal["judge_miou", "judge_thing_miou"] = "judge_miou"
    # A sample scoring below this is filtered. Real toy-town night scenes score 0.33..0.71 (median
    # 0.55), the bundled model's night renderings 0.08..0.30 (median 0.21): docs/adaptation.md.
    threshold: float = Field(0.2, ge=0.0, le=1.0)
    # Also write label_trusted: each kept sample's label with the pixels the judge segments as
    # another class set to 0 (unlabeled, ignored in training). Off, it is left out of the hash.
    label_trusted: bool = False


class OutputConfig(_Strict):
    dir: str = "out"
    rows_per_shard: int = Field(64, ge=1)
    export_cityscapes: bool = False  # also write a Cityscapes-format tree under OUT/cityscapes
    preview: bool = True  # write preview.png
    preview_rows: int = Field(8, ge=1)
    license: str = "other"  # license field of the dataset card


class RayConfig(_Strict):
    address: str | None = None  # None: a local Ray (or RAY_ADDRESS under `ray job submit`)
    num_cpus: int | None = Field(None, ge=1)  # local Ray only; None = all cores
    max_restarts: int = Field(3, ge=0)  # restarts of a model actor whose process died (e.g. a CUDA error)
    max_task_retries: int = Field(3, ge=0)  # retries of a model batch after a machine failure (OOM, lost actor)
    # A plan of at most this many items (targets + exemplars to index) runs its stages in one Ray
    # task, without Ray Data: at that size the datasets' start (worker processes, their imports,
    # a retrieval actor pool) costs more than the work, and the model actors can load meanwhile.
    # 0: always Ray Data.
    inline_plan_max: int = Field(2048, ge=0)


class RunConfig(_Strict):
    name: str = "amgen"
    seed: int = 0  # base of every per-sample seed
    source: SourceConfig
    exemplars: ExemplarsConfig = Field(default_factory=ExemplarsConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    # Where the config came from, for error messages (not part of the config itself).
    _origin: str = "<config>"
    _set_by: dict[str, str] = {}  # dotted key -> the --set flag that gave it its value

    @property
    def origin(self) -> str:
        return self._origin

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{_blame(key, self._origin, self._set_by)}: {key}: {problem}")


# Keys that do not change a single output byte: where it goes, how it is computed in parallel.
_NOT_HASHED = {
    "name": None,
    "exemplars": {"retrieve_actors"},
    "score": {"actors"},
    "output": {"dir", "export_cityscapes", "preview", "preview_rows"},
    "ray": None,
    "synthesis": {"actors", "num_cpus", "num_gpus", "allow_cpu_fallback", "bank_cache_size", "bank_cache_bytes",
                  "gpu_wait_s", "prefetch_batches"},
}


# Keys added after runs were made, left out of the hash at their default so those runs still resume.
_HASH_NEUTRAL_DEFAULTS = {"model": {"channels_last": None, "compile": "off", "exemplar_guidance_end": 1.0},
                          "gate": {"label_trusted": False}}


def config_hash(cfg: RunConfig) -> str:
    data = cfg.model_dump(mode="json")
    if not cfg.gate.enabled:
        data.pop("gate")  # a gate that is off changes nothing: the hash of every older run holds
    for key, sub in _NOT_HASHED.items():
        if sub is None:
            data.pop(key, None)
        else:
            for k in sub:
                data[key].pop(k, None)
    for key, defaults in _HASH_NEUTRAL_DEFAULTS.items():
        for k, default in defaults.items():
            if key in data and data[key].get(k, default) == default:
                data[key].pop(k, None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _set_dotted(tree: dict, dotted: str, value: Any, where: str) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{where}: {'.'.join(parts[: i + 1])}: is not a section, cannot set {dotted}")
        node = nxt
    node[parts[-1]] = value


def _blame(key: str, where: str, set_by: dict[str, str]) -> str:
    """Who gave ``key`` its value: the --set flag for it (or for a section above it), else the file."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        flag = set_by.get(".".join(parts[:n]))
        if flag is not None:
            return f"--set {flag}"
    return where


def apply_overrides(tree: dict, overrides: list[str] | None, where: str,
                    set_by: dict[str, str] | None = None) -> dict:
    """Apply ``key=value`` flags to ``tree``; ``set_by`` (if given) records key -> flag for errors."""
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"--set {ov}: expected key=value")
        key, raw = ov.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"--set {ov}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {ov}: {key}: cannot parse the value ({e})") from e
        _set_dotted(tree, key, value, f"--set {ov}")
        if set_by is not None:
            set_by[key] = ov
    return tree


def _format_errors(err: ValidationError, where: str, set_by: dict[str, str] | None = None) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in _UNION_TAGS)) or "<root>"
        where_e = _blame(key, where, set_by or {})
        if e["type"] == "extra_forbidden":
            lines.append(f"{where_e}: {key}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"{where_e}: {key}: required key is missing")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{where_e}: {key}: {e['msg']}{got_s}")
    return "\n".join(lines)


# Discriminated-union tags that pydantic puts in error locations; they are not user keys.
_UNION_TAGS = {"hflip", "random_resized_crop", "zoom_out", "brightness_contrast"}


def config_from_dict(tree: dict, where: str = "<config>", overrides: list[str] | None = None) -> RunConfig:
    set_by: dict[str, str] = {}
    tree = apply_overrides(json.loads(json.dumps(tree)), overrides, where, set_by)
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, where, set_by)) from None
    cfg._origin = where
    cfg._set_by = set_by
    return cfg


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a YAML run config. Paths inside are checked by ``check_paths``."""
    tree = read_yaml_mapping(path, "config", error=ConfigError)
    return config_from_dict(tree, str(Path(path)), overrides)


def check_paths(cfg: RunConfig) -> None:
    """Paths must exist when a run starts (a toytown root with ``make`` may be created instead).
    Every path may be a URI (``s3://``, ``gs://``, ``file://``): connectors/storage.py."""
    from connectors.storage import as_path

    sources = [("source", cfg.source)]
    if cfg.exemplars.source is not None:
        sources.append(("exemplars.source", cfg.exemplars.source))
    for key, src in sources:
        if src.kind == "toytown" and src.make is not None:
            continue
        if not as_path(src.root).exists():
            raise cfg.error(f"{key}.root", f"path does not exist: {src.root}")
    if cfg.exemplars.index is not None and not as_path(cfg.exemplars.index).is_dir():
        raise cfg.error("exemplars.index", f"index folder does not exist: {cfg.exemplars.index}")
    m = cfg.model
    if m.path == "sd15":
        if not as_path(m.sd15_dir).is_dir():
            raise cfg.error("model.sd15_dir", f"folder does not exist: {m.sd15_dir}")
        if m.adapter_dir is not None and not as_path(m.adapter_dir).is_dir():
            raise cfg.error("model.adapter_dir", f"folder does not exist: {m.adapter_dir}")
    elif m.path != "toy" and not as_path(m.path).is_dir():
        raise cfg.error("model.path", f"model folder does not exist: {m.path}")
    if (cfg.score.enabled or cfg.gate.enabled) and cfg.score.segmenter is not None and not as_path(cfg.score.segmenter).exists():
        raise cfg.error("score.segmenter", f"path does not exist: {cfg.score.segmenter}")
