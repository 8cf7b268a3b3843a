"""The sampling pipeline on a tiny random-weight model (CPU, 32x32 / 32x48, 2 steps)."""
import numpy as np
import pytest
import torch
from torch import nn

from amadapter.cost import CostSpec
from amgen_core.labels import LabelError
from amadapter.pipeline import AMAdapterPipeline, InputError
from amadapter.testing import single_thread, tiny_pipeline, tiny_scene

STEPS = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def pipe():
    p = tiny_pipeline(seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        for norm in [n for m in (p.matcher.phi_down, p.matcher.phi_mid, p.matcher.phi_up) for n in m.norms]:
            nn.init.normal_(norm.weight, 1.0, 0.5)  # a non-trivial adapter
            nn.init.normal_(norm.bias, 0.0, 0.5)
    return p


@pytest.fixture(scope="module")
def scene():
    return tiny_scene(0)


def _unet_inputs(pipe, scene):
    image, label, _ = scene
    _, target, _ = tiny_scene(1)
    g = torch.Generator().manual_seed(0)
    ex_lat = torch.randn(1, 4, 16, 16, generator=g)
    tgt_lat = torch.randn(2, 4, 16, 16, generator=g)  # CFG layout [uncond ; cond]
    t = torch.tensor(500)
    with torch.no_grad():
        _, tokens = pipe.appearance_tokens(ex_lat, t, pipe.prepare_condition(label))
    states, cond_start = pipe._embeds(1, cfg=True)
    cost = CostSpec([target], label)
    kw = dict(encoder_hidden_states=states, cond_start=cond_start, cost=cost)
    return tgt_lat, t, pipe.prepare_condition(target), tokens, kw


def test_recorded_tokens_cover_every_self_attention(pipe, scene):
    _, label, _ = scene
    with torch.no_grad():
        _, tokens = pipe.appearance_tokens(torch.randn(1, 4, 16, 16), 10, pipe.prepare_condition(label))
    assert set(tokens) == set(pipe.attn_layers) and len(tokens) == 4
    assert tokens["down_blocks.0.attentions.0.transformer_blocks.0.attn1"].shape == (1, 256, 16)
    assert tokens["mid_block.attentions.0.transformer_blocks.0.attn1"].shape == (1, 64, 32)


@torch.no_grad()
def test_zeroed_adapter_equals_sa_aug_and_modes_differ(pipe, scene):
    lat, t, cond, tokens, kw = _unet_inputs(pipe, scene)
    sa = pipe.generation_eps(lat, t, cond, tokens=tokens, mode="sa_aug", **kw)
    with pipe.matcher.disabled():
        am0 = pipe.generation_eps(lat, t, cond, tokens=tokens, mode="am_adapter", **kw)
    am = pipe.generation_eps(lat, t, cond, tokens=tokens, mode="am_adapter", **kw)
    plain = pipe.generation_eps(lat, t, cond, mode="structure_only", **kw)
    torch.testing.assert_close(am0, sa, rtol=1e-5, atol=1e-5)
    assert (am[1] - sa[1]).abs().max() > 1e-3  # the adapter changes the conditional half
    assert (sa[1] - plain[1]).abs().max() > 1e-3  # exemplar tokens change it too
    # the unconditional half is plain self-attention in every mode
    torch.testing.assert_close(am[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sa[0], plain[0], rtol=1e-5, atol=1e-5)


def test_adapter_trains_through_generation_eps(pipe, scene):
    lat, t, cond, tokens, kw = _unet_inputs(pipe, scene)
    pipe.matcher.requires_grad_(True)
    try:
        eps = pipe.generation_eps(lat, t, cond, tokens=tokens, mode="am_adapter", **kw)
        eps.square().mean().backward()
        grads = [p.grad for p in pipe.matcher.phi_down.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    finally:
        pipe.matcher.requires_grad_(False)
        pipe.matcher.zero_grad(set_to_none=True)


def test_exemplar_reuse_equals_recompute_and_batch_equals_single(pipe, scene):
    """One bank serving a batch of two non-square targets == two separate full runs."""
    image, label, _ = scene
    targets = [np.concatenate([tiny_scene(s)[1], tiny_scene(s)[1][:, :16]], axis=1) for s in (1, 2)]  # 32x48
    steps = []
    bank = pipe.encode_exemplar(image, label, num_inference_steps=STEPS, guidance_scale=7.5)
    batch = pipe(targets, bank=bank, seeds=[3, 4], num_inference_steps=STEPS, guidance_scale=7.5,
                 callback=lambda i, n: steps.append((i, n)))
    assert batch.images.shape == (2, 32, 48, 3) and batch.images.dtype == np.uint8
    assert steps == [(1, STEPS), (2, STEPS)]
    for i, (target, seed) in enumerate(zip(targets, [3, 4])):
        single = pipe([target], image, label, seeds=[seed], num_inference_steps=STEPS, guidance_scale=7.5)
        torch.testing.assert_close(single.latents[0], batch.latents[i], rtol=1e-4, atol=1e-4)
        assert np.abs(single.images[0].astype(int) - batch.images[i]).max() <= 1


def test_same_seed_same_output_and_bank_cache(pipe, scene):
    image, label, _ = scene
    a = pipe(label, image, label, seeds=7, num_inference_steps=STEPS, mode="sa_aug", exemplar_key="ex0")
    b = pipe(label, image, label, seeds=7, num_inference_steps=STEPS, mode="sa_aug", exemplar_key="ex0")
    c = pipe(label, image, label, seeds=8, num_inference_steps=STEPS, mode="sa_aug", exemplar_key="ex0")
    assert np.array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    assert pipe.bank_cache.hits >= 2 and len(pipe.bank_cache) >= 1


def test_save_load_round_trip_is_bit_exact(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "m")
    loaded = AMAdapterPipeline.from_pretrained(tmp_path / "m")
    for name in ("unet", "vae", "structure_net", "matcher", "text_embeds"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys(), name
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{name}.{k}"
    assert loaded.model_hash() == pipe.model_hash()
    public = lambda cfg: {k: v for k, v in dict(cfg).items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(pipe.scheduler.config)
    assert loaded.preset == "tiny"
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        AMAdapterPipeline.from_pretrained(tmp_path)


def test_bad_inputs_raise_clear_errors(pipe, scene):
    image, label, _ = scene
    kw = dict(seeds=0, num_inference_steps=STEPS)
    with pytest.raises(InputError, match="image is 32x32 but its label map is 32x48"):
        pipe(label, image, np.zeros((32, 48), np.uint8), **kw)
    bad = label.copy()
    bad[0, 0] = 200
    with pytest.raises(LabelError, match=r"target_labels\[0\].*200"):
        pipe(bad, image, label, **kw)
    with pytest.raises(LabelError, match="exemplar_label.*200"):
        pipe(label, image, bad, **kw)
    with pytest.raises(InputError, match="not a multiple of the model stride 4"):
        pipe(label[:30], image, label, **kw)
    with pytest.raises(InputError, match="empty exemplar"):
        pipe(label, np.zeros((0, 0, 3), np.uint8), np.zeros((0, 0), np.uint8), **kw)
    with pytest.raises(InputError, match="exemplar_image and exemplar_label are required"):
        pipe(label, **kw)
    with pytest.raises(InputError, match="unknown mode"):
        pipe(label, image, label, mode="magic", **kw)
    with pytest.raises(InputError, match="2 seeds for 1 targets"):
        pipe(label, image, label, seeds=[1, 2], num_inference_steps=STEPS)
