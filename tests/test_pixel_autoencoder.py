"""The toy preset's lossless latent (pixel unshuffle) and the prediction losses trained on it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from amadapter.pixel_autoencoder import PixelUnshuffleAutoencoder


def _images(n=3, h=64, w=128, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_round_trip_is_exact_and_latents_are_whitened():
    x = torch.from_numpy(_images()).permute(0, 3, 1, 2).float() / 127.5 - 1
    ae = PixelUnshuffleAutoencoder().fit(x * 0.5 + 0.2)  # statistics of another distribution still invert exactly
    z = ae.encode(x).latent_dist.mean
    assert z.shape == (3, 48, 16, 32)
    torch.testing.assert_close(ae.decode(z).sample, x, atol=1e-6, rtol=0)
    fitted = PixelUnshuffleAutoencoder().fit(x)
    z = fitted.encode(x).latent_dist.mean
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.std()) - 1) < 1e-3
    assert torch.equal(fitted.encode(x).latent_dist.sample(), z)  # zero-variance posterior


def test_pipeline_round_trip_keeps_every_byte(tmp_path):
    from amadapter.pipeline import AMAdapterPipeline

    pipe = AMAdapterPipeline.from_preset("toy", seed=0)
    assert isinstance(pipe.vae, PixelUnshuffleAutoencoder) and pipe.vae_scale_factor == 4 and pipe.stride == 16
    assert pipe.unet.config.in_channels == pipe.vae.latent_channels == 48
    imgs = _images(2)
    pipe.vae.fit(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert np.array_equal(pipe.decode_latents(pipe.encode_images(imgs)), imgs)
    pipe.save_pretrained(tmp_path / "m")
    again = AMAdapterPipeline.from_pretrained(tmp_path / "m")
    assert isinstance(again.vae, PixelUnshuffleAutoencoder)
    assert torch.equal(again.vae.to_latent, pipe.vae.to_latent) and again.model_hash() == pipe.model_hash()
    assert np.array_equal(again.decode_latents(again.encode_images(imgs)), imgs)


def test_bad_shapes_name_the_problem():
    ae = PixelUnshuffleAutoencoder()
    with pytest.raises(ValueError, match=r"encode: expected \(N, 3, H, W\)"):
        ae.encode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="not a multiple of 4"):
        ae.encode(torch.zeros(1, 3, 10, 8))
    with pytest.raises(ValueError, match=r"decode: expected \(N, 48, H, W\)"):
        ae.decode(torch.zeros(1, 4, 8, 8))


def test_v_prediction_loss_and_its_min_snr_weights():
    from diffusers import DDIMScheduler
    from diffusers.training_utils import compute_snr

    from amadapter.presets import get_preset
    from training.diffusion import prediction_loss

    assert get_preset("toy")["scheduler"]["prediction_type"] == "sample"
    sched = DDIMScheduler(**{**get_preset("toy")["scheduler"], "prediction_type": "v_prediction"})
    g = torch.Generator().manual_seed(0)
    x0, noise, pred = (torch.randn(2, 48, 4, 8, generator=g) for _ in range(3))
    t = torch.tensor([10, 900])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = a.sqrt() * noise - (1 - a).sqrt() * x0  # the definition, written out
    per = (pred - v).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(prediction_loss(pred, x0, noise, t, sched, None), per.mean())
    snr = compute_snr(sched, t)
    weighted = prediction_loss(pred, x0, noise, t, sched, 5.0)
    torch.testing.assert_close(weighted, (torch.clamp(snr, max=5.0) / (snr + 1) * per).mean())
    # Min-SNR's v form weights both ends down (why the toy configs train plain v-MSE): the x0 error
    # gets weight min(SNR, gamma), tiny at high noise
    w = torch.clamp(snr, max=5.0) / (snr + 1)
    assert w[0] < 0.1 and w[1] < 0.05


def test_rebased_unet_predicts_the_same_thing_in_the_new_basis():
    from diffusers import UNet2DConditionModel

    from training.rebase import rebase_unet

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=6, out_channels=6, block_out_channels=(8, 16),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4).eval()
    a = torch.randn(6, 6) + 3 * torch.eye(6)   # z_old = a @ z_new, per cell
    z_new, t, states = torch.randn(2, 6, 8, 8), torch.tensor([10, 500]), torch.randn(2, 3, 8)
    with torch.no_grad():
        expected = torch.einsum("ij,njhw->nihw", torch.linalg.inv(a),
                                unet(torch.einsum("ij,njhw->nihw", a, z_new), t, states).sample)
        rebase_unet(unet, a)
        torch.testing.assert_close(unet(z_new, t, states).sample, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"need a \(6, 6\) matrix"):
        rebase_unet(unet, torch.eye(5))


def test_whitened_cells_decode_errors_at_their_own_scale():
    # The latent's channels are the cell's principal axes at unit variance, strongest first.
    rng = np.random.default_rng(0)
    flat = rng.uniform(-1, 1, (16, 3, 1, 1)) * np.ones((1, 1, 16, 32))
    grain = 0.02 * rng.standard_normal((16, 1, 16, 32))   # weak monochrome detail, as toy-town's
    x = torch.from_numpy(flat + grain).float()
    ae = PixelUnshuffleAutoencoder(factor=2).fit(x)
    z = ae.encode(x).latent_dist.mean
    stds = z.transpose(0, 1).flatten(1).std(1)
    assert torch.all(stds <= 1.0 + 1e-4) and float(stds[0]) > 0.99
    # a unit error in the last (weakest) channel moves pixels far less than one in the first
    def moved_by_unit_error(k: int) -> float:
        dz = torch.zeros_like(z[:1])
        dz[:, k] = 1.0
        return float((ae.decode(z[:1] + dz).sample - ae.decode(z[:1]).sample).abs().max())

    assert moved_by_unit_error(0) > 0.3
    assert moved_by_unit_error(-1) < 0.05
    again = PixelUnshuffleAutoencoder(factor=2).fit(x)   # signs fixed: a refit is identical
    assert torch.equal(again.to_latent, ae.to_latent)


def test_sample_prediction_loss_is_the_x0_error():
    from diffusers import DDIMScheduler
    from diffusers.training_utils import compute_snr

    from amadapter.presets import get_preset
    from training.diffusion import prediction_loss

    sched = DDIMScheduler(**{**get_preset("toy")["scheduler"], "prediction_type": "sample"})
    g = torch.Generator().manual_seed(1)
    x0, noise, pred = (torch.randn(2, 48, 4, 8, generator=g) for _ in range(3))
    t = torch.tensor([10, 900])
    per = (pred - x0).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(prediction_loss(pred, x0, noise, t, sched, None), per.mean())
    snr = compute_snr(sched, t)
    torch.testing.assert_close(prediction_loss(pred, x0, noise, t, sched, 5.0), (torch.clamp(snr, max=5.0) * per).mean())
    with pytest.raises(ValueError, match="prediction_type 'flow' is not trained here"):
        sched.register_to_config(prediction_type="flow")
        prediction_loss(pred, x0, noise, t, sched, None)
