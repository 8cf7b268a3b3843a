"""Reading a YAML config file into a mapping, with errors that name the file."""
from __future__ import annotations

import os
from pathlib import Path


def read_yaml_mapping(path: str | os.PathLike, what: str = "config", error: type[Exception] = ValueError) -> dict:
    """The YAML file at ``path`` as a dict; a missing file, bad YAML or a non-mapping raises ``error``
    naming the file (``FileNotFoundError`` for a missing file when ``error`` is ValueError)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise (FileNotFoundError if error is ValueError else error)(f"{p}: {what} file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise error(f"{p}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise error(f"{p}: <root>: a {what} must be a mapping of keys, got {type(data).__name__}")
    return data
