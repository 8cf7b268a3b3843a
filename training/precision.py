"""Mixed precision without re-casting weights at every use.

Under ``torch.autocast`` every conv and linear call casts its fp32 weight and bias to the compute
dtype. Autocast caches a cast only for trainable leaf weights used with grad enabled, so frozen
weights (a frozen UNet in stage 2, a VAE) are cast again at every call, every step, and so is
every weight in a ``no_grad`` pass (stage 1's appearance pass, before its grad-enabled
generation pass). :class:`CastOnce` hands each conv/linear layer its weights already in the
compute dtype: frozen ones cast once per run, trainable ones once per step (with the cast in the
graph, so gradients reach the fp32 weights the optimizer keeps). Autocast then finds nothing to
cast for them. The values are the ones autocast's own cast gives (the same rounding), so the
losses are bit-identical (tests/test_train_gpu_path.py).

The swap lasts only for the layer's own call (a forward pre-hook puts the cast tensor in, a
forward hook puts the parameter back), so code that reads a module's dtype from its parameters
(diffusers' ``ModelMixin.dtype``) still sees fp32.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

CAST_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # autocast's lower-precision ops on CPU and CUDA
_NAMES = ("weight", "bias")


class CastOnce:
    """``with cast.step(): forward and backward`` — conv/linear weights of ``module`` in ``dtype``."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        self.dtype = dtype
        self.layers = [m for m in module.modules() if isinstance(m, CAST_LAYERS)]
        self._frozen: dict[int, torch.Tensor] = {}
        self._trainable: dict[int, torch.Tensor] = {}
        self._saved: dict[int, dict[str, nn.Parameter]] = {}
        self._active = False
        self.casts = 0  # casts made so far (frozen + per-step); a test checks they stay once per step
        self._handles = []
        for layer in self.layers:
            self._handles.append(layer.register_forward_pre_hook(self._swap_in))
            self._handles.append(layer.register_forward_hook(self._swap_back, always_call=True))

    def _cast(self, p: nn.Parameter) -> torch.Tensor:
        store = self._trainable if p.requires_grad else self._frozen
        t = store.get(id(p))
        if t is None or t.device != p.device:
            self.casts += 1
            if p.requires_grad:
                with torch.enable_grad():  # in the graph even when the first use is a no_grad pass
                    t = p.to(self.dtype)
            else:
                t = p.detach().to(self.dtype)
            store[id(p)] = t
        return t

    def _swap_in(self, layer: nn.Module, args) -> None:
        if not self._active or id(layer) in self._saved:
            return
        params = {n: layer._parameters[n] for n in _NAMES
                  if layer._parameters.get(n) is not None and layer._parameters[n].dtype == torch.float32}
        if not params:
            return
        self._saved[id(layer)] = params
        for n, p in params.items():
            layer._parameters[n] = self._cast(p)

    def _swap_back(self, layer: nn.Module, args, output) -> None:
        params = self._saved.pop(id(layer), None)
        if params:
            layer._parameters.update(params)

    @contextlib.contextmanager
    def step(self):
        """One training step: trainable weights are cast at their first use in it and reused."""
        self._active = True
        try:
            yield
        finally:
            self._active = False
            self._trainable.clear()  # the optimizer is about to change them
            for layer in self.layers:
                self._swap_back(layer, None, None)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._frozen.clear()


def cast_once(module: nn.Module, mixed_precision: str, enabled: bool):
    """A :class:`CastOnce` for ``module`` under fp16/bf16 (None when off or in fp32)."""
    if not enabled or mixed_precision == "no":
        return None
    return CastOnce(module, torch.float16 if mixed_precision == "fp16" else torch.bfloat16)
