"""Stage name -> (config class, task class). Imported lazily so `amgen train vae` never loads the UNet code."""
from __future__ import annotations

import importlib

_STAGES = {
    "vae": ("training.vae", "VaeConfig", "VaeTask"),
    "stage1": ("training.stage1", "Stage1Config", "Stage1Task"),
    "stage2": ("training.stage2", "Stage2Config", "Stage2Task"),
}

STAGE_NAMES = tuple(_STAGES)


def _lookup(stage: str, which: int):
    if stage not in _STAGES:
        raise ValueError(f"unknown training stage {stage!r}; known: {', '.join(_STAGES)}")
    module, *names = _STAGES[stage]
    return getattr(importlib.import_module(module), names[which])


def config_class(stage: str):
    return _lookup(stage, 0)


def task_class(stage: str):
    return _lookup(stage, 1)


def apply_override(data: dict, assignment: str, where: str = "--set") -> None:
    """``a.b=value`` into nested ``data``; the value is parsed as YAML (numbers, bools, lists)."""
    import yaml

    if "=" not in assignment:
        raise ValueError(f"{where}: expected key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"{where}: {key!r} goes through {p!r}, which is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def load_train_config(stage: str, path=None, overrides=(), **fields):
    """Read a YAML training config for ``stage``, apply ``key=value`` overrides and validate.
    Errors name the file and the bad key."""
    import pydantic

    from amgen_core.yaml_files import read_yaml_mapping

    data: dict = {}
    where = "config"
    if path is not None:
        where = str(path)
        data = read_yaml_mapping(path, "training config")
    if data.setdefault("stage", stage) != stage:
        raise ValueError(f"{where}: holds stage {data['stage']!r} but `train {stage}` was asked for")
    for a in overrides:
        apply_override(data, a)
    data.update({k: v for k, v in fields.items() if v is not None})
    try:
        return config_class(stage).model_validate(data)
    except pydantic.ValidationError as exc:
        raise ValueError(f"{where}: invalid {stage} training config:\n{exc}") from exc
