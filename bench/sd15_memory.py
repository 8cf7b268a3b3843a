"""SD1.5 at its real size: one generation step at 512x512, sa_aug vs am_adapter, fp32 and bf16.

The sd15 preset built from its configs with random weights (nothing is downloaded), with a
random but distinct cond/uncond text pair so CFG's halves differ. For each (dtype, mode) a
fresh subprocess builds the model, records the exemplar's attn1 tokens with one appearance
pass (CFG batch 2, the exemplar side, not measured), then resets the kernel's peak-RSS mark
(/proc/self/clear_refs) and runs one generation step at batch 1 (CFG batch 2, scheduler step
included). Reported per run: CPU and wall seconds of the step, the peak RSS during it (weights
included) and its rise over the RSS before it. ``adapter_peak_ratio`` = am_adapter's peak RSS /
sa_aug's, per dtype (goal: at most 1.25).

The release's approach, by the arithmetic of its sizes: at a 64x64 layer it materializes, in
fp32, the attention scores of the CFG pair against [self ; exemplar] keys (2 x 8 heads x 4096 x
8192), their softmax (the same size), the exemplar block the adapter reads (2 x 8 x 4096 x 4096)
and the residual resized back to that size. Ours holds one sample's exemplar logits (8 x 4096 x
4096 in the model's dtype), no self logits on CPU (torch's fused kernel), volumes on the 32x32
grid for one sample at a time, and the upsampled residual in blocks of RESIDUAL_BUDGET_BYTES.

With a CUDA device (``--cuda``, on by default when one is present) it also times full
20-step generations with reuse (one bank, batch 1/4/8) and records peak GPU memory. No such
device was present where this was written; that path has not run.

Timing uses ``--threads`` torch threads (default 1: CPU time = our work on a shared box).
Peak memory of the whole run stays under ~6 GiB (fp32 weights 3.4 GB for the UNet).
Last line: one JSON object. Usage: python bench/sd15_memory.py [--dtypes fp32,bf16] [--tiny]
[--modes sa_aug,am_adapter] [--size 512x512] [--threads 1]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
GiB = 1 << 30


def _status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1))


def _release_freed_memory() -> None:
    gc.collect()
    try:  # hand freed heap pages back to the OS, so the RSS before the step is what is in use
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


TINY_WIDTH = (32, 32, 64, 64)   # --tiny: the sd15 block layout at these widths (a smoke run, not a measurement)
TINY_SIZE = "64x64"


def build(size, dtype_name: str, device: str = "cpu", tiny: bool = False):
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from exemplar_reuse import sd15_shaped_config, with_text_condition

    from amadapter.pipeline import AMAdapterPipeline

    preset = sd15_shaped_config(TINY_WIDTH, size) if tiny else "sd15"
    pipe = with_text_condition(AMAdapterPipeline.from_preset(preset, seed=0))
    pipe.to(device, getattr(torch, DTYPES[dtype_name]))
    return pipe


def worker(mode: str, dtype_name: str, size, steps: int, tiny: bool = False) -> dict:
    """One generation step of ``mode`` in a fresh process; returns its figures."""
    import torch

    from amadapter.cost import CostSpec
    from amadapter.testing import tiny_scene

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from exemplar_reuse import Clock, timed_parts

    with torch.no_grad():
        pipe = build(size, dtype_name, tiny=tiny)
        image, label, _ = tiny_scene(0, size=size, cars=3)
        target = tiny_scene(100, size=size, cars=2)[1]
        f = pipe.vae_scale_factor
        latent_hw = (size[0] // f, size[1] // f)
        sched = pipe._scheduler(steps)
        t = sched.timesteps[0]
        g = torch.Generator().manual_seed(0)
        c = pipe.unet.config.in_channels   # the model's latent channels (4 for SD1.5's KL VAE)
        z_ex = torch.randn(1, c, *latent_hw, generator=g).to(pipe.dtype)
        z = torch.randn(1, c, *latent_hw, generator=g).to(pipe.dtype)
        states, cond_start = pipe._embeds(1, cfg=True)
        # the exemplar side (once per exemplar; not measured): one appearance pass records the tokens
        _, tokens = pipe.appearance_tokens(torch.cat([z_ex, z_ex]), t, pipe.prepare_condition(label),
                                           encoder_hidden_states=states, cond_start=cond_start)
        cond = pipe.prepare_condition(target)
        cost = CostSpec([target], label)
        _release_freed_memory()
        reset = _reset_peak_rss()
        rss_before = _status_kb("VmRSS") * 1024
        totals: dict = {}
        with timed_parts(totals), Clock() as clock:
            eps = pipe.generation_eps(torch.cat([z, z]), t, cond, tokens=tokens, mode=mode, cost=cost,
                                      encoder_hidden_states=states, cond_start=cond_start)
            eps_u, eps_c = eps.chunk(2)
            sched.step(eps_u + 7.5 * (eps_c - eps_u), t, z)
        peak = _status_kb("VmHWM") * 1024
    return {"mode": mode, "dtype": dtype_name, "step_s_cpu": clock.cpu, "step_s_wall": clock.wall,
            "refine_s_cpu": totals.get("refine", 0.0), "peak_rss_bytes": peak, "rss_before_bytes": rss_before,
            "step_rss_rise_bytes": peak - rss_before, "peak_reset": reset,
            "torch_threads": torch.get_num_threads(), "finite": bool(torch.isfinite(eps).all())}


def cuda_worker(size, steps: int, batches, dtype_name: str, tiny: bool = False) -> dict:
    """Images/s of full generations with one reused bank at several batch sizes, peak GPU memory."""
    import torch

    from amadapter.testing import tiny_scene

    pipe = build(size, dtype_name, device="cuda", tiny=tiny)
    image, label, _ = tiny_scene(0, size=size, cars=3)
    out = {"device": torch.cuda.get_device_name(0), "dtype": dtype_name, "steps": steps, "images_per_s": {},
           "peak_gpu_bytes": {}}
    with torch.no_grad():
        bank = pipe.encode_exemplar(image, label, num_inference_steps=steps)
        for b in batches:
            targets = [tiny_scene(100 + i, size=size, cars=1 + i % 3)[1] for i in range(b)]
            pipe(targets, bank=bank, seeds=list(range(b)), num_inference_steps=steps)  # warm-up
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            pipe(targets, bank=bank, seeds=list(range(b)), num_inference_steps=steps)
            torch.cuda.synchronize()
            out["images_per_s"][b] = b / (time.perf_counter() - t0)
            out["peak_gpu_bytes"][b] = torch.cuda.max_memory_allocated()
    return out


def release_arithmetic(dtype_bytes: int, heads: int = 8, side: int = 64, agg_side: int = 32) -> dict:
    """Bytes of the adapter's big tensors at one 64x64 layer: the release's vs ours (batch 1)."""
    from amadapter.matcher import RESIDUAL_BUDGET_BYTES

    n = side * side
    m = agg_side * agg_side
    release = {  # fp32 whatever the model's dtype; CFG pair = 2 rows
        "scores_self_and_exemplar": 2 * heads * n * 2 * n * 4,
        "softmax_probs": 2 * heads * n * 2 * n * 4,
        "exemplar_block": 2 * heads * n * n * 4,
        "residual_resized_back": 2 * heads * n * n * 4,
    }
    ours = {  # conditional row only; the unconditional row runs plain fused attention
        "exemplar_logits": heads * n * n * dtype_bytes,
        "self_logits": 0,
        "aggregation_volumes": m * m * (heads + 1 + 32 + 16) * dtype_bytes,  # R + widest layer pair alive
        "residual_blocks": RESIDUAL_BUDGET_BYTES,
    }
    return {"release_bytes": release, "release_total_bytes": sum(release.values()),
            "ours_bytes": ours, "ours_total_bytes": sum(ours.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--modes", default="sa_aug,am_adapter")
    ap.add_argument("--size", default=None, help=f"HxW (default 512x512; {TINY_SIZE} with --tiny)")
    ap.add_argument("--tiny", action="store_true",
                    help=f"the sd15 block layout at widths {TINY_WIDTH} and {TINY_SIZE}: checks that the bench runs, "
                    "measures nothing about SD1.5")
    ap.add_argument("--steps", type=int, default=20, help="schedule length (the step timed is its first)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cuda", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--cuda-batches", default="1,4,8")
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "DTYPE"), help=argparse.SUPPRESS)
    ap.add_argument("--cuda-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.size = args.size or (TINY_SIZE if args.tiny else "512x512")
    size = tuple(int(s) for s in args.size.split("x"))
    if args.worker or args.cuda_worker:
        import torch

        torch.set_num_threads(args.threads)
        if args.cuda_worker:
            res = cuda_worker(size, args.steps, [int(b) for b in args.cuda_batches.split(",")], args.dtypes.split(",")[0],
                              tiny=args.tiny)
        else:
            res = worker(*args.worker, size, args.steps, tiny=args.tiny)
        print(json.dumps(res))
        return

    def child(extra) -> dict:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--size", args.size, "--steps", str(args.steps),
               "--threads", str(args.threads), *(["--tiny"] if args.tiny else []), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    result = {"bench": "sd15_memory", "size": list(size), "tiny": args.tiny, "batch": 1, "torch_threads": args.threads,
              "where": "CPU", "runs": [], "adapter_peak_ratio": {}, "adapter_step_rise_ratio": {}}
    for dtype_name in args.dtypes.split(","):
        by_mode = {}
        for mode in args.modes.split(","):
            r = child(["--worker", mode, dtype_name])
            by_mode[mode] = r
            result["runs"].append(r)
            print(f"{dtype_name} {mode:10s}: step {r['step_s_cpu']:7.2f} CPU-s ({r['step_s_wall']:.2f} s wall), "
                  f"adapter {r['refine_s_cpu']:.2f} CPU-s; peak RSS {r['peak_rss_bytes'] / GiB:.2f} GiB "
                  f"(+{r['step_rss_rise_bytes'] / GiB:.2f} GiB over {r['rss_before_bytes'] / GiB:.2f} GiB before the step)",
                  flush=True)
        if {"sa_aug", "am_adapter"} <= by_mode.keys():
            sa, am = by_mode["sa_aug"], by_mode["am_adapter"]
            result["adapter_peak_ratio"][dtype_name] = am["peak_rss_bytes"] / sa["peak_rss_bytes"]
            result["adapter_step_rise_ratio"][dtype_name] = am["step_rss_rise_bytes"] / max(1, sa["step_rss_rise_bytes"])
            result.setdefault("adapter_share", {})[dtype_name] = am["refine_s_cpu"] / am["step_s_cpu"]
            print(f"{dtype_name}: am_adapter peak / sa_aug peak = {result['adapter_peak_ratio'][dtype_name]:.3f}; "
                  f"adapter = {100 * result['adapter_share'][dtype_name]:.1f}% of the am_adapter step")
    result["release_arithmetic"] = {name: release_arithmetic(4 if name == "fp32" else 2) for name in args.dtypes.split(",")}
    for name, a in result["release_arithmetic"].items():
        print(f"one 64x64 layer, {name}: the release's explicit fp32 matrices {a['release_total_bytes'] / GiB:.2f} GiB "
              f"vs ours {a['ours_total_bytes'] / GiB:.2f} GiB")

    import torch

    want_cuda = args.cuda == "on" or (args.cuda == "auto" and torch.cuda.is_available())
    if want_cuda:
        result["cuda"] = child(["--cuda-worker", "--dtypes", args.dtypes.split(",")[-1], "--cuda-batches", args.cuda_batches])
        print(f"CUDA {result['cuda']['device']}: images/s {result['cuda']['images_per_s']}, peak GPU bytes "
              f"{result['cuda']['peak_gpu_bytes']}")
    else:
        result["cuda"] = None
        print("no CUDA device here: GPU images/s and peak GPU memory not measured")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
