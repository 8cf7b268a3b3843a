"""SD1.5 loading and the release importer, on a tiny random SD1.5-shaped folder."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import Downsample2D, ResnetBlock2D
from safetensors.torch import save_file
from torch import nn

from amadapter.pipeline import AMAdapterPipeline
from amadapter.release_import import ReleaseImportError, import_release
from amadapter.testing import single_thread, make_tiny_sd15_folder, tiny_pipeline, tiny_scene


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return make_tiny_sd15_folder(tmp_path_factory.mktemp("sd15"))


def test_from_sd15_encodes_the_prompt_once_and_samples(sd_dir, tmp_path):
    adapter = tiny_pipeline(seed=1)  # structure net (16 wide) and matcher (2 heads) fit the tiny UNet
    adapter.structure_net.save_pretrained(tmp_path / "adapter" / "structure_net")
    adapter.matcher.save_pretrained(tmp_path / "adapter" / "matcher")
    pipe = AMAdapterPipeline.from_sd15(sd_dir, tmp_path / "adapter")
    te = pipe.text_embeds
    assert te.config.kind == "prompt" and te.config.prompt == "A photo of a <sks> driving scene"
    assert te.cond.shape == (1, 77, 32) and not torch.equal(te.cond, te.uncond)
    assert not te.identical_halves
    sc = pipe.scheduler.config
    assert (type(pipe.scheduler).__name__, sc.clip_sample, sc.set_alpha_to_one, sc.steps_offset) == ("DDIMScheduler", False, False, 1)
    assert torch.equal(pipe.matcher.phi_up.convs[1].exemplar_conv.weight, adapter.matcher.phi_up.convs[1].exemplar_conv.weight)
    image, label, _ = tiny_scene(0)
    out = pipe(label, image, label, seeds=0, num_inference_steps=2)
    assert out.images.shape == (1, 32, 32, 3)


# ---- release-shaped checkpoints, built as the release builds them (key names and shapes are
# checked against the release's own source in tests/test_release_compat.py)
class ReleaseControlNeXt(nn.Module):
    """The layout of ControlNeXt's SD1.5 ControlNeXtModel (keys and forward)."""

    def __init__(self, out_channels):
        super().__init__()
        self.time_proj = Timesteps(128, True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(128, 256)
        gn = lambda c: nn.GroupNorm(2, c)  # noqa: E731
        self.embedding = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=2, padding=1), gn(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), gn(64), nn.ReLU(),
            nn.Conv2d(64, 128, 3, padding=1), gn(128), nn.ReLU(),
        )
        self.down_res = nn.ModuleList([ResnetBlock2D(in_channels=128, out_channels=128, temb_channels=256, groups=4),
                                       ResnetBlock2D(in_channels=128, out_channels=256, temb_channels=256, groups=8)])
        self.down_sample = nn.ModuleList([Downsample2D(c, use_conv=True, out_channels=c, padding=1, name="op") for c in (128, 256)])
        self.mid_convs = nn.ModuleList([
            nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.GroupNorm(8, 256),
                          nn.Conv2d(256, 256, 3, padding=1), nn.GroupNorm(8, 256)),
            nn.Conv2d(256, out_channels, 1),
        ])

    def forward(self, x, t):
        emb = self.time_embedding(self.time_proj(torch.tensor([t]).expand(x.shape[0])))
        x = self.embedding(x)
        for res, down in zip(self.down_res, self.down_sample):
            x = down(res(x, emb))
        x = self.mid_convs[0](x) + x
        return self.mid_convs[1](x)


class ReleaseConv4d(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.query_conv = nn.Conv2d(cin, cout, (1, 1))
        self.supp_conv = nn.Conv2d(cin, cout, (3, 3), padding=(1, 1))


class ReleaseEncoder4D(nn.Module):
    def __init__(self, levels):
        super().__init__()
        self.conv4d = nn.ModuleList(nn.Sequential(ReleaseConv4d(a, b), nn.GroupNorm(1, b), nn.ReLU())
                                    for a, b in zip(levels[:-1], levels[1:]))


class ReleaseMatcher(nn.Module):  # the release's OurModel(feat_dim=[H+1, H])
    def __init__(self, heads):
        super().__init__()
        self.encoders = nn.ModuleList(ReleaseEncoder4D((heads + 1, 16, 32, 16, heads)) for _ in range(3))


def _release_files(folder, sd_dir, tmp_path):
    torch.manual_seed(3)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sd_dir, subfolder="unet")
    unet_sd = {k: v + 0.01 for k, v in unet.state_dict().items()}  # "fine-tuned"
    cn, mt = ReleaseControlNeXt(out_channels=unet.config.block_out_channels[0]), ReleaseMatcher(heads=2)
    for p in mt.parameters():
        nn.init.normal_(p, 0.0, 0.3)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(unet_sd, str(folder / "unet.safetensors"))
    save_file(cn.state_dict(), str(folder / "controlnext.safetensors"))
    torch.save(mt.state_dict(), str(folder / "matcher.pth"))
    return unet_sd, cn, mt


def test_import_release_maps_every_key_and_keeps_the_computation(sd_dir, tmp_path):
    rel = tmp_path / "release"
    unet_sd, cn, mt = _release_files(rel, sd_dir, tmp_path)
    # the re-creations carry exactly the key names the release's source defines
    release = json.loads((Path(__file__).parent / "fixtures" / "release_keys.json").read_text())["checkpoints"]
    assert sorted(cn.state_dict()) == sorted(e["key"] for e in release["controlnext"]["keys"])
    assert sorted(mt.state_dict()) == sorted(e["key"] for e in release["matcher"]["keys"])
    import_release(rel / "unet.safetensors", rel / "controlnext.safetensors", rel / "matcher.pth", sd_dir, tmp_path / "out")
    pipe = AMAdapterPipeline.from_pretrained(tmp_path / "out")
    assert pipe.matcher.config.cost_transposed is True and pipe.matcher.config.num_heads == 2
    assert pipe.matcher.config.release_compat is True  # saved in matcher/config.json, travels with the weights
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in unet_sd.items())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pipe.structure_net(x, 301), cn(x, 301), rtol=1e-5, atol=1e-5)
    for ours, theirs in zip((pipe.matcher.phi_down, pipe.matcher.phi_mid, pipe.matcher.phi_up), mt.encoders):
        for i, layer in enumerate(theirs.conv4d):
            assert torch.equal(ours.convs[i].query_conv.weight, layer[0].query_conv.weight)
            assert torch.equal(ours.convs[i].exemplar_conv.bias, layer[0].supp_conv.bias)
            assert torch.equal(ours.norms[i].weight, layer[1].weight)


def test_import_release_rejects_wrong_checkpoints(sd_dir, tmp_path):
    from safetensors.torch import load_file

    rel = tmp_path / "release"
    _release_files(rel, sd_dir, tmp_path)
    args = [rel / "unet.safetensors", rel / "controlnext.safetensors", rel / "matcher.pth", sd_dir, tmp_path / "out"]

    cn = load_file(str(rel / "controlnext.safetensors"))
    cn["extra_head.weight"] = torch.zeros(1)
    save_file(cn, str(rel / "bad_cn.safetensors"))
    with pytest.raises(ReleaseImportError, match=r"bad_cn.safetensors: unexpected keys \['extra_head.weight'\]"):
        import_release(args[0], rel / "bad_cn.safetensors", *args[2:])

    mt = torch.load(str(rel / "matcher.pth"), weights_only=True)
    del mt["encoders.1.conv4d.2.0.supp_conv.weight"]
    torch.save(mt, str(rel / "bad_matcher.pth"))
    with pytest.raises(ReleaseImportError, match=r"bad_matcher.pth.*missing keys \['phi_mid.convs.2.exemplar_conv.weight'\]"):
        import_release(*args[:2], rel / "bad_matcher.pth", *args[3:])

    un = load_file(str(rel / "unet.safetensors"))
    un["conv_in.weight"] = un["conv_in.weight"][:1]
    save_file(un, str(rel / "bad_unet.safetensors"))
    with pytest.raises(ReleaseImportError, match=r"bad_unet.safetensors.*shape mismatches.*conv_in.weight"):
        import_release(rel / "bad_unet.safetensors", *args[1:])

    with pytest.raises(FileNotFoundError, match="nope.pth: release matcher checkpoint not found"):
        import_release(*args[:2], rel / "nope.pth", *args[3:])
    assert not (tmp_path / "out").exists()
