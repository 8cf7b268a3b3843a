"""The YAML presets shipped with amgen (package data, found with importlib.resources).

`amgen configs` lists them; `amgen run --config NAME` takes a preset name or a path."""
