"""The training loop's GPU-facing switches, checked on CPU: batches from DataLoader workers are the
in-process bytes, weights cast once per step give the same losses with fewer casts, the
large-batch lr rule, the AdamW kernel switch and the GPU preset.

Tiny runs as in tests/test_train.py: the toy preset at 16x32 images, batch 2, one thread.
"""
from __future__ import annotations

import math

import pytest
import torch

from training.loop import make_task, train_worker
from training.registry import load_train_config
from training.sources import training_data

TINY = ["data.height=16", "data.width=32", "batch_size=2", "torch_threads=1"]


def _config(stage, tmp_path, *overrides, name="run"):
    return load_train_config(stage, None, [*TINY, "allow_random_vae=true", f"out_dir={tmp_path / name}", *overrides])


def _task(cfg):
    return make_task(cfg, training_data(cfg.data))


@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_loader_workers_give_the_in_process_bytes(tmp_path, rank, world):
    """Steps 3..8 (a resumed run's range) through 2 worker processes, byte for byte."""
    from training.loader import step_batches, step_loader

    cfg = _config("stage1", tmp_path, "batch_size=3", "loader.num_workers=2", "loader.prefetch_factor=2")
    task = _task(cfg)
    got = list(step_batches(step_loader(task.batch, cfg.loader, rank=rank, world_size=world, start=3, end=9,
                                        device=torch.device("cpu"))))
    assert len(got) == 6
    for step, batch in zip(range(3, 9), got):
        want = task.batch(step, rank, world)
        assert batch.keys() == want.keys()
        for k in want:
            assert batch[k].dtype == want[k].dtype and batch[k].shape == want[k].shape, (step, k)
            assert batch[k].numpy().tobytes() == want[k].numpy().tobytes(), (step, k)
    # steps differ, so equality above is about the step each batch was made for
    assert not torch.equal(got[0]["target_image"], got[1]["target_image"])


def test_pin_memory_follows_the_device():
    from training.loader import pins_memory
    from training.loop import LoaderConfig

    assert not pins_memory(LoaderConfig(), torch.device("cpu"))
    assert pins_memory(LoaderConfig(), torch.device("cuda"))
    assert not pins_memory(LoaderConfig(pin_memory=True), torch.device("cpu"))
    assert not pins_memory(LoaderConfig(pin_memory=False), torch.device("cuda"))


def test_loader_workers_train_and_resume_like_in_process(tmp_path):
    """A run with 2 loader workers, interrupted and resumed, logs the in-process run's losses."""
    opts = ("steps=4", "checkpoint_every=2", "p_drop_exemplar=0.3", "lr=1e-3")
    plain = train_worker(_task(_config("stage1", tmp_path, *opts, name="plain"))).losses
    cut = _config("stage1", tmp_path, *opts, "loader.num_workers=2", name="cut")
    first = train_worker(_task(cut), max_steps=3)
    resumed = train_worker(_task(cut), resume=True)
    assert resumed.start_step == 2
    assert first.losses[:2] == plain[:2] and resumed.losses == plain[2:]


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_cast_once_gives_autocast_losses_bit_for_bit(tmp_path, stage):
    """bf16: conv/linear weights cast once per step (frozen: once per run) train to the same
    losses as autocast's per-use casts. Stage 1 trains through both passes (appearance_grad);
    stage 2 has a frozen UNet."""
    opts = ["steps=3", "mixed_precision=bf16", "checkpoint_every=100"]
    if stage == "stage1":
        opts += ["appearance_grad=true", "p_drop_exemplar=0"]
    once = train_worker(_task(_config(stage, tmp_path, *opts, name="once"))).losses
    per_use = train_worker(_task(_config(stage, tmp_path, *opts, "cast_weights_once=false", name="per_use"))).losses
    assert once == per_use


def _casts_in_one_step(cfg) -> dict[str, int]:
    """aten::to calls that copy (an aten::_to_copy under them) in one bf16 training step, by the op calling them."""
    from torch.profiler import ProfilerActivity, profile

    from training.loop import autocast_context, step_generator
    from training.precision import cast_once

    task = _task(cfg)
    module = task.build(torch.device("cpu"))
    casts = cast_once(module, cfg.mixed_precision, cfg.cast_weights_once)
    batch = task.batch(0, 0, 1)
    counts: dict[str, int] = {}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with casts.step() if casts else torch.autocast("cpu", enabled=False):
            with autocast_context(cfg, torch.device("cpu")):
                loss = module(batch, step_generator(0, 0, 0))["loss"]
            loss.backward()
    for e in prof.events():
        if e.name == "aten::to" and any(c.name == "aten::_to_copy" for c in e.cpu_children):
            parent = e.cpu_parent.name if e.cpu_parent is not None else "top"
            counts[parent] = counts.get(parent, 0) + 1
    return counts


def test_cast_once_removes_the_weight_casts_of_frozen_layers(tmp_path):
    """Stage 2 (frozen UNet, structure net): autocast re-casts their weights in both passes every
    step; cast once, the conv/linear calls cast activations only."""
    opts = ["mixed_precision=bf16"]
    per_use = _casts_in_one_step(_config("stage2", tmp_path, *opts, "cast_weights_once=false"))
    once = _casts_in_one_step(_config("stage2", tmp_path, *opts))
    in_layers = lambda c: c.get("aten::linear", 0) + c.get("aten::conv2d", 0)  # noqa: E731
    assert in_layers(once) < 0.6 * in_layers(per_use), (once, per_use)
    assert sum(once.values()) < sum(per_use.values())


def test_cast_once_casts_trainable_weights_once_per_step(tmp_path):
    from training.precision import CastOnce

    cfg = _config("stage1", tmp_path, "p_drop_exemplar=0", "mixed_precision=bf16", "appearance_grad=true")
    task = _task(cfg)
    module = task.build(torch.device("cpu"))
    casts = CastOnce(module, torch.bfloat16)
    trainable = {id(p) for layer in casts.layers for p in layer.parameters(recurse=False) if p.requires_grad}
    frozen = {id(p) for layer in casts.layers for p in layer.parameters(recurse=False) if not p.requires_grad}
    made = []
    for step in range(2):
        with casts.step(), torch.autocast("cpu", dtype=torch.bfloat16):
            module(task.batch(step, 0, 1), torch.Generator().manual_seed(step))["loss"].backward()
        made.append(casts.casts)
    used_frozen = made[0] - (made[1] - made[0])   # step 2 casts only trainable weights again
    assert 0 < made[1] - made[0] <= len(trainable)
    assert 0 <= used_frozen <= len(frozen)
    assert all(p.dtype == torch.float32 for p in module.parameters())  # swapped back after each call
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad and id(p) in trainable)


def test_lr_scaling_rule(tmp_path):
    base = ["lr=4e-4", "base_batch_size=8"]
    assert _config("stage1", tmp_path, *base, "batch_size=32").effective_lr() == pytest.approx(4e-4)  # "none"
    sqrt = _config("stage1", tmp_path, *base, "batch_size=32", "lr_scaling=sqrt")
    assert sqrt.effective_lr() == pytest.approx(8e-4)
    lin = _config("stage1", tmp_path, *base, "batch_size=32", "lr_scaling=linear", "num_workers=2")
    assert lin.global_batch_size == 64 and lin.effective_lr() == pytest.approx(3.2e-3)
    with pytest.raises(ValueError, match="base_batch_size"):
        _config("stage1", tmp_path, "lr_scaling=sqrt")
    # the loop's optimizer and its logged lr use the scaled value, warmup included
    cfg = _config("stage1", tmp_path, *base, "batch_size=2", "lr_scaling=sqrt", "steps=2", "warmup_steps=2",
                  "checkpoint_every=100")
    summary = train_worker(_task(cfg))
    from training.loop import read_loss_log

    lrs = [r["lr"] for r in read_loss_log(summary.out_dir + "/loss.jsonl")]
    assert lrs[-1] == pytest.approx(4e-4 * math.sqrt(2 / 8))


def test_adamw_kernel_choice_and_resume_keeps_it(tmp_path):
    from training.loop import adamw_kwargs

    assert adamw_kwargs("auto", torch.device("cpu")) == {"fused": True}
    assert adamw_kwargs("auto", torch.device("cuda")) == {"fused": True}
    assert adamw_kwargs("loop", torch.device("cuda")) == {"foreach": False}
    opts = ("steps=3", "checkpoint_every=1", "p_drop_exemplar=0")
    loop_run = _config("stage1", tmp_path, *opts, "optimizer_impl=loop", name="r")
    train_worker(_task(loop_run), max_steps=1)
    # resumed under "auto": the fused kernel, although the checkpoint was saved by the loop
    seen = {}
    task = _task(_config("stage1", tmp_path, *opts, name="r"))
    train_worker(task, resume=True, on_step=lambda step, m: seen.setdefault(step, m))
    assert sorted(seen) == [2, 3]


def test_gpu_preset_is_found_and_validates():
    from amgen_core.yaml_files import read_yaml_mapping
    from pipeline.presets import resolve_config

    path = resolve_config("train_toy_stage1_gpu")
    cfg = load_train_config("stage1", path)
    assert cfg.use_gpu and cfg.mixed_precision == "bf16" and cfg.loader.num_workers > 0
    assert cfg.optimizer_impl in ("auto", "fused") and cfg.lr_scaling == "sqrt"
    assert cfg.effective_lr() == pytest.approx(cfg.lr * math.sqrt(cfg.batch_size / cfg.base_batch_size))
    text = path.read_text()
    assert "130,000" in text and "3,000 samples/s" in text and "43 s" in text  # the sample count and the H200 minutes
    assert read_yaml_mapping(path)["stage"] == "stage1"


def test_deferred_metrics_keep_order_and_stop_on_a_non_finite_loss():
    """On a GPU the loop reads metrics every log_every steps (_flush): rows keep step order and a
    non-finite loss raises, naming its step."""
    from training.loop import _flush

    pending = [(5, {"loss": torch.tensor(0.5), "dropped": 0.0}, 1e-3, 1.0),
               (6, {"loss": torch.tensor(0.25), "dropped": 1.0}, 1e-3, 2.0)]
    rows = _flush(pending, "stage1")
    assert [r["step"] for r in rows] == [5, 6] and rows[1] == {"step": 6, "loss": 0.25, "dropped": 1.0, "lr": 1e-3,
                                                               "time": 2.0}
    assert pending == []
    with pytest.raises(FloatingPointError, match="at step 8"):
        _flush([(7, {"loss": torch.tensor(1.0)}, 0.0, 0.0), (8, {"loss": torch.tensor(float("nan"))}, 0.0, 0.0)],
               "stage1")
