"""One bench for a lent GPU: sampling speed and memory at SD1.5 size, the toy model's speed, toy
stage-1 training speed and the GPU's busy share, and where an am_adapter step spends device time.

Sections (each reported in the JSON; ``seconds`` per section):
- ``sd15``: images/s and peak GPU memory (``torch.cuda.max_memory_allocated``) per mode
  (structure_only, sa_aug, am_adapter) x batch (1, 8) x dtype (fp16, bf16): the sd15 preset with
  random weights (nothing is downloaded) and a distinct random cond/uncond text pair, so CFG's
  halves differ as with SD1.5's prompts; 512x512, 20 DDIM steps, CFG 7.5, one exemplar bank
  (encoded once per dtype, not timed) reused by every call. Each timed call follows a 1-step
  warm-up call of the same shape (cuDNN autotuning, allocator).
- ``am_adapter_step_top_ops``: torch.profiler's key_averages of one am_adapter generation step at
  batch 1 (CFG pair, first timestep, first dtype), the 10 ops with the most self device time
  (self CPU time where there is no GPU).
- ``toy``: the bundled toy model's images/s at the demo's sampling (TOY_STEPS DDIM steps, CFG TOY_CFG,
  am_adapter, class granularity), fp32 and bf16, batch 64.
- ``train``: toy stage 1 (configs/train_toy_stage1_gpu.yaml, started from the bundled model) run
  by the training loop itself (``training.loop.train_worker``): samples/s from two runs of W and
  W+T steps (the difference: T steps with loader start-up and warm-up taken out), and the GPU's
  busy share over P profiled steps (the union of the kernels' device intervals over the wall
  time from the start of the first profiled step to the end of the run).

``--budget-s`` (default 270) skips an SD1.5 cell when the time so far plus the cell's estimate (from
the cells timed before it) would pass it, so the whole run stays under 5 minutes on a lent H200
whatever the adapter's speed; skipped cells are listed.
``--tiny`` runs every section on the CPU in seconds: a tiny random model with a prompt-kind text
condition at 32x32 for the SD1.5 cells, small batches, few steps (tests/test_bench_gpu.py).
Needs no Ray, faiss, datasets or albumentations (a test blocks them).

Last line: one JSON object.
Usage: python bench/gpu.py [--tiny] [--device auto|cuda|cpu] [--budget-s 270]
       [--dtypes fp16,bf16] [--sd-batches 1,8] [--sd-steps 20] [--sd-size 512] [--toy-batch 64] [--toy-size HxW]
       [--train-batch 256] [--train-steps 5,30] [--train-profile-steps 5] [--train-workers 14]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("structure_only", "sa_aug", "am_adapter")
# the demo's sampling (configs/toytown_demo.yaml; tests/test_bench_gpu.py checks they agree)
TOY_STEPS, TOY_CFG = 2, 1.0


def build_pipeline(model, device: torch.device, dtype: torch.dtype, speed: dict | None = None):
    """The bench's one way to a pipeline on ``device`` in ``dtype``: ``model`` is a model spec
    (amadapter.loading: "toy", "random:sd15") or a preset dict (the tiny model). ``speed`` holds
    the run config's ``model.channels_last`` / ``model.compile`` (amadapter.speed)."""
    from amadapter.loading import load_model
    from amadapter.pipeline import AMAdapterPipeline
    from amadapter.speed import apply_speed_options
    from exemplar_reuse import with_text_condition

    if isinstance(model, dict):
        pipe = AMAdapterPipeline.from_preset(model, seed=0)
    else:
        pipe = load_model(model).pipe
    if not pipe.text_embeds.identical_halves:
        pipe = with_text_condition(pipe)  # random prompt-kind halves: CFG runs as with real prompts
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device, dtype)
    apply_speed_options(pipe, **(speed or {}))
    return pipe


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else None


def _scene(size, seed: int, cars: int = 2):
    from amadapter.testing import tiny_scene

    return tiny_scene(seed, size=size, cars=cars)


def time_sampling(pipe, device, size, mode: str, batch: int, steps: int, cfg: float, banks) -> dict:
    """Images/s and peak memory of one ``pipe`` call, after a 1-step warm-up call of the same shape.
    ``banks``: {steps: bank} of one exemplar, for the timed call and the 1-step warm-up."""
    targets = [_scene(size, 100 + i, cars=1 + i % 3)[1] for i in range(batch)]
    seeds = list(range(batch))
    with torch.no_grad():
        for n in (1, steps):
            bank = None if mode == "structure_only" else banks[n]
            _sync(device)
            _peak_reset(device)
            t0 = time.perf_counter()
            pipe(targets, bank=bank, seeds=seeds, num_inference_steps=n, guidance_scale=cfg, mode=mode)
            _sync(device)
            s = time.perf_counter() - t0
    return {"mode": mode, "batch": batch, "steps": steps, "seconds": s, "images_per_s": batch / s,
            "s_per_image": s / batch, "peak_bytes": _peak(device)}


def exemplar_banks(pipe, size, steps: int, cfg: float) -> dict:
    """{1: bank, steps: bank} of one exemplar scene (encoded once, not timed)."""
    image, label, instance = _scene(size, 0, cars=3)
    with torch.no_grad():
        return {n: pipe.encode_exemplar(image, label, instance, num_inference_steps=n, guidance_scale=cfg)
                for n in sorted({1, steps})}


def top_ops(prof, device: torch.device, n: int = 10) -> list[dict]:
    """The ``n`` ops with the most self device time (self CPU time without a GPU), as data."""
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:n]
    total = sum(getattr(e, key) for e in prof.key_averages()) or 1.0
    return [{"op": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total}
            for e in rows]


def profile_adapter_step(pipe, device, size, steps: int, cfg: float, bank) -> dict:
    """One am_adapter generation step at batch 1 with CFG (the scheduler step included) under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    from amadapter.cost import CostSpec

    target = _scene(size, 100)[1]
    f = pipe.vae_scale_factor
    sched = pipe._scheduler(steps)
    t = sched.timesteps[0]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, pipe.unet.config.in_channels, size[0] // f, size[1] // f, generator=g).to(device, pipe.dtype)
    states, cond_start = pipe._embeds(1, cfg=True)
    cond = pipe.prepare_condition(target)
    cost = CostSpec([target], bank.label)

    def step():
        eps = pipe.generation_eps(torch.cat([z, z]), t, cond, tokens=bank.tokens[0], exemplar_hw=bank.latent_hw,
                                  mode="am_adapter", cost=cost, encoder_hidden_states=states, cond_start=cond_start)
        eps_u, eps_c = eps.chunk(2)
        sched.step(eps_u + cfg * (eps_c - eps_u), t, z)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad():
        step()  # warm-up
        _sync(device)
        with profile(activities=activities) as prof:
            step()
            _sync(device)
    return {"dtype": str(pipe.dtype).replace("torch.", ""), "ops": top_ops(prof, device)}


def sd15_section(args, device, elapsed) -> dict:
    model = _tiny_model() if args.tiny else "random:sd15"
    size = (args.sd_size, args.sd_size)
    out = {"model": "tiny-random" if args.tiny else "sd15-random", "size": list(size), "steps": args.sd_steps,
           "guidance_scale": 7.5, "cells": [], "skipped": [], "top_ops": None}
    pipe = None
    for dtype_name in args.dtypes:
        if elapsed() > args.budget_s:
            out["skipped"] += [f"{dtype_name}/{m}/b{b}" for m in MODES for b in args.sd_batches]
            continue
        if pipe is None:
            pipe = build_pipeline(model, device, DTYPES[dtype_name], args.speed)
        else:
            pipe.to(device, DTYPES[dtype_name])  # one random model for every dtype
        banks = exemplar_banks(pipe, size, args.sd_steps, 7.5)
        if out["top_ops"] is None:
            out["top_ops"] = profile_adapter_step(pipe, device, size, args.sd_steps, 7.5, banks[args.sd_steps])
        for mode in MODES:
            for b in args.sd_batches:
                if elapsed() + _estimate(out["cells"], mode, b) > args.budget_s:
                    out["skipped"].append(f"{dtype_name}/{mode}/b{b}")
                    continue
                cell = time_sampling(pipe, device, size, mode, b, args.sd_steps, 7.5, banks)
                out["cells"].append({"dtype": dtype_name, **cell})
                print(json.dumps(out["cells"][-1]), flush=True)
    by = {(c["dtype"], c["batch"], c["mode"]): c["s_per_image"] for c in out["cells"]}
    out["am_adapter_over_structure_only"] = {
        f"{d}/b{b}": by[(d, b, "am_adapter")] / by[(d, b, "structure_only")]
        for d in args.dtypes for b in args.sd_batches if (d, b, "am_adapter") in by and (d, b, "structure_only") in by}
    return out


def _estimate(cells: list[dict], mode: str, batch: int) -> float:
    """Seconds a (mode, batch) cell should take, warm-up included, from the cells timed so far:
    the same cell in another dtype, else the mode at a smaller batch scaled up; 0 when unknown."""
    same = [c["seconds"] for c in cells if c["mode"] == mode and c["batch"] == batch]
    if same:
        return max(same) * 1.1
    smaller = [c for c in cells if c["mode"] == mode and c["batch"] < batch]
    return max((c["s_per_image"] * batch * 1.1 for c in smaller), default=0.0)


def _tiny_model() -> dict:
    from amadapter.testing import tiny_config

    cfg = tiny_config()
    cfg["text_embeds"].update(kind="prompt")  # SD1.5's kind: CFG runs in every mode
    return cfg


def toy_section(args, device) -> dict:
    from amadapter.bundled import toy_model_dir

    out = {"model": "toy", "folder": str(toy_model_dir()), "batch": args.toy_batch, "steps": TOY_STEPS,
           "guidance_scale": TOY_CFG,
           "mode": "am_adapter", "rows": []}
    for dtype_name in ("fp32", "bf16"):
        pipe = build_pipeline("toy", device, DTYPES[dtype_name], args.speed)
        sample = pipe.unet.config.sample_size
        size = args.toy_size or tuple(int(s) * pipe.vae_scale_factor
                                      for s in (sample if isinstance(sample, (list, tuple)) else (sample, sample)))
        row = time_sampling(pipe, device, size, "am_adapter", args.toy_batch, TOY_STEPS, TOY_CFG,
                            exemplar_banks(pipe, size, TOY_STEPS, TOY_CFG))
        out["rows"].append({"dtype": dtype_name, "size": list(size), **row})
        print(json.dumps(out["rows"][-1]), flush=True)
    return out


def busy_share(prof, window_start_us: float) -> float | None:
    """Union of CUDA kernel intervals after ``window_start_us`` over the wall time from there to the last kernel's end."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.start >= window_start_us)
    if not spans:
        return None
    busy, cur_s, cur_e = 0.0, *spans[0]
    for s, e in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    return busy / max(1e-9, cur_e - window_start_us)


def train_section(args, device) -> dict:
    from amadapter.bundled import toy_model_dir
    from training.loop import make_task, read_loss_log, train_worker
    from training.registry import load_train_config
    from training.sources import training_data

    warm, timed = args.train_steps
    overrides = [f"init_from={toy_model_dir()}", f"batch_size={args.train_batch}", "steps=1000000",
                 "warmup_steps=0", "checkpoint_every=1000000", f"use_gpu={str(device.type == 'cuda').lower()}",
                 f"loader.num_workers={args.train_workers}"] + ([] if device.type == "cuda" else ["torch_threads=1"])
    if args.tiny:
        overrides += ["data.height=16", "data.width=32"]
    root = Path(tempfile.mkdtemp(prefix="amgen-bench-gpu-"))
    preset = Path(str(files("configs"))) / "train_toy_stage1_gpu.yaml"

    def run(steps: int, name: str, profiled: bool = False):
        cfg = load_train_config("stage1", preset, [*overrides, f"out_dir={root / name}"])
        task = make_task(cfg, training_data(cfg.data))
        if not profiled:
            return train_worker(task, max_steps=steps), cfg
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            summary = train_worker(task, max_steps=steps)
        return (summary, prof), cfg

    short, cfg = run(warm, "short")
    long_, _ = run(warm + timed, "long")
    seconds = long_.seconds - short.seconds
    out = {"config": "train_toy_stage1_gpu", "init_from": "toy", "batch": cfg.batch_size,
           "mixed_precision": cfg.mixed_precision, "optimizer_impl": cfg.optimizer_impl,
           "loader_workers": cfg.loader.num_workers, "warm_steps": warm, "timed_steps": timed,
           "samples_per_s": cfg.batch_size * timed / max(1e-9, seconds),
           "loss_finite": all(np.isfinite(r["loss"]) for r in read_loss_log(Path(long_.out_dir) / "loss.jsonl")),
           "gpu_busy_share": None}
    if args.train_profile_steps and device.type == "cuda":
        (summary, prof), _ = run(warm + args.train_profile_steps, "profiled", profiled=True)
        # the window opens where the W-th optimizer step's launches end (profiler times, in us)
        ends = sorted(e.time_range.end for e in prof.events() if e.name.startswith("Optimizer.step#"))
        try:
            out["gpu_busy_share"] = busy_share(prof, ends[warm - 1] if warm and len(ends) >= warm else 0.0)
        except Exception as e:  # the trace's layout differs in this torch: keep the rest of the section
            out["gpu_busy_share_error"] = f"{type(e).__name__}: {e}"
        out["profiled_steps"] = args.train_profile_steps
    print(json.dumps(out), flush=True)
    return out


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU-sized run of every section (tests)")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--budget-s", type=float, default=270.0, help="skip SD1.5 cells after this many seconds")
    ap.add_argument("--dtypes", default=None, help="SD1.5 dtypes (default fp16,bf16; --tiny: bf16)")
    ap.add_argument("--sd-batches", default=None, help="default 1,8 (--tiny: 1,2)")
    ap.add_argument("--sd-steps", type=int, default=None, help="default 20 (--tiny: 2)")
    ap.add_argument("--sd-size", type=int, default=None, help="default 512 (--tiny: 32)")
    ap.add_argument("--toy-batch", type=int, default=None, help="default 64 (--tiny: 1)")
    ap.add_argument("--toy-size", default=None, help="HxW (default the model's 64x128; --tiny: 16x32)")
    ap.add_argument("--train-batch", type=int, default=None, help="default 256 (--tiny: 2)")
    ap.add_argument("--train-steps", default=None, help="W,T: warm-up and timed steps (default 5,30; --tiny: 1,2)")
    ap.add_argument("--train-profile-steps", type=int, default=5)
    ap.add_argument("--train-workers", type=int, default=None, help="loader workers (default: CPUs - 2; --tiny: 0)")
    ap.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"),
                    help="model.channels_last: auto = on for CUDA, off on CPU")
    ap.add_argument("--compile", default="off", help="model.compile: off, default, reduce-overhead, max-autotune")
    ap.add_argument("--skip", default="", help="sections to leave out: sd15,toy,train")
    args = ap.parse_args(argv)
    t = args.tiny
    args.dtypes = (args.dtypes or ("bf16" if t else "fp16,bf16")).split(",")
    for d in args.dtypes:
        if d not in DTYPES:
            ap.error(f"--dtypes: unknown dtype {d!r} (known: {', '.join(DTYPES)})")
    args.sd_batches = [int(b) for b in (args.sd_batches or ("1,2" if t else "1,8")).split(",")]
    args.sd_steps = args.sd_steps or (2 if t else 20)
    args.sd_size = args.sd_size or (32 if t else 512)
    args.toy_batch = args.toy_batch or (1 if t else 64)
    toy_size = args.toy_size or ("16x32" if t else None)
    args.toy_size = tuple(int(v) for v in toy_size.split("x")) if toy_size else None
    args.train_batch = args.train_batch or (2 if t else 256)
    args.train_steps = [int(s) for s in (args.train_steps or ("1,2" if t else "5,30")).split(",")]
    if args.train_workers is None:
        args.train_workers = 0 if t else max(0, min(14, (os.cpu_count() or 2) - 2))
    args.skip = {s for s in args.skip.split(",") if s}
    args.speed = {"channels_last": {"auto": None, "on": True, "off": False}[args.channels_last],
                  "compile": args.compile}
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # a shared CPU: more threads than free cores only spin
    t0 = time.perf_counter()
    elapsed = lambda: time.perf_counter() - t0  # noqa: E731
    result = {"bench": "gpu", "date": datetime.date.today().isoformat(), "tiny": args.tiny, "device": str(device),
              "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "speed": {"channels_last": args.channels_last, "compile": args.compile},
              "seconds": {}}
    for name, fn in (("toy", lambda: toy_section(args, device)), ("train", lambda: train_section(args, device)),
                     ("sd15", lambda: sd15_section(args, device, elapsed))):
        if name in args.skip:
            result[name] = None
            continue
        s0 = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as e:  # one section's failure (an OOM, a kernel this torch lacks) keeps the others' figures
            if args.tiny:
                raise
            result[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            print(json.dumps({name: result[name]}), flush=True)
        result["seconds"][name] = time.perf_counter() - s0
    result["seconds"]["total"] = elapsed()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
