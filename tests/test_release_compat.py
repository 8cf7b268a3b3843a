"""Imported release weights against the public release (cvlab-kaist/AM-Adapter @ 5e44fd4).

Part 1: the importer takes exactly the key names and shapes that the release's source defines
(tests/fixtures/release_keys.json, each entry citing its file and line).
Part 2: ``Matcher(release_compat=True)`` computes what the release's inference computes, checked
against float64 references and hand-derived numbers written from the release's definitions
(src/models/attention_processor.py:104-148, matching_module.py:91-97, conv4d.py:108-135,
pipeline_ours.py:1096-1099, mutual_self_attention_sa_aug.py:181,385); with release_compat off
nothing changes.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from amadapter.attention import UNCOND_SUFFIX, AMAttnProcessor, AttentionState
from amadapter.cost import RELEASE_COLOUR, CostSpec
from amadapter.matcher import Matcher, flat_resize
from amadapter.presets import get_preset
from amadapter.release_import import import_matcher, import_structure_net
from amadapter.testing import single_thread, tiny_pipeline, tiny_scene
from amadapter.text_embeds import TextEmbeds

FIXTURE = Path(__file__).parent / "fixtures" / "release_keys.json"
ROAD, SKY, STATIC = 7, 23, 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def release():
    return json.loads(FIXTURE.read_text())


def _synthetic(entries, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {e["key"]: torch.randn(e["shape"], generator=g) for e in entries}


def test_fixture_cites_the_release_source(release):
    assert release["repo"] == "cvlab-kaist/AM-Adapter" and len(release["commit"]) == 40
    for ckpt in release["checkpoints"].values():
        for e in ckpt.get("keys", ckpt.get("sample_keys")):
            assert e["source"] and all(":" in s and s.split(":")[-1].isdigit() for s in e["source"]), e


# ---------------------------------------------------------------- part 1: key names and shapes
def _matcher_destination(key):
    """Where a release OurModel key belongs: encoders.{0,1,2} are the down/mid/up stacks
    (matching_module.py:92-97); in each conv4d layer, Sequential item 0 is Conv4d (query_conv
    1x1 over the target dims, supp_conv 3x3 over the exemplar dims, conv4d.py:127-133) and
    item 1 the GroupNorm (conv4d.py:152)."""
    _, block, _, layer, *rest = key.split(".")
    stack = {"0": "phi_down", "1": "phi_mid", "2": "phi_up"}[block]
    if rest[0] == "1":
        return f"{stack}.norms.{layer}.{rest[1]}"
    part = {"query_conv": "query_conv", "supp_conv": "exemplar_conv"}[rest[1]]
    return f"{stack}.convs.{layer}.{part}.{rest[2]}"


def test_release_matcher_keys_land_where_they_belong(release):
    entries = release["checkpoints"]["matcher"]["keys"]
    sd = _synthetic(entries)
    matcher = import_matcher(sd, "matcher-25000.pth")
    assert matcher.config.num_heads == 8 and matcher.config.release_compat and matcher.config.cost_transposed
    ours = matcher.state_dict()
    dests = [_matcher_destination(e["key"]) for e in entries]
    assert sorted(dests) == sorted(ours)  # every key of ours filled, each exactly once
    for e, dest in zip(entries, dests):
        assert torch.equal(ours[dest], sd[e["key"]]), (e["key"], dest)


CONTROLNEXT_TO_OURS = (  # controlnext.py:27-87 -> amadapter/structure_net.py
    ("time_embedding.", "time_embedding."), ("embedding.", "stem."), ("down_res.", "resnets."),
    ("down_sample.", "downsamplers."), ("mid_convs.0.", "mid."), ("mid_convs.1.", "conv_out."),
)


def test_release_controlnext_keys_land_where_they_belong(release):
    entries = release["checkpoints"]["controlnext"]["keys"]
    sd = _synthetic(entries, seed=1)
    net = import_structure_net(sd, "model.safetensors", out_channels=320)
    ours = net.state_dict()
    dests = []
    for e in entries:
        theirs, mine = next((t, m) for t, m in CONTROLNEXT_TO_OURS if e["key"].startswith(t))
        dests.append(mine + e["key"][len(theirs):])
    assert sorted(dests) == sorted(ours)
    for e, dest in zip(entries, dests):
        assert torch.equal(ours[dest], sd[e["key"]]), (e["key"], dest)


def test_release_unet_keys_exist_in_the_sd15_unet_with_their_shapes(release):
    with torch.device("meta"):  # SD1.5 size, no memory
        unet = UNet2DConditionModel(**get_preset("sd15")["unet"])
    shapes = {k: list(v.shape) for k, v in unet.state_dict().items()}
    for e in release["checkpoints"]["unet"]["sample_keys"]:
        assert shapes.get(e["key"]) == e["shape"], e


def test_import_rejects_a_key_the_release_does_not_have(release):
    sd = _synthetic(release["checkpoints"]["matcher"]["keys"])
    sd["encoders.3.conv4d.0.1.weight"] = torch.zeros(16)
    with pytest.raises(ValueError, match=r"m.pth: unexpected keys \['encoders.3.conv4d.0.1.weight'\]"):
        import_matcher(sd, "m.pth")


# ---------------------------------------------------------------- part 2: float64 references
def release_phi64(sd, corr):
    """The release's Encoder4D forward on corr (B, C, hq, wq, hs, ws), float64, written from
    conv4d.py:108-135 and 159-170: per layer query_conv (1x1 over hq, wq) + supp_conv (3x3,
    zero padding 1, over hs, ws), GroupNorm(1) over the whole sample, ReLU. Reads encoders.0:
    the only stack the release's inference reaches."""
    x = corr
    for i in range(4):
        p = f"encoders.0.conv4d.{i}"
        qw, qb = sd[f"{p}.0.query_conv.weight"].double(), sd[f"{p}.0.query_conv.bias"].double()
        sw, sb = sd[f"{p}.0.supp_conv.weight"].double(), sd[f"{p}.0.supp_conv.bias"].double()
        hs, ws = x.shape[-2:]
        out = torch.einsum("oc,bcijkl->boijkl", qw[:, :, 0, 0], x) + qb.view(1, -1, 1, 1, 1, 1)
        xp = torch.nn.functional.pad(x, (1, 1, 1, 1))
        for dk in range(3):
            for dl in range(3):
                out = out + torch.einsum("oc,bcijkl->boijkl", sw[:, :, dk, dl], xp[..., dk : dk + hs, dl : dl + ws])
        out = out + sb.view(1, -1, 1, 1, 1, 1)
        flat = out.reshape(out.shape[0], -1)
        mean, var = flat.mean(1), flat.var(1, unbiased=False)
        out = (out - mean.view(-1, 1, 1, 1, 1, 1)) / torch.sqrt(var.view(-1, 1, 1, 1, 1, 1) + 1e-5)
        g, b = sd[f"{p}.1.weight"].double(), sd[f"{p}.1.bias"].double()
        x = torch.relu(out * g.view(1, -1, 1, 1, 1, 1) + b.view(1, -1, 1, 1, 1, 1))
    return x


def bilinear_matrix(n_out, n_in):
    """(n_out, n_in) weights of a 1D bilinear resize, align_corners=False (source index
    (d + 0.5) * n_in / n_out - 0.5, clamped at 0; the upper neighbour clamped at n_in - 1)."""
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for d in range(n_out):
        src = max((d + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = int(math.floor(src))
        i1 = min(i0 + 1, n_in - 1)
        w[d, i0] += 1 - (src - i0)
        w[d, i1] += src - i0
    return w


def release_refine64(sd, attn_ex, seg, cost_side, big_side):
    """attention_processor.py:119-148 for one target: attn_ex (2, H, N, N) exemplar logits of
    the [uncond, cond] rows, seg (S*S, S*S) the 32x32-style cost, rows exemplar, cols target.
    Returns the cond row's refined logits (H, N, N)."""
    _, H, N, _ = attn_ex.shape
    m = cost_side * cost_side
    if N != big_side * big_side:
        idx = [int(math.floor(r * m / N)) for r in range(N)]  # nearest on the flat index
        chan = seg[idx][:, idx]
        x, n = attn_ex, N
    else:
        w = bilinear_matrix(m, N)
        x, chan, n = w @ attn_ex @ w.T, seg, m
    side = int(math.isqrt(n))
    corr = torch.cat([x, chan.expand(2, 1, n, n)], dim=1).reshape(2, H + 1, side, side, side, side)
    out = release_phi64(sd, corr).reshape(2, H, n, n)
    refined = out - out.max() / 4  # one scalar: both rows, all heads
    refined[0] = 0
    if N == big_side * big_side:
        u = bilinear_matrix(N, m)
        refined = u @ refined @ u.T
    return (attn_ex + refined)[1]


def _release_matcher(heads=2, seed=0, cost_side=4, big_side=8):
    entries = []
    levels = (heads + 1, 16, 32, 16, heads)
    for b in range(3):
        for i in range(4):
            a, c = levels[i], levels[i + 1]
            p = f"encoders.{b}.conv4d.{i}"
            entries += [{"key": f"{p}.0.query_conv.weight", "shape": [c, a, 1, 1]},
                        {"key": f"{p}.0.query_conv.bias", "shape": [c]},
                        {"key": f"{p}.0.supp_conv.weight", "shape": [c, a, 3, 3]},
                        {"key": f"{p}.0.supp_conv.bias", "shape": [c]},
                        {"key": f"{p}.1.weight", "shape": [c]}, {"key": f"{p}.1.bias", "shape": [c]}]
    # the last GroupNorm's gain x 10 spreads phi's output, so that rows' peaks differ visibly
    sd = {k: v * (5.0 if ".conv4d.3.1.weight" in k else 0.5) for k, v in _synthetic(entries, seed).items()}
    m = import_matcher(sd, "test.pth")
    m.release_cost_side, m.release_resized_side = cost_side, big_side  # small grids, same rules
    return m, sd


@pytest.mark.parametrize("side", [4, 2, 8])  # native cost grid, flat-nearest cost, flat-bilinear logits
def test_release_refinement_equals_float64_reference(side):
    m, sd = _release_matcher()
    g = torch.Generator().manual_seed(side)
    N = side * side
    seg = (torch.rand(16, 16, generator=g) > 0.6).double()  # rows exemplar, cols target; asymmetric
    for trial in range(20):  # a case where the uncond row holds the peak (else point 2 goes untested)
        attn = torch.randn(2, 2, N, N, generator=g, dtype=torch.float64) * 3
        attn[0] = attn[0] * (1 + trial)
        both = release_refine64(sd, attn, seg, 4, 8)
        cond_only = release_refine64(sd, torch.stack([attn[1], attn[1]]), seg, 4, 8)
        if (both - cond_only).abs().max() > 1e-3:
            break
    else:
        pytest.fail("no case found where the unconditional row sets the max")
    logits = attn[1:].float().clone()
    cost_fn = lambda q, e: seg.T.float()[None]  # noqa: E731 (ours: rows target, cols exemplar)
    m.refine_(logits, cost_fn, (side, side), (side, side), "up", uncond_logits=attn[:1].float())
    torch.testing.assert_close(logits[0].double(), both, rtol=1e-4, atol=1e-4)
    assert (logits[0].double() - cond_only).abs().max() > 1e-3  # the uncond row mattered


def test_every_block_runs_the_down_stack():
    m, _ = _release_matcher()
    with torch.no_grad():
        for block in ("mid", "up"):
            for p in m.phi(block).parameters():
                p.fill_(float("nan"))  # never read
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 2, 16, 16, generator=g)
    cost_fn = lambda q, e: torch.ones(1, 16, 16)  # noqa: E731
    outs = []
    for block in ("down", "mid", "up"):
        x = base[1:].clone()
        m.refine_(x, cost_fn, (4, 4), (4, 4), block, uncond_logits=base[:1])
        outs.append(x)
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_one_max_over_all_heads_by_hand():
    """Last GroupNorm weight 0, biases (0.2, 0.6): phi is 0.2 on head 0 and 0.6 on head 1 everywhere.
    Release: one max 0.6 -> residuals 0.2 - 0.15 = 0.05 and 0.45. Ours: a max per head -> 0.15, 0.45."""
    m, sd = _release_matcher()
    with torch.no_grad():
        for stack in (m.phi_down, m.phi_mid, m.phi_up):
            stack.norms[-1].weight.zero_()
            stack.norms[-1].bias.copy_(torch.tensor([0.2, 0.6]))
    ours = Matcher(num_heads=2, max_side=4)
    ours.load_state_dict(m.state_dict())
    cost_fn = lambda q, e: torch.ones(1, q[0] * q[1], e[0] * e[1])  # noqa: E731
    for matcher, expected in ((m, (0.05, 0.45)), (ours, (0.15, 0.45))):
        x = torch.zeros(1, 2, 16, 16)
        matcher.refine_(x, cost_fn, (4, 4), (4, 4), "down", uncond_logits=torch.zeros(1, 2, 16, 16))
        torch.testing.assert_close(x[0, 0], torch.full((16, 16), expected[0]))
        torch.testing.assert_close(x[0, 1], torch.full((16, 16), expected[1]))


def test_flat_resizes_scramble_cells_by_hand():
    # nearest, 16 cells (4x4) -> 4 (2x2): row r reads flat cell floor(r * 16 / 4) = 4r
    seg = torch.arange(16.0)[:, None] * 100 + torch.arange(16.0)[None, :]
    near = flat_resize(seg, 4, "nearest")
    assert near.tolist() == [[0, 4, 8, 12], [400, 404, 408, 412], [800, 804, 808, 812], [1200, 1204, 1208, 1212]]
    # so the 2x2 cell (0, 1) reads the 4x4 cell (1, 0) (flat 4), not (0, 2) (flat 2) as a grid resize would
    # bilinear, 64 tokens (8x8 layer) -> 16: index d reads 0.5 * (x[4d + 1] + x[4d + 2])
    x = torch.arange(64.0)[:, None] * 1000 + torch.arange(64.0)[None, :]
    down = flat_resize(x, 16, "bilinear")
    assert down[0, 0] == 1501.5 and down[1, 2] == 5509.5
    expected = (4 * torch.arange(16.0) + 1.5)[:, None] * 1000 + (4 * torch.arange(16.0) + 1.5)[None, :]
    assert torch.equal(down, expected)
    # and back: 16 -> 64 reads the source index d / 4 - 0.375, clamped to [0, 15]
    y = torch.arange(16.0)[:, None] * 100 + torch.arange(16.0)[None, :]
    up = flat_resize(y, 64, "bilinear").double()
    s = (torch.arange(64.0, dtype=torch.float64) / 4 - 0.375).clamp(0, 15)
    torch.testing.assert_close(up, s[:, None] * 100 + s[None, :], rtol=0, atol=1e-4)


def test_release_colour_cost_by_hand():
    """4x4 maps -> 2x2 grid: bilinear at factor 2 averages each 2x2 block; cells match when all
    three colour channels are equal."""
    t = np.array([[ROAD, ROAD, ROAD, SKY],
                  [ROAD, ROAD, ROAD, SKY],
                  [0, 0, ROAD, ROAD],
                  [0, 0, ROAD, SKY]], np.uint8)
    e = np.array([[ROAD, SKY, STATIC, STATIC],
                  [ROAD, SKY, STATIC, STATIC],
                  [ROAD, ROAD, SKY, SKY],
                  [ROAD, ROAD, SKY, SKY]], np.uint8)
    cost = CostSpec([t], e, sampling=RELEASE_COLOUR).cost((2, 2), (2, 2))[0]
    expected = torch.tensor([
        [0, 0, 1, 0],  # road block = road block
        [1, 0, 0, 0],  # road|sky half-and-half = the same blend (a mirrored one may differ in the last bit)
        [0, 1, 0, 0],  # unlabeled (black) = static (black too); our id rule matches neither
        [0, 0, 0, 0],  # 3 road + 1 sky: a blend no exemplar cell has
    ], dtype=torch.float32)
    assert torch.equal(cost, expected)
    ids = CostSpec([t], e).cost((2, 2), (2, 2))[0]
    assert not torch.equal(ids, expected)
    with pytest.raises(ValueError, match="release_colour.*no instance"):
        CostSpec([t], e, target_instances=[t], exemplar_instance=e, granularity="instance", sampling=RELEASE_COLOUR)


def _attention_layer():
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4)
    state = AttentionState()
    attn.set_processor(AMAttnProcessor("down_blocks.0.attentions.0.transformer_blocks.0.attn1", state))
    return attn, state


def test_bank_is_read_through_fp16():
    attn, state = _attention_layer()
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    hidden = torch.randn(1, 4, 8)
    tokens = torch.full((1, 4, 8), 1 + 2 ** -13) * torch.randn(1, 4, 8)  # not fp16-exact
    assert not torch.equal(tokens.half().float(), tokens)
    cost_fn = lambda q, e: torch.ones(1, 4, 4)  # noqa: E731
    m_rel, _ = _release_matcher()
    m_ours = Matcher(num_heads=2)

    def run(matcher, toks):
        with matcher.disabled(), torch.no_grad(), state.generating({name: toks}, (2, 2), (2, 2), 0, matcher, cost_fn):
            return attn(hidden)

    assert torch.equal(run(m_rel, tokens), run(m_ours, tokens.half().float()))
    assert not torch.equal(run(m_rel, tokens), run(m_ours, tokens))


def test_recording_keeps_uncond_rows_only_when_asked():
    attn, state = _attention_layer()
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    x = torch.randn(2, 4, 8)
    with torch.no_grad(), state.recording((2, 2), cond_start=1) as rec:
        attn(x)
        plain = dict(rec)
    with torch.no_grad(), state.recording((2, 2), cond_start=1, keep_uncond=True) as rec:
        attn(x)
        both = dict(rec)
    assert set(plain) == {name} and set(both) == {name, name + UNCOND_SUFFIX}
    assert torch.equal(both[name], plain[name]) and torch.equal(both[name + UNCOND_SUFFIX], x[:1])


# ---------------------------------------------------------------- the pipeline with release_compat
def _prompt_pipeline(release_compat: bool):
    """The tiny pipeline with distinct CFG halves (as every imported SD1.5 model has)."""
    pipe = tiny_pipeline(seed=0)
    te = TextEmbeds(kind="prompt", seq_len=2, cross_attention_dim=16)
    g = torch.Generator().manual_seed(5)
    te.cond.copy_(torch.randn(1, 2, 16, generator=g))
    te.uncond.copy_(torch.randn(1, 2, 16, generator=g))
    pipe.text_embeds = te
    if release_compat:
        rel = Matcher(**dict(pipe.matcher.config, release_compat=True, cost_transposed=True))
        rel.load_state_dict(pipe.matcher.state_dict())
        pipe.matcher = rel.eval()
    return pipe


def test_pipeline_with_release_compat(monkeypatch, tmp_path):
    pipe = _prompt_pipeline(True)
    ex_img, ex_lab, _ = tiny_scene(0)
    _, t1, _ = tiny_scene(1)
    _, t2, _ = tiny_scene(2)
    samplings = []
    real_cost = CostSpec.cost

    def spy(self, *a, **k):
        samplings.append(self.sampling)
        return real_cost(self, *a, **k)

    monkeypatch.setattr(CostSpec, "cost", spy)
    bank = pipe.encode_exemplar(ex_img, ex_lab, num_inference_steps=2)
    assert all(any(k.endswith(UNCOND_SUFFIX) for k in step) for step in bank.tokens)
    pair = pipe([t1, t2], bank=bank, seeds=[3, 4], num_inference_steps=2)
    assert set(samplings) == {RELEASE_COLOUR}
    # the max spans a target's CFG pair, never its batch neighbours: batching changes nothing
    alone = pipe([t2], bank=bank, seeds=[4], num_inference_steps=2)
    torch.testing.assert_close(pair.latents[1:], alone.latents, rtol=1e-4, atol=1e-4)
    ours = _prompt_pipeline(False)([t1, t2], ex_img, ex_lab, seeds=[3, 4], num_inference_steps=2)
    assert not torch.allclose(pair.latents, ours.latents, atol=1e-4)
    # the setting travels with the weights
    pipe.matcher.save_pretrained(tmp_path / "matcher")
    assert json.loads((tmp_path / "matcher" / "config.json").read_text())["release_compat"] is True
    assert Matcher.from_pretrained(tmp_path / "matcher").config.release_compat is True


def test_release_compat_needs_square_equal_grids():
    m, _ = _release_matcher()
    with pytest.raises(ValueError, match="square target and exemplar grids of one size"):
        m.refine_(torch.zeros(1, 2, 8, 8), lambda q, e: torch.ones(1, 16, 16), (2, 4), (2, 4), "down")


def test_uncond_tokens_feed_the_max_and_cond_tokens_stand_in_when_absent():
    """A bank recorded without CFG (identical text halves: the appearance net's two rows are the
    same) has no separate unconditional tokens; its conditional tokens are those."""
    m, _ = _release_matcher()
    attn, state = _attention_layer()
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    g = torch.Generator().manual_seed(0)
    x, cond, uncond = torch.randn(2, 4, 8, generator=g), torch.randn(1, 4, 8, generator=g), torch.randn(1, 4, 8, generator=g)
    cost_fn = lambda q, e: torch.ones(1, 16, 16)  # noqa: E731
    m.release_cost_side, m.release_resized_side = 2, 4

    def run(tokens):
        with torch.no_grad(), state.generating(tokens, (2, 2), (2, 2), 1, m, cost_fn):
            return attn(x)

    absent = run({name: cond})
    assert torch.equal(absent, run({name: cond, name + UNCOND_SUFFIX: cond}))
    assert not torch.equal(absent[1], run({name: cond, name + UNCOND_SUFFIX: uncond * 10})[1])
