"""AM-Adapter (exemplar-based semantic image synthesis) on diffusers.

The component classes are exported here because diffusers' loader resolves a model_index.json
entry ``["amadapter", "StructureNet"]`` as ``getattr(amadapter, "StructureNet")`` (on an already
imported ``amadapter``). Everything that pulls in torch/diffusers is imported only when asked,
so ``amadapter.presets`` stays cheap to import.
"""
from amadapter.presets import PRESETS, get_preset

__all__ = ["PRESETS", "get_preset", "AMAdapterPipeline", "AMAdapterOutput", "ExemplarBank", "InputError",
           "StructureNet", "Matcher", "TextEmbeds", "PixelUnshuffleAutoencoder", "load_model"]

_LAZY = {
    "AMAdapterPipeline": "amadapter.pipeline",
    "AMAdapterOutput": "amadapter.pipeline",
    "InputError": "amadapter.pipeline",
    "ExemplarBank": "amadapter.bank",
    "StructureNet": "amadapter.structure_net",
    "Matcher": "amadapter.matcher",
    "TextEmbeds": "amadapter.text_embeds",
    "PixelUnshuffleAutoencoder": "amadapter.pixel_autoencoder",
    "load_model": "amadapter.loading",
    # diffusers picks the load method of a ["amadapter", X] component by checking X against the
    # base classes it finds under their names on the same module (getattr(amadapter, "ModelMixin"))
    "ModelMixin": "diffusers.models.modeling_utils",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'amadapter' has no attribute {name!r}")
