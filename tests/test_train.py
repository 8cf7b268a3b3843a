"""Training loops: loss goes down, resume is exact, stage 2 trains the matcher only, configs fail clearly,
and the loops train on whatever data they are given (a Cityscapes-format tree as well as toy-town).

Tiny runs: the toy preset at 16x32 images (4x8 latents), batch 2, untrained VAE, one thread.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training.loop import make_task, read_loss_log, train_worker
from training.registry import load_train_config
from training.sources import training_data

TINY = ["data.height=16", "data.width=32", "batch_size=2", "torch_threads=1"]  # 1: no spinning on a busy box


def _config(stage, tmp_path, *overrides, name="run"):
    extra = ["allow_random_vae=true"] if stage != "vae" else ["scale_images=8"]
    return load_train_config(stage, None, [*TINY, *extra, f"out_dir={tmp_path / name}", *overrides])


def _task(cfg):
    """The task on the data its config names, built as `amgen train` builds it."""
    return make_task(cfg, training_data(cfg.data))


def test_pairs_are_deterministic_by_seed_step_rank():
    from training.data import pair_batch
    from training.loop import DataConfig
    from training.sources import ToyTownPairs

    src = ToyTownPairs(DataConfig(height=32, width=64))
    a, b = pair_batch(src, 3, 5, 0, 3), pair_batch(src, 3, 5, 0, 3)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    other_rank = pair_batch(src, 3, 5, 1, 3)
    other_step = pair_batch(src, 3, 6, 0, 3)
    assert not torch.equal(a["target_image"], other_rank["target_image"])
    assert not torch.equal(a["target_image"], other_step["target_image"])
    assert a["target_image"].min() >= -1 and a["target_image"].max() <= 1
    assert a["target_image"].shape == (3, 3, 32, 64) and a["target_label"].shape == (3, 32, 64)


def test_domain_weights_draw_only_the_lights_asked_for():
    """data.domain_weights weighs the toy-town lights; the default keeps the old stream."""
    from pydantic import ValidationError

    from toytown import sample_appearance
    from training.loop import DataConfig
    from training.sources import ToyTownPairs

    src = ToyTownPairs(DataConfig(height=32, width=64, domain_weights={"night": 3, "fog": 1}))
    assert src.domain_p == (0.0, 0.0, 0.75, 0.25)  # DOMAINS order: day, dusk, night, fog
    lights = [src._look(np.random.default_rng(i)).domain for i in range(200)]
    assert set(lights) == {"night", "fog"} and 120 < lights.count("night") < 180
    plain = ToyTownPairs(DataConfig(height=32, width=64))
    assert all(plain._look(np.random.default_rng(i)).domain == sample_appearance(np.random.default_rng(i)).domain
               for i in range(20))
    for bad, match in (({"dawn": 1}, "dawn"), ({"night": 0}, "positive sum")):
        with pytest.raises(ValidationError, match=match):
            DataConfig(domain_weights=bad)
    with pytest.raises(ValidationError, match="domain unset"):
        DataConfig(domain="night", domain_weights={"night": 1})


def test_crop_pairs_keep_ids_exact():
    """Two crops resized back: labels stay valid ids, instances keep their ids across crops."""
    from training.loop import DataConfig
    from training.sources import ToyTownPairs

    src = ToyTownPairs(DataConfig(height=32, width=64, p_shared_appearance=0.0))
    pair = src.pair(np.random.default_rng(0))
    assert pair.kind == "crops"
    for lab, ins in ((pair.exemplar_label, pair.exemplar_instance), (pair.target_label, pair.target_instance)):
        cls = np.where(ins >= 1000, ins // 1000, ins)
        assert np.array_equal(cls, lab)  # nearest resizing never mixes ids
    shared = set(np.unique(pair.exemplar_instance)) & set(np.unique(pair.target_instance))
    assert shared, "two crops of one scene share instances"


def _held_out_loss(module, cfg) -> float:
    """The stage's loss on fixed batches and noise (steps the run never draws): per-step training
    losses swing with the random timestep far more than 20 steps can move them."""
    from training.data import pair_batch
    from training.loop import step_generator

    data = training_data(cfg.data)
    module.eval()
    with torch.no_grad():
        return float(np.mean([module(pair_batch(data, 7, 10**6 + i, 0, 4), step_generator(7, i, 0))["loss"]
                              for i in range(6)]))


def test_twenty_steps_lower_the_loss(tmp_path):
    from amadapter.pipeline import AMAdapterPipeline
    from training.stage1 import Stage1Step

    cfg = _config("stage1", tmp_path, "steps=20", "lr=2e-3", "checkpoint_every=100", "p_drop_exemplar=0.2")
    before = _held_out_loss(_task(cfg).build(torch.device("cpu")), cfg)
    summary = train_worker(_task(cfg))
    losses = summary.losses
    assert len(losses) == 20 and all(np.isfinite(losses))
    after = _held_out_loss(Stage1Step(AMAdapterPipeline.from_pretrained(summary.export), cfg), cfg)
    # 5%: in the whitened pixel latent most of the held-out loss sits in unit-variance grain
    # directions no model can predict (measured: 1.93 -> 1.82 in 20 steps; per-colour scaling gave > 10%)
    assert after < 0.95 * before, (before, after)
    rows = read_loss_log(tmp_path / "run" / "loss.jsonl")
    assert [r["step"] for r in rows] == list(range(20))
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()


def test_resume_continues_exactly(tmp_path):
    opts = ("steps=4", "checkpoint_every=2", "p_drop_exemplar=0.3", "lr=1e-3")
    full = train_worker(_task(_config("stage1", tmp_path, *opts))).losses

    cut = _config("stage1", tmp_path, *opts, name="cut")
    first = train_worker(_task(cut), max_steps=3)   # interrupted after 3 steps; last checkpoint at 2
    assert first.checkpoint.endswith("step-0000002") and first.export is None
    resumed = train_worker(_task(cut), resume=True)
    assert resumed.start_step == 2
    assert resumed.losses == full[2:]                      # bit-identical continuation
    rows = read_loss_log(tmp_path / "cut" / "loss.jsonl")  # the replayed step 2 is logged once
    assert [r["step"] for r in rows] == list(range(4))
    assert [r["loss"] for r in rows] == full


def test_stage2_trains_the_matcher_only(tmp_path):
    cfg = _config("stage2", tmp_path, "steps=3", "p_instance=0.4", "p_mapping=0.4", "lr=1e-2")
    task = _task(cfg)
    module = task.build(torch.device("cpu"))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("matcher.") for n in trainable)

    # Reuse the very module in the loop so the comparison is on the trained weights.
    task.build = lambda device: module
    train_worker(task)
    kinds = [r["granularity"] for r in read_loss_log(tmp_path / "run" / "loss.jsonl")]
    assert len(set(kinds)) >= 2, kinds  # more than one matching path was trained
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the matcher did not move"
    assert all(k.startswith("matcher.") for k in changed), sorted(changed)[:5]
    frozen = [k for k in before if not k.startswith("matcher.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)


def test_vae_stage_sets_latent_scale(tmp_path):
    cfg = _config("vae", tmp_path, "steps=3", "checkpoint_every=100")
    summary = train_worker(_task(cfg))
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(summary.export)
    metrics = json.loads((tmp_path / "run" / "vae_metrics.json").read_text())
    assert vae.config.scaling_factor == pytest.approx(metrics["scaling_factor"], rel=1e-5)
    assert vae.config.scaling_factor != 0.18215  # measured, not the preset's SD value
    assert (tmp_path / "run" / "vae" / "diffusion_pytorch_model.safetensors").is_file()


def test_config_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: vae\nsteps: 10\nlearning_rate: 1.0\n")
    with pytest.raises(ValueError, match=r"(?s)bad\.yaml: invalid vae training config.*learning_rate"):
        load_train_config("vae", bad)
    with pytest.raises(ValueError, match="stage 'vae' but `train stage1`"):
        load_train_config("stage1", bad)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_train_config("vae", tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="no starting point"):
        load_train_config("stage1", None, ["out_dir=x", "preset=sd15"])
    assert load_train_config("stage1", None, ["out_dir=x"]).preset == "toy"  # lossless latent: nothing to train first
    with pytest.raises(ValueError, match="toy-sized learned VAE only"):
        load_train_config("vae", None, ["preset=sd15"])


def test_cli_trains_and_summarizes(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    out = tmp_path / "cli"
    args = ["train", "vae", "--config", "train_toy_vae", *sum((["--set", a] for a in [
        *TINY, "steps=2", "warmup_steps=0", "checkpoint_every=1", "scale_images=8", f"out_dir={out}"]), [])]
    result = CliRunner(env={"COLUMNS": "250"}).invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "0 -> 2" in result.output and "step-0000002" in result.output
    assert (out / "checkpoints" / "latest").read_text() == "step-0000002"
    assert len(list((out / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints
    bad = CliRunner().invoke(app, ["train", "vae", "--set", "stepz=3"])
    assert bad.exit_code == 2 and "stepz" in bad.output
    bad = CliRunner().invoke(app, ["train", "vae", "--config", "train_toy_vea"])
    assert bad.exit_code == 2 and "no preset of that name" in bad.output


def test_vae_decoder_finetune_keeps_the_latent_space(tmp_path):
    first = train_worker(_task(_config("vae", tmp_path, "steps=1", "checkpoint_every=100")))
    cfg = _config("vae", tmp_path, "steps=2", "checkpoint_every=100", "train=decoder", f"init_from={first.export}",
                  "lr=1e-2", name="dec")
    summary = train_worker(_task(cfg))
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    a = load_file(f"{first.export}/diffusion_pytorch_model.safetensors")
    b = load_file(f"{summary.export}/diffusion_pytorch_model.safetensors")
    enc = [k for k in a if k.startswith(("encoder.", "quant_conv."))]
    dec = [k for k in a if k.startswith(("decoder.", "post_quant_conv."))]
    assert enc and all(torch.equal(a[k], b[k]) for k in enc)
    assert any(not torch.equal(a[k], b[k]) for k in dec)
    assert AutoencoderKL.from_pretrained(summary.export).config.scaling_factor == \
        AutoencoderKL.from_pretrained(first.export).config.scaling_factor


def test_gradient_checkpointing_and_bf16_switches(tmp_path):
    """Whole-pass checkpointing recomputes the same graph (same losses, bit for bit); bf16 autocast
    trains to nearby, finite losses."""
    opts = ("steps=2", "p_drop_exemplar=0", "appearance_grad=true", "checkpoint_every=100")
    plain = train_worker(_task(_config("stage1", tmp_path, *opts, name="plain"))).losses
    ckpt = train_worker(_task(_config("stage1", tmp_path, *opts, "gradient_checkpointing=true", name="gc"))).losses
    assert ckpt == plain
    bf16 = train_worker(_task(_config("stage1", tmp_path, *opts, "mixed_precision=bf16", name="bf16"))).losses
    assert all(np.isfinite(bf16)) and bf16 != plain
    assert np.allclose(bf16, plain, rtol=0.02)


def test_export_assembles_a_loadable_pipeline(tmp_path):
    from amadapter.pipeline import AMAdapterPipeline
    from training.export import ExportError, assemble

    from amadapter.testing import tiny_config

    lossless = AMAdapterPipeline.from_preset("toy", seed=3).save_pretrained(tmp_path / "toy_px")
    with pytest.raises(ExportError, match="PixelUnshuffleAutoencoder"):
        assemble(lossless, tmp_path / "no", vae_dir=lossless / "vae")
    src = AMAdapterPipeline.from_preset(tiny_config(), seed=3).save_pretrained(tmp_path / "stage2")
    (src / "training_log.jsonl").write_text('{"stage": "stage2", "step": 0, "loss": 0.5, "time": 1.0}\n')
    vae = AMAdapterPipeline.from_pretrained(src).vae
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.5)          # a decoder-only change may be swapped in
    vae.save_pretrained(tmp_path / "dec")
    info = assemble(src, tmp_path / "toy", vae_dir=tmp_path / "dec", fp16=True)
    loaded = AMAdapterPipeline.from_pretrained(tmp_path / "toy")
    assert info["dtype"] == "float16" and loaded.vae.dtype == torch.float32  # stored half, loaded upcast
    assert torch.equal(loaded.vae.decoder.conv_out.bias, vae.decoder.conv_out.bias.half().float())
    assert loaded.model_hash() == info["model_hash"]
    assert (tmp_path / "toy" / "training_log.jsonl").read_bytes() == (src / "training_log.jsonl").read_bytes()
    assert all(name.endswith(".safetensors") for name in info["safetensors"]) and info["bytes"] < 25 * 2**20

    with torch.no_grad():
        vae.encoder.conv_in.bias.add_(0.5)           # a new latent space may not
    vae.save_pretrained(tmp_path / "enc")
    with pytest.raises(ExportError, match="encoder"):
        assemble(src, tmp_path / "toy2", vae_dir=tmp_path / "enc")
    with pytest.raises(ExportError, match="budget"):
        assemble(src, tmp_path / "toy3", max_mb=1.0)
    assert not (tmp_path / "toy3.tmp").exists()


def test_min_snr_weighting_only_lowers_easy_steps():
    from diffusers import DDIMScheduler

    from amadapter.presets import get_preset
    from training.diffusion import eps_loss

    sched = DDIMScheduler(**get_preset("toy")["scheduler"])
    g = torch.Generator().manual_seed(0)
    pred, noise = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    plain = [eps_loss(pred[i:i + 1], noise[i:i + 1], torch.tensor([t]), sched, None) for i, t in enumerate((10, 900))]
    weighted = [eps_loss(pred[i:i + 1], noise[i:i + 1], torch.tensor([t]), sched, 5.0) for i, t in enumerate((10, 900))]
    assert torch.isclose(plain[0], torch.nn.functional.mse_loss(pred[:1], noise[:1]))
    assert weighted[0] < 0.05 * plain[0]          # t=10: SNR ~ 500, weight 5/SNR
    assert torch.equal(weighted[1], plain[1])     # t=900: SNR < 5, weight 1


def test_exemplar_noise_fraction_draws_lower_timesteps_and_validates():
    from training.diffusion import exemplar_timesteps
    t = torch.tensor([999, 600, 100, 0])
    g = torch.Generator().manual_seed(0)
    assert exemplar_timesteps(t, (1.0, 1.0), g) is t  # the default draws nothing: old runs resume exactly
    te = exemplar_timesteps(t, (0.3, 0.8), torch.Generator().manual_seed(0))
    assert torch.equal(te, exemplar_timesteps(t, (0.3, 0.8), torch.Generator().manual_seed(0)))
    assert bool(((te >= (0.3 * t).floor()) & (te <= (0.8 * t).ceil())).all()), te
    assert te[-1] == 0
    with pytest.raises(ValueError, match="exemplar_t_fraction"):
        load_train_config("stage1", None, ["allow_random_vae=true", "exemplar_t_fraction=[0.9, 0.2]"])
    with pytest.raises(ValueError, match="exemplar_loss_weight"):
        load_train_config("stage1", None, ["allow_random_vae=true", "exemplar_t_fraction=[0.3, 0.8]",
                                           "appearance_grad=true", "exemplar_loss_weight=0.5"])


def test_stage2_near_zero_start_with_lower_exemplar_noise_trains(tmp_path):
    cfg = _config("stage2", tmp_path, "steps=2", "matcher_init=near_zero", "exemplar_t_fraction=[0.3, 0.8]",
                  "high_noise_bias=0.5")
    module = _task(cfg).build(torch.device("cpu"))
    for block in ("down", "mid", "up"):
        norm = module.matcher.phi(block).norms[-1]
        assert float(norm.weight.abs().sum()) == 0.0 and torch.all(norm.bias == 0.01)
    summary = train_worker(_task(cfg))
    assert len(summary.losses) == 2 and all(np.isfinite(summary.losses))


# ---------------------------------------------------------------------------------------------
# data as an argument: a Cityscapes-format tree, read through connectors.cityscapes


@pytest.fixture(scope="module")
def city_tree(tmp_path_factory):
    """Three frames in Cityscapes layout (leftImg8bit/ + gtFine/), 16x32, as a user's tree would be."""
    from toytown import make_tree

    root = tmp_path_factory.mktemp("cityscapes")
    make_tree(root, 3, seed=5, height=16, width=32)
    return root


def test_stages_train_on_a_cityscapes_tree_passed_in(city_tree, tmp_path):
    """The caller opens the tree (connectors.cityscapes) and hands it over; every batch is made of
    the tree's own frames, and both the VAE and stage 1 train a couple of steps on them."""
    from amgen_core.image_io import read_image
    from connectors.cityscapes import CityscapesSource
    from training.data import LayoutPairs, to_unit_range

    frames = sorted(city_tree.glob("leftImg8bit/train/*/*_leftImg8bit.png"))
    assert len(frames) == 3
    tree_images = to_unit_range(np.stack([read_image(f) for f in frames]))
    whole = ("data.crop_scale=[1.0, 1.0]", "data.flip=false")  # crops = the frames themselves

    reads = []

    class Counting(CityscapesSource):
        def read_item(self, item):
            reads.append(item.layout_id)
            return super().read_item(item)

    for stage, key in (("vae", "image"), ("stage1", "target_image")):
        cfg = _config(stage, tmp_path, "steps=2", "checkpoint_every=100", *whole, name=stage)
        task = make_task(cfg, LayoutPairs(cfg.data, Counting(city_tree), name="tree"))
        batch = task.batch(0, 0, 1)[key]
        assert all(any(torch.equal(img, t) for t in tree_images) for img in batch), stage
        summary = train_worker(task)
        assert summary.steps_run == 2 and all(np.isfinite(summary.losses)), stage
    assert reads and set(reads) <= {f.name.replace("_leftImg8bit.png", "") for f in frames}
    assert (tmp_path / "stage1" / "pipeline" / "model_index.json").is_file()
    assert (tmp_path / "vae" / "vae" / "config.json").is_file()


def test_config_data_section_builds_the_same_cityscapes_data(city_tree, tmp_path):
    """`data: {source: cityscapes, root: ...}` (what `amgen train` reads) trains exactly as the same
    tree passed in by hand, and a torch-style dataset of (image, label) tuples does too."""
    from connectors.cityscapes import CityscapesSource
    from training.data import LayoutPairs

    cfg = _config("stage1", tmp_path, "steps=2", "checkpoint_every=100", "data.source=cityscapes",
                  f"data.root={city_tree}")
    by_config = train_worker(_task(cfg)).losses
    by_hand = train_worker(make_task(cfg, LayoutPairs(cfg.data, CityscapesSource(city_tree)))).losses
    assert by_config == by_hand

    class Tuples(torch.utils.data.Dataset):  # (image, label, instance) per index, as a user's Dataset gives
        def __init__(self):
            self.source = CityscapesSource(city_tree)
            self.items = self.source.list_items()

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            layout = self.source.read_item(self.items[i])
            return layout.image, layout.label, layout.instance

    as_tuples = train_worker(make_task(cfg, LayoutPairs(cfg.data, Tuples()))).losses
    assert as_tuples == by_config


def test_layout_data_errors_name_the_data(city_tree, tmp_path):
    from training.data import LayoutPairs
    from training.loop import DataConfig

    cfg = DataConfig(height=16, width=32)
    with pytest.raises(ValueError, match="my set: holds no samples"):
        LayoutPairs(cfg, [], name="my set")
    label = np.zeros((16, 32), np.uint8)
    with pytest.raises(ValueError, match="my set sample 0: training needs images"):
        LayoutPairs(cfg, [(None, label)], name="my set").pair(np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"differ in size"):
        LayoutPairs(cfg, [(np.zeros((8, 8, 3), np.uint8), label)]).image(np.random.default_rng(0))
    with pytest.raises(TypeError, match="layout record or an"):
        LayoutPairs(cfg, ["not a sample"]).image(np.random.default_rng(0))
    empty = tmp_path / "empty"
    (empty / "gtFine" / "train").mkdir(parents=True)
    (empty / "leftImg8bit" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=f"{empty}: no 'train' items"):
        training_data(DataConfig(source="cityscapes", root=str(empty)))


def test_restart_from_exported_weights_continues_the_curve(tmp_path):
    """Checkpoint gone: a run restarted from its exported folder (continue_from_init) carries on at
    the next step with the same learning rate and data, and its log and export keep the whole curve."""
    from training.history import HISTORY_FILE, read_history

    common = ("checkpoint_every=100", "lr_schedule=cosine", "warmup_steps=1")
    whole = train_worker(_task(_config("stage1", tmp_path, "steps=6", *common, name="whole")))
    short = train_worker(_task(_config("stage1", tmp_path, "steps=3", *common, name="short")))
    assert [r["step"] for r in read_history(short.export)] == [0, 1, 2]

    again = _config("stage1", tmp_path, "steps=6", *common, f"init_from={short.export}", "continue_from_init=true",
                    "allow_random_vae=false", name="again")
    summary = train_worker(_task(again))
    assert summary.start_step == 3 and summary.steps_run == 3
    rows = read_loss_log(tmp_path / "again" / "loss.jsonl")
    assert [r["step"] for r in rows] == list(range(6))
    lr_whole = {r["step"]: r["lr"] for r in read_loss_log(tmp_path / "whole" / "loss.jsonl")}
    assert all(abs(r["lr"] - lr_whole[r["step"]]) < 1e-12 for r in rows if "lr" in r)  # the schedule goes on
    history = read_history(summary.export)
    assert [(r["stage"], r["step"]) for r in history] == [("stage1", s) for s in range(6)]
    assert (Path(summary.export) / HISTORY_FILE).is_file()

    with pytest.raises(ValueError, match="no stage2 steps logged"):
        from training.history import continued_rows
        continued_rows(summary.export, "stage2")
    done = _config("stage1", tmp_path, "steps=6", *common, f"init_from={summary.export}", "continue_from_init=true",
                   "allow_random_vae=false", name="done")
    with pytest.raises(Exception, match="already logged 6 steps"):
        train_worker(_task(done))


def test_a_checkpoint_exports_as_the_run_would_at_that_step(tmp_path):
    from typer.testing import CliRunner

    from amadapter.pipeline import AMAdapterPipeline
    from pipeline.cli import app

    sets = [*TINY, "allow_random_vae=true", "steps=4", "checkpoint_every=2", "lr=1e-3", f"out_dir={tmp_path / 'run'}"]
    summary = train_worker(_task(load_train_config("stage1", None, sets)))

    def export(step, out):
        args = ["train", "export-checkpoint", "stage1", *sum((["--set", a] for a in sets), []), "--step", str(step), "--out", str(out)]
        return CliRunner(env={"COLUMNS": "250"}).invoke(app, args)

    hashes = {}
    for step in (2, 4):
        res = export(step, tmp_path / f"ck{step}")
        assert res.exit_code == 0, res.output
        pipe = AMAdapterPipeline.from_pretrained(tmp_path / f"ck{step}" / "pipeline")
        hashes[step] = pipe.model_hash()
        assert [r["step"] for r in read_loss_log(tmp_path / f"ck{step}" / "loss.jsonl")] == list(range(step))
    assert hashes[4] == AMAdapterPipeline.from_pretrained(summary.export).model_hash()
    assert hashes[2] != hashes[4]
    res = export(3, tmp_path / "ck3")
    assert res.exit_code == 2 and "no checkpoint of step 3" in res.output and "step-0000002" in res.output


def test_a_torn_last_loss_line_is_left_out(tmp_path):
    log = tmp_path / "loss.jsonl"
    log.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.9}\n{"step": 2, "lo')
    assert [r["step"] for r in read_loss_log(log)] == [0, 1]
    log.write_text('{"step": 0, "lo\n{"step": 1, "loss": 0.9}\n')  # torn anywhere else: the log is damaged
    with pytest.raises(json.JSONDecodeError):
        read_loss_log(log)
