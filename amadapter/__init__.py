"""AM-Adapter (exemplar-based semantic image synthesis) on diffusers."""
from amadapter.presets import PRESETS, get_preset

__all__ = ["PRESETS", "get_preset", "AMAdapterPipeline", "AMAdapterOutput", "ExemplarBank", "InputError"]


def __getattr__(name):
    # The pipeline pulls in diffusers; import it only when asked, so `amgen_core.labels`
    # and `amadapter.presets` stay cheap to import.
    if name in ("AMAdapterPipeline", "AMAdapterOutput", "InputError"):
        from amadapter import pipeline

        return getattr(pipeline, name)
    if name == "ExemplarBank":
        from amadapter.bank import ExemplarBank

        return ExemplarBank
    raise AttributeError(f"module 'amadapter' has no attribute {name!r}")
