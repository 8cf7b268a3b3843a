"""The two on-disk layouts of a model folder.

Current: diffusers' layout, what ``DiffusionPipeline.save_pretrained`` writes: ``model_index.json``
with ``_class_name``, ``_diffusers_version`` and ``name: [library, class]`` per component
(our own classes as ``["amadapter", "StructureNet"]``), one subfolder per component.

Legacy (``format_version: 1``, before the DiffusionPipeline port): the same subfolders, an index
with a ``components`` map of class names. Read only; saving always writes the current layout.
"""
from __future__ import annotations

import json
from pathlib import Path

LEGACY_FORMAT_VERSION = 1
# classes `amadapter` exports at package level so diffusers' loader can resolve them
PACKAGE_CLASSES = ("StructureNet", "Matcher", "TextEmbeds", "PixelUnshuffleAutoencoder")


def dtype_kwarg() -> str:
    """The name diffusers' from_pretrained takes a dtype under: ``dtype`` since it deprecated
    ``torch_dtype`` (mid 2026, recognisable by its resolver), ``torch_dtype`` before."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def read_index(path: Path, class_name: str) -> dict:
    index_file = Path(path) / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{index_file}: not an amgen model folder (model_index.json missing)")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{index_file}: not valid JSON ({e})") from None
    if index.get("_class_name") != class_name:
        raise ValueError(f"{index_file}: holds a {index.get('_class_name')!r}, not an {class_name}")
    return index


def is_legacy(index: dict) -> bool:
    return "components" in index and "format_version" in index


def component_names(index: dict) -> list[str]:
    """Components of a current-layout index: the ``name: [library, class]`` entries."""
    return [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2]


def check_component_folders(path: Path, index: dict) -> None:
    for name in component_names(index):
        if index[name][0] is not None and not (Path(path) / name).is_dir():
            raise FileNotFoundError(f"{Path(path) / name}: component folder missing")


def load_legacy_components(path: Path, classes: dict, dtype=None) -> dict:
    """The components of a legacy folder, loaded one by one as the old loader did."""
    version = json.loads((Path(path) / "model_index.json").read_text()).get("format_version")
    if version != LEGACY_FORMAT_VERSION:
        raise ValueError(f"{Path(path) / 'model_index.json'}: format_version {version!r} unsupported "
                         f"(this amgen reads {LEGACY_FORMAT_VERSION} and diffusers' layout)")
    parts = {}
    for name, klass in classes.items():
        sub = Path(path) / name
        if not sub.is_dir():
            raise FileNotFoundError(f"{sub}: component folder missing")
        if name == "scheduler":
            parts[name] = klass.from_pretrained(sub)
        else:  # no accelerate meta-device init, as the current-layout loader
            kw = {} if dtype is None else {dtype_kwarg(): dtype}
            parts[name] = klass.from_pretrained(sub, low_cpu_mem_usage=False, **kw)
    return parts


def finish_index(path: Path, model_hash: str) -> None:
    """After ``save_pretrained``: record the model hash (a private key, which diffusers' loader
    skips) and drop the machine-specific ``_name_or_path``, so the same weights always write the
    same index."""
    index_file = Path(path) / "model_index.json"
    index = json.loads(index_file.read_text())
    index.pop("_name_or_path", None)
    index["_model_hash"] = model_hash
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
