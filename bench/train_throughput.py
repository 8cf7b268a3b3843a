"""Training throughput of stage 1 on the toy preset: samples/s per speed option.

Times real optimizer steps of `training.stage1` (the autoencoder encode, the appearance pass, the
generation pass, the backward and AdamW) on toy-town pairs at the preset's size, for each variant:
fp32 (the baseline), bf16 autocast, channels-last memory format, and torch.compile of the UNet.
``--before DIR`` adds "before": fp32 stage 1 from a model folder with a learned AutoencoderKL
(the 012020a7 toy model), which encodes every pair through its VAE.
Data rendering is timed apart and left out of the model figures (the loop renders the next
batch the same way for every variant). The step is the loop's: its AdamW kernel
(``optimizer_impl``, fused by default) and, under bf16, weights cast once per step
(``cast_weights_once``, training/precision.py).

The main figure is CPU time of this process with one torch thread: on a shared box it counts our
work, not the time other jobs held the core. Wall-clock figures are in the JSON too.

Last line: one JSON object.
Usage: python bench/train_throughput.py [--steps 6] [--batch 8] [--variants fp32,bf16,channels_last,compile]
       [--optimizer-impl auto|fused|foreach|loop] [--cast-weights-once on|off] [--count-casts 2] [--adamw-steps 20]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.data import pair_batch  # noqa: E402
from training.loop import DataConfig, autocast_context, make_optimizer, step_generator  # noqa: E402
from training.precision import cast_once  # noqa: E402
from training.sources import ToyTownPairs  # noqa: E402
from training.stage1 import Stage1Config, Stage1Task  # noqa: E402

VARIANTS = ("fp32", "bf16", "channels_last", "compile")


def _config(batch: int, mixed_precision: str, init_from: str | None = None, **speed) -> Stage1Config:
    return Stage1Config(preset="toy", init_from=init_from, out_dir="/tmp/amgen-bench-throughput", steps=10**6, batch_size=batch,
                        lr=1e-4, torch_threads=1, appearance_grad=False, exemplar_t_fraction=(0.3, 0.8),
                        snr_gamma=5.0, mixed_precision=mixed_precision,
                        data=DataConfig(source="toytown", height=64, width=128), **speed)


CAST_OPS = ("aten::to", "aten::_to_copy", "aten::copy_")


def count_casts(step_fn, steps: int = 2) -> dict:
    """Calls per step of the cast and copy ops (aten::_to_copy: real dtype/device copies; aten::to
    also counts no-op calls), from a torch.profiler trace of ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step_fn()
    counts = dict.fromkeys(CAST_OPS, 0)
    for e in prof.events():
        if e.name in counts:
            counts[e.name] += 1
    return {k: v / steps for k, v in counts.items()}


def adamw_ms_per_step(steps: int, rounds: int = 3) -> dict:
    """ms per ``AdamW.step()`` on stage 1's trainable tensors of the toy preset, per kernel
    (``optimizer_impl``), with fixed random gradients; ``rounds`` alternating rounds of ``steps``."""
    from training.loop import adamw_kwargs

    config = _config(8, "no")
    module = Stage1Task(config, ToyTownPairs(config.data)).build(torch.device("cpu"))
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    out = {"tensors": len(params), "values": sum(p.numel() for p in params)}
    for _ in range(rounds):
        for impl in ("loop", "foreach", "fused"):
            copies = [p.detach().clone().requires_grad_(True) for p in params]
            for c, g in zip(copies, grads):
                c.grad = g.clone()
            opt = torch.optim.AdamW(copies, lr=1e-4, **adamw_kwargs(impl, torch.device("cpu")))
            opt.step()  # the state is made at the first step
            t0 = time.perf_counter()
            for _ in range(steps):
                opt.step()
            out.setdefault(impl, []).append(1e3 * (time.perf_counter() - t0) / steps)
    return out


def run_variant(name: str, steps: int, batch: int, batches: list, before: str | None = None, speed: dict | None = None,
                casts_steps: int = 0) -> dict:
    config = _config(batch, "bf16" if name == "bf16" else "no", before if name == "before" else None, **(speed or {}))
    torch.manual_seed(0)
    task = Stage1Task(config, ToyTownPairs(config.data))
    module = task.build(torch.device("cpu"))
    if name == "channels_last":
        module.unet.to(memory_format=torch.channels_last)
        module.structure_net.to(memory_format=torch.channels_last)
    if name == "compile":
        module.unet.forward = torch.compile(module.unet.forward, dynamic=False)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = make_optimizer(params, config, torch.device("cpu"))  # the loop's AdamW kernel (optimizer_impl)
    casts = cast_once(module, config.mixed_precision, config.cast_weights_once)
    module.train()
    cpu, wall, losses = [], [], []

    def train_step(step: int):
        with casts.step() if casts is not None else contextlib.nullcontext():
            with autocast_context(config, torch.device("cpu")):
                out = module(batches[step % len(batches)], step_generator(0, step, 0))
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return out

    for step in range(steps + 2):  # two warm-up steps (compile, allocator)
        c0, w0 = time.process_time(), time.perf_counter()
        out = train_step(step)
        if step >= 2:
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
            losses.append(float(out["loss"]))
    row = {"variant": name, "samples_per_cpu_s": batch * len(cpu) / sum(cpu),
           "samples_per_wall_s": batch * len(wall) / sum(wall), "cpu_s_per_step": sum(cpu) / len(cpu),
           "loss_mean": sum(losses) / len(losses)}
    if casts_steps:
        row["casts_per_step"] = count_casts(lambda: train_step(steps + 2), casts_steps)
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--before", default=None, help="model folder with a learned VAE: adds the 'before' row")
    ap.add_argument("--optimizer-impl", default="auto", choices=("auto", "fused", "foreach", "loop"),
                    help="AdamW kernel (the training config's optimizer_impl); loop: torch's CPU default before it")
    ap.add_argument("--cast-weights-once", default="on", choices=("on", "off"),
                    help="the training config's cast_weights_once (off: autocast casts at every use)")
    ap.add_argument("--count-casts", type=int, default=0, metavar="STEPS",
                    help="also count aten::to/_to_copy/copy_ calls per step over this many profiled steps")
    ap.add_argument("--adamw-steps", type=int, default=0, metavar="N",
                    help="also time AdamW.step() alone per kernel (loop, foreach, fused), 3 rounds of N steps")
    args = ap.parse_args(argv)
    speed = {"optimizer_impl": args.optimizer_impl, "cast_weights_once": args.cast_weights_once == "on"}
    torch.set_num_threads(1)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] + (["before"] if args.before else [])
    for v in variants:
        if v not in VARIANTS and v != "before":
            raise SystemExit(f"unknown variant {v!r}; known: {VARIANTS}")
    data = ToyTownPairs(_config(args.batch, "no").data)
    c0 = time.process_time()
    batches = [pair_batch(data, 0, s, 0, args.batch) for s in range(4)]
    data_cpu_per_sample = (time.process_time() - c0) / (4 * args.batch)
    rows = []
    for v in variants:
        try:
            rows.append(run_variant(v, args.steps, args.batch, batches, args.before, speed, args.count_casts))
        except Exception as e:  # a variant this torch build cannot run is reported, not hidden
            rows.append({"variant": v, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
        print(json.dumps(rows[-1]), flush=True)
    base = next((r for r in rows if r["variant"] == "fp32" and "error" not in r), None)
    if base:
        for r in rows:
            if "error" not in r:
                r["speedup_vs_fp32"] = r["samples_per_cpu_s"] / base["samples_per_cpu_s"]
    isa = torch.backends.cpu.get_cpu_capability()
    result = {"bench": "train_throughput", "preset": "toy", "batch": args.batch, "steps": args.steps,
              "torch": torch.__version__, "cpu_capability": isa, "data_cpu_s_per_sample": data_cpu_per_sample, **speed,
              "rows": rows}
    if args.adamw_steps:
        result["adamw_ms_per_step"] = adamw_ms_per_step(args.adamw_steps)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
