"""Run and training presets: the YAML files shipped in the `configs` package.

A ``--config`` value is a path when it names an existing file (or looks like one), else a preset
name, with or without ``.yaml``. Presets are read through importlib.resources, so an installed
wheel finds them as well as a source checkout."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import yaml

PACKAGE = "configs"


class PresetNotFoundError(FileNotFoundError):
    pass


def preset_dir() -> Path:
    return Path(str(files(PACKAGE)))


def preset_names() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def describe(name: str) -> str:
    """The first comment line of a preset: what it is for."""
    for line in (preset_dir() / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def resolve_config(value: str | Path) -> Path:
    """A --config value -> the YAML file it means."""
    path = Path(value)
    if path.is_file():
        return path
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    looks_like_a_path = len(path.parts) > 1
    if not looks_like_a_path and name in preset_names():
        return preset_dir() / f"{name}.yaml"
    known = ", ".join(preset_names())
    raise PresetNotFoundError(f"{value}: no such config file, and no preset of that name (presets: {known})")


def is_run_config(name: str) -> bool:
    """Run presets have a `source` section; training presets a `stage`."""
    tree = yaml.safe_load((preset_dir() / f"{name}.yaml").read_text()) or {}
    return isinstance(tree, dict) and "source" in tree
