"""AM-Adapter (exemplar-based semantic image synthesis) on diffusers."""
from amadapter.presets import PRESETS, get_preset

__all__ = ["PRESETS", "get_preset"]
