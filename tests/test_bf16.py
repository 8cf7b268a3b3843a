"""bfloat16 inference on CPU: the tiny pipeline cast to bf16 runs every mode and stays close to fp32.

Tolerances come from measurements on this tiny random model (2 DDIM steps, 32x32, seeds 0-3,
class and instance granularity, CFG 7.5 and 1.0; 48 runs): max |latent difference| 0.26 with
latents up to |7.6| (bf16 keeps 8 significant bits: one step at 4..8 is 0.031), max |pixel
difference| 8 of 255, mean |pixel difference| at most 1.10. The bounds below leave about 2x.
"""
import numpy as np
import pytest
import torch
from torch import nn

from amadapter.pipeline import MODES
from amadapter.testing import single_thread, tiny_pipeline, tiny_scene

LATENT_ATOL = 0.5       # measured max 0.26
PIXEL_MAX = 16          # measured max 8
PIXEL_MEAN = 2.0        # measured max 1.10


def _pipe():
    p = tiny_pipeline(seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        for norm in [n for m in (p.matcher.phi_down, p.matcher.phi_mid, p.matcher.phi_up) for n in m.norms]:
            nn.init.normal_(norm.weight, 1.0, 0.5)  # a non-trivial adapter, as in test_model_pipeline
            nn.init.normal_(norm.bias, 0.0, 0.5)
    return p


@pytest.fixture(scope="module")
def outputs():
    image, label, instance = tiny_scene(0)
    _, target, target_instance = tiny_scene(1)
    out = {}
    with single_thread():
        for name, pipe in (("fp32", _pipe()), ("bf16", _pipe().to(dtype=torch.bfloat16))):
            bank = pipe.encode_exemplar(image, label, instance, num_inference_steps=2)
            out[name] = {"bank": bank}
            for mode in MODES:
                out[name][mode] = pipe([target], bank=bank, target_instances=[target_instance], seeds=[0],
                                       num_inference_steps=2, mode=mode, granularity="instance")
    return out


def test_bf16_really_runs_in_bf16(outputs):
    tokens = next(iter(outputs["bf16"]["bank"].tokens[0].values()))
    assert tokens.dtype == torch.bfloat16
    for mode in MODES:
        assert outputs["bf16"][mode].latents.dtype == torch.bfloat16
        assert outputs["fp32"][mode].latents.dtype == torch.float32


@pytest.mark.parametrize("mode", MODES)
def test_bf16_output_is_close_to_fp32(outputs, mode):
    a, b = outputs["fp32"][mode], outputs["bf16"][mode]
    torch.testing.assert_close(b.latents.float(), a.latents, rtol=0, atol=LATENT_ATOL)
    assert b.images.dtype == np.uint8 and b.images.shape == a.images.shape
    diff = np.abs(a.images.astype(np.int16) - b.images.astype(np.int16))
    assert diff.max() <= PIXEL_MAX and diff.mean() <= PIXEL_MEAN, (diff.max(), diff.mean())
    assert a.images.std() > 20  # the comparison is over a varied image, not a flat one


def test_bf16_keeps_the_modes_apart(outputs):
    """Each bf16 mode lands nearer its own fp32 output than any other mode's: mean |latent
    difference| measured 0.008-0.044 to its own mode, 0.069-0.18 to the others (seeds 0-2)."""
    for mode in MODES:
        b = outputs["bf16"][mode].latents.float()
        own = (b - outputs["fp32"][mode].latents).abs().mean()
        others = [(b - outputs["fp32"][m].latents).abs().mean() for m in MODES if m != mode]
        assert own < 0.1 and all(own < 0.8 * o for o in others), (mode, own, others)
