"""The base model's speed options (amadapter/speed.py, model.channels_last / model.compile):
each applies on the CPU, changes no output beyond float tolerance, and at its default changes
nothing on the CPU at all."""
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from amadapter.attention import AMAttnProcessor
from amadapter.cost import CostSpec
from amadapter.speed import apply_speed_options
from amadapter.testing import single_thread, tiny_pipeline, tiny_scene
from pipeline.config import config_from_dict, config_hash

RUN = dict(seeds=[3], num_inference_steps=2, guidance_scale=3.0)


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def scene():
    image, label, _ = tiny_scene(0)
    _, target, _ = tiny_scene(1)
    return image, label, target


def _sample(pipe, scene, mode):
    image, label, target = scene
    return pipe([target], image, label, mode=mode, **RUN).latents


def test_attention_is_sdpa_everywhere():
    pipe = tiny_pipeline()
    for net in (pipe.unet, pipe.vae):
        procs = net.attn_processors.values()
        assert procs and all(isinstance(p, (AMAttnProcessor, AttnProcessor2_0)) for p in procs), net.__class__


def test_defaults_change_nothing_on_cpu(scene):
    pipe = tiny_pipeline()
    before = _sample(pipe, scene, "am_adapter")
    assert apply_speed_options(pipe) == {"channels_last": False, "compile": "off"}
    assert not pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(_sample(pipe, scene, "am_adapter"), before)


@pytest.mark.parametrize("mode", ["structure_only", "am_adapter"])
def test_channels_last_within_float_tolerance(scene, mode):
    pipe = tiny_pipeline()
    plain = _sample(pipe, scene, mode)
    hash_before = pipe.model_hash()
    assert apply_speed_options(pipe, channels_last=True)["channels_last"]
    for module in (pipe.unet.conv_in, pipe.vae.encoder.conv_in, pipe.structure_net.conv_out):
        assert module.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(_sample(pipe, scene, mode), plain, rtol=1e-4, atol=1e-4)
    assert pipe.model_hash() == hash_before


def test_compiled_unet_traces_hooks_and_processors(scene):
    """torch.compile of the UNet through dynamo (the "eager" backend: no C++ compiler needed):
    the structure hook, the recording and the adapter's attention run inside it (one appearance
    step and one am_adapter generation step), and the results match the uncompiled ones."""
    image, label, target = scene
    pipe = tiny_pipeline()
    bank = pipe.encode_exemplar(image, label, num_inference_steps=1)
    lat = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    states, cond_start = pipe._embeds(1, cfg=True)
    cost = CostSpec([target], label)

    def step():
        eps_a, tokens = pipe.appearance_tokens(lat, bank.timesteps[0], pipe.prepare_condition(label),
                                               encoder_hidden_states=states, cond_start=cond_start)
        eps_g = pipe.generation_eps(lat, bank.timesteps[0], pipe.prepare_condition(target), tokens=bank.tokens[0],
                                    mode="am_adapter", cost=cost, encoder_hidden_states=states, cond_start=cond_start)
        return eps_a, eps_g, tokens

    hash_before = pipe.model_hash()
    with torch.no_grad():
        plain = step()
        assert apply_speed_options(pipe, compile="default", compile_backend="eager")["compile"] == "default"
        assert pipe.unet._compiled_call_impl is not None and not pipe.attn_state.own_records
        torch._dynamo.reset()
        try:
            compiled = step()
        finally:
            torch._dynamo.reset()
    torch.testing.assert_close(compiled[:2], plain[:2], rtol=1e-5, atol=1e-5)
    assert compiled[2].keys() == plain[2].keys()
    torch.testing.assert_close(compiled[2], plain[2], rtol=1e-5, atol=1e-5)
    assert pipe.model_hash() == hash_before  # compiled in place: same module, same state dict


@pytest.mark.parametrize("mode,copies", [("reduce-overhead", True), ("default", False)])
def test_cuda_graphs_get_copies_of_recorded_tokens(mode, copies):
    """Under CUDA graphs a recorded token would be a buffer the next replay overwrites."""
    pipe = tiny_pipeline()
    apply_speed_options(pipe, compile=mode, compile_backend="eager")
    assert pipe.attn_state.own_records is copies
    _, label, _ = tiny_scene(0)
    lat = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # eagerly: the recording is the same function compiled or not
        pipe.unet._compiled_call_impl = None
        states, cond_start = pipe._embeds(1, cfg=True)
        _, tokens = pipe.appearance_tokens(lat, 500, pipe.prepare_condition([label, label]),
                                           encoder_hidden_states=states, cond_start=cond_start)
    # the conditional half of the batch: a view into the whole batch's buffer, or a copy of its own
    assert tokens and all((t.untyped_storage().nbytes() == t.nbytes) is copies for t in tokens.values())


def test_unknown_compile_mode_is_an_error():
    with pytest.raises(ValueError, match="compile: unknown mode 'fast'"):
        apply_speed_options(tiny_pipeline(), compile="fast")


def test_config_keys_reach_the_loader_and_hash_only_when_set():
    base = {"source": {"root": "x"}}
    cfg = config_from_dict(base)
    assert cfg.model.channels_last is None and cfg.model.compile == "off"
    explicit = config_from_dict(base, overrides=["model.channels_last=null", "model.compile=off"])
    assert explicit.model.compile == "off"  # YAML's off is false
    assert config_hash(explicit) == config_hash(cfg)  # runs made before the keys existed still resume
    assert config_from_dict(base, overrides=["model.compile=true"]).model.compile == "default"
    for flag in ("model.channels_last=true", "model.channels_last=false", "model.compile=reduce-overhead"):
        assert config_hash(config_from_dict(base, overrides=[flag])) != config_hash(cfg), flag
    with pytest.raises(ValueError, match="model.compile"):
        config_from_dict(base, overrides=["model.compile=fast"])

    from stages.synthesize import load_pipeline

    pipe, _ = load_pipeline({"path": "random:toy", "channels_last": True}, "cpu")
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    pipe, _ = load_pipeline({"path": "random:toy"}, "cpu")
    assert not pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
