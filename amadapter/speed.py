"""Speed options for the base model: channels-last memory and ``torch.compile`` of the UNet.

* Attention is torch's ``scaled_dot_product_attention`` everywhere already (no option): the
  attn1 processors call it for plain attention, every other attention layer gets diffusers'
  ``AttnProcessor2_0`` (:func:`amadapter.attention.install_processors`), and the VAE's defaults to it.
* ``channels_last``: the UNet, the VAE and the structure net keep their 4D weights channels-last,
  so cuDNN runs the convolutions and group norms in NHWC without layout transposes. ``None``
  (the default) turns it on for CUDA and leaves it off on the CPU, whose outputs stay as they were.
* ``compile``: ``torch.compile`` of the UNet in place (``nn.Module.compile``: the module, its
  state dict and the model hash stay the same) with one of torch's modes; ``reduce-overhead``
  captures CUDA graphs for the fixed shapes of a run. The adapter's augmented attention and the
  appearance pass's recording run eagerly inside it (``torch.compiler.disable``): the matcher's
  cost look-ups are Python, and a recorded token must be a tensor of its own, not a CUDA graph
  output that the next replay overwrites. Off by default: no GPU measurement has chosen it yet.
"""
from __future__ import annotations

import torch

COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


def apply_speed_options(pipe, *, channels_last: bool | None = None, compile: str = "off",
                        compile_backend: str = "inductor") -> dict:
    """Apply the options to ``pipe`` (an AMAdapterPipeline, already on its device and dtype) and
    return what was applied: ``{"channels_last": bool, "compile": mode}``. ``compile_backend``
    is torch.compile's (tests trace with "eager", which needs no compiler)."""
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile: unknown mode {compile!r}; choose one of {COMPILE_MODES}")
    cuda = pipe.unet.device.type == "cuda"
    if channels_last is None:
        channels_last = cuda
    if channels_last:
        for module in (pipe.unet, pipe.vae, pipe.structure_net):
            module.to(memory_format=torch.channels_last)
    if compile != "off":
        # CUDA graphs replay into the same buffers: recorded tokens are copied out (see attention.py)
        pipe.attn_state.own_records = compile == "reduce-overhead"
        mode = {} if compile == "default" or compile_backend != "inductor" else {"mode": compile}
        pipe.unet.compile(backend=compile_backend, **mode)
    return {"channels_last": bool(channels_last), "compile": compile}
