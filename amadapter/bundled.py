"""Where the weights shipped inside the package live, found through importlib.resources so that
an installed wheel finds them as well as a source checkout."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def toy_model_dir() -> Path:
    """The bundled toy-town AM-Adapter model (a save_pretrained folder)."""
    return Path(str(files("amadapter") / "weights" / "toy"))
