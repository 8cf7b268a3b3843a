"""The sampling pipeline on a tiny random-weight model (CPU, 32x32 / 32x48, 2 steps)."""
import io

import numpy as np
import pytest
import torch
from torch import nn

from amadapter.bank import BankCache, ExemplarBank
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

    def on_step_end(p, i, t, tensors):
        assert p is pipe and set(tensors) == {"latents"} and tensors["latents"].shape == (2, 4, 16, 24)
        steps.append((i, int(t)))
        return {}

    bank = pipe.encode_exemplar(image, label, num_inference_steps=STEPS, guidance_scale=7.5)
    batch = pipe(targets, bank=bank, seeds=[3, 4], num_inference_steps=STEPS, guidance_scale=7.5,
                 callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
    assert batch.images.shape == (2, 32, 48, 3) and batch.images.dtype == np.uint8
    assert steps == [(0, bank.timesteps[0]), (1, bank.timesteps[1])]
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


def test_callbacks_progress_bar_and_the_deprecated_hook(pipe, scene):
    image, label, _ = scene
    kw = dict(seeds=[1], num_inference_steps=STEPS, mode="sa_aug", exemplar_key="ex-cb")
    plain = pipe(label, image, label, **kw)
    # a callback may replace the latents: zeroing them after the last step decodes zeros
    out = pipe(label, image, label, **kw, callback_on_step_end=lambda p, i, t, d: {"latents": d["latents"] * 0}
               if i == STEPS - 1 else {})
    assert torch.count_nonzero(out.latents) == 0
    assert np.array_equal(out.images, pipe.decode_latents(torch.zeros_like(plain.latents)))
    with pytest.raises(InputError, match="not among"):
        pipe(label, image, label, **kw, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["eps"])
    seen = []
    with pytest.warns(FutureWarning, match="callback"):
        again = pipe(label, image, label, **kw, callback=lambda i, n: seen.append((i, n)))
    assert seen == [(1, STEPS), (2, STEPS)] and np.array_equal(again.images, plain.images)
    bar = io.StringIO()
    pipe.set_progress_bar_config(file=bar, ncols=60)
    try:
        pipe(label, image, label, **kw)
    finally:
        pipe.set_progress_bar_config()
    assert f"{STEPS}/{STEPS}" in bar.getvalue()


def test_diffusers_pipeline_surface(pipe):
    from diffusers import DiffusionPipeline

    assert isinstance(pipe, DiffusionPipeline)
    assert sorted(pipe.components) == ["matcher", "scheduler", "structure_net", "text_embeds", "unet", "vae"]
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
    # every torch component is either offloaded in sequence or kept on the accelerator
    offloaded = pipe.model_cpu_offload_seq.split("->")
    modules = {k for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    assert sorted(offloaded + pipe._exclude_from_cpu_offload) == sorted(modules)
    assert pipe.to(None, None) is pipe


def test_model_cpu_offload_keeps_outputs(scene):
    """With accelerate, offloading (onto the CPU here, the only device a CPU test has) must not
    change a bit; without it, diffusers' ImportError must name accelerate."""
    import importlib.util

    image, label, _ = scene
    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(seeds=[2], num_inference_steps=STEPS)
    before = pipe(label, image, label, **kw)
    if importlib.util.find_spec("accelerate") is None:
        with pytest.raises(ImportError, match="accelerate"):
            pipe.enable_model_cpu_offload(device="cpu")
        return
    pipe.enable_model_cpu_offload(device="cpu")
    after = pipe(label, image, label, **kw)
    assert np.array_equal(before.images, after.images) and torch.equal(before.latents, after.latents)


def _bank(nbytes: int) -> ExemplarBank:
    tokens = [{"layer": torch.zeros(nbytes // 4, dtype=torch.float32)}]
    return ExemplarBank(timesteps=(1,), tokens=tokens, label=np.zeros((4, 4), np.uint8), instance=None,
                        latent_hw=(1, 1), guidance_scale=1.0)


def test_bank_cache_is_bounded_by_bytes_then_count():
    cache = BankCache(max_bytes=1000)
    for key in "abc":
        cache.put(key, _bank(400))
    assert len(cache) == 2 and cache.nbytes == 800 and cache.get("a") is None  # a was least recent
    assert cache.get("b") is not None  # b is now the most recent
    cache.put("d", _bank(400))
    assert cache.get("c") is None and cache.get("b") is not None and cache.get("d") is not None
    cache.put("huge", _bank(2000))  # larger than the whole budget: not kept, nothing evicted
    assert cache.get("huge") is None and len(cache) == 2
    assert (cache.hits, cache.misses) == (3, 3)
    counted = BankCache(max_items=1, max_bytes=10_000)
    counted.put("a", _bank(40))
    counted.put("b", _bank(40))
    assert len(counted) == 1 and counted.get("b") is not None
    off = BankCache(max_items=0)
    off.put("a", _bank(40))
    assert len(off) == 0
    with pytest.raises(ValueError, match="max_bytes"):
        BankCache(max_bytes=-1)


@pytest.mark.parametrize("kind", ["sample", "v_prediction"])
def test_inversion_reads_x0_and_v_models_at_the_timestep_they_ran_at(scene, kind):
    """DDIM inversion runs the model at t on a latent one step less noisy; an x0 or v output is
    turned into epsilon at t. Converted at the lower level instead (DDIMInverseScheduler's own
    conversion), an x0 model's residual is divided by sqrt(1 - alpha_0) = 0.03 and floods the latent."""
    p = tiny_pipeline(seed=0)
    p.scheduler.register_to_config(prediction_type=kind)
    image, label, _ = scene
    a = p.scheduler.alphas_cumprod[300]
    x0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    z = a.sqrt() * x0 + (1 - a).sqrt() * eps
    pred = x0 if kind == "sample" else a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(p._epsilon_at(pred, 300, z), eps, atol=1e-5, rtol=1e-5)
    sched = p._scheduler(4)
    guidance_at = p.guidance_memo(p.prepare_condition(label))
    with torch.no_grad():
        z0 = p.encode_images(image[None])
        inverted = p._invert(z0, guidance_at, sched)
    # random weights: the inverted latent stays at the scale of noise (the lower-level conversion
    # gave the x0 model a standard deviation of 13 here)
    assert float(inverted.std()) < 3.0


def test_exemplar_guidance_end_hands_the_last_steps_to_the_layout(pipe, scene):
    """end=1 is the default, end=0 is structure_only, and end=0.5 (of 2 steps) reads the
    exemplar at the first step only: it follows am_adapter there and structure_only after."""
    image, label, _ = scene
    _, target, _ = tiny_scene(1)
    bank = pipe.encode_exemplar(image, label, num_inference_steps=2, guidance_scale=1.0)

    def run(mode="am_adapter", **kw):
        first = []
        out = pipe([target], bank=bank, seeds=[3], num_inference_steps=2, guidance_scale=1.0, mode=mode,
                   callback_on_step_end=lambda p, i, t, x: first.append(x["latents"].clone()) or {}, **kw)
        return first[0], out.latents

    am_first, am = run()
    so_first, so = run("structure_only")
    half_first, half = run(exemplar_guidance_end=0.5)
    torch.testing.assert_close(run(exemplar_guidance_end=1.0)[1], am, rtol=0, atol=0)
    torch.testing.assert_close(run(exemplar_guidance_end=0.0)[1], so, rtol=0, atol=0)
    torch.testing.assert_close(half_first, am_first, rtol=0, atol=0)
    assert (half - am).abs().max() > 1e-4 and (half - so).abs().max() > 1e-4
    with pytest.raises(InputError, match="exemplar_guidance_end"):
        pipe([target], bank=bank, seeds=[3], num_inference_steps=2, exemplar_guidance_end=1.5)
