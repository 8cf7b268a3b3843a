"""Exemplar reuse benchmark: one exemplar bank serving K targets vs the release's loop,
and where the time of one am_adapter step goes.

Models (``--models``):
  * ``toy``: the bundled trained toy weights (amadapter/weights/toy; random toy weights if
    absent) at 64x128. Its text condition is one learned null embedding, so the appearance
    pass runs one CFG half.
  * ``sd15``: the sd15 preset's block layout (4 levels, 2 layers per block, 16 attn1 layers,
    8 heads, CLIP-sized 77-token condition) shrunk in width (``--sd15-width``) and size
    (``--sd15-size``) so that it runs on CPU; random weights built from configs, with a random
    but distinct cond/uncond text pair, so the appearance pass runs both CFG halves as at SD1.5.
    Its matcher aggregates the largest layers on half their side (``max_side`` = latent side / 2),
    the release's 64 -> 32 ratio.

For K targets that share one exemplar (``--ks``):
  * reuse: ``encode_exemplar`` once (VAE encode, DDIM inversion, appearance pass), then the
    K targets generated as one batch reading that bank;
  * per-target recomputation (the release's loop): for every target, inversion and
    appearance pass again, batch size 1. Every target costs the same there, so for K above
    ``--per-target-cap`` it runs on the first cap targets and its rate stands for all K
    (``--per-target-cap 0``: all K).
Both produce the same samples (same seeds): the largest absolute differences of their final
latents (fp32) and decoded pixels are reported.

Step profile: one generation step (1 target, CFG batch 2) in am_adapter and sa_aug, with the
CPU time inside the adapter's parts: matching cost (cold: built once per grid pair and
generation, then cached), resizing to/from the aggregation grid, the 4D aggregation convs,
GroupNorm+ReLU, and the joint softmax. ``adapter_share`` = time inside the matcher's refinement
/ am_adapter step. The Amdahl bound: reuse saves the exemplar side (E: VAE encode + inversion
+ appearance pass) for all targets but one, and cannot save the target side (G: generation +
decode); with G at batch 1 the ratio at K is (E + G) / (E / K + G). Batching lowers the target
side per image to G_K (from the reuse run: reuse time / K - E / K), and the ratio can never pass
(E + G) / G_K, the ceiling printed per K: what reuse gives if the exemplar side cost nothing.

Timing is the process's CPU time with one torch thread (best of --repeats, interleaved):
on a shared machine wall-clock time mostly measures the neighbours; wall figures are
reported too (keys ending in _wall).
Last line: one JSON object. Usage: python bench/exemplar_reuse.py [--models toy,sd15]
[--ks 1,4,16,64] [--steps 10] [--sd15-steps 20] [--repeats 1] [--per-target-cap 8]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import contextmanager

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from amadapter import attention as attention_module  # noqa: E402
from amadapter import matcher as matcher_module  # noqa: E402
from amadapter.bundled import toy_model_dir  # noqa: E402
from amadapter.cost import CostSpec  # noqa: E402
from amadapter.pipeline import AMAdapterPipeline  # noqa: E402
from amadapter.presets import get_preset  # noqa: E402
from amadapter.testing import tiny_scene  # noqa: E402

WEIGHTS = toy_model_dir()
TOY_SIZE = (64, 128)
SD15_WIDTH = (64, 128, 256, 256)  # SD1.5: (320, 640, 1280, 1280)
SD15_SIZE = (128, 128)  # SD1.5: 512x512


def load_toy() -> tuple[AMAdapterPipeline, str]:
    if (WEIGHTS / "model_index.json").is_file():
        return AMAdapterPipeline.from_pretrained(WEIGHTS), f"trained ({WEIGHTS})"
    return AMAdapterPipeline.from_preset("toy", seed=0), "random toy weights"


def with_text_condition(pipe: AMAdapterPipeline, seed: int = 1) -> AMAdapterPipeline:
    """Fill a prompt-kind model's cond/uncond embeddings with distinct seeded values (CLIP's
    scale, ~N(0, 1)): a real text condition, so CFG's halves differ as at SD1.5."""
    te = pipe.text_embeds
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        te.cond.copy_(torch.randn(te.cond.shape, generator=g))
        te.uncond.copy_(torch.randn(te.uncond.shape, generator=g))
    return pipe


def sd15_shaped_config(width=SD15_WIDTH, size=SD15_SIZE) -> dict:
    """The sd15 preset with every UNet block narrower, at a smaller image size; the VAE and the
    structure net shrink along (their cost is not the subject here)."""
    p = get_preset("sd15")
    p["name"] = "sd15_shaped"
    p["image_size"] = tuple(size)
    latent = (size[0] // 8, size[1] // 8)
    p["unet"].update(block_out_channels=tuple(width), sample_size=latent)
    p["vae"].update(block_out_channels=(32, 64, 64, 64), sample_size=tuple(size), norm_num_groups=16)
    p["structure_net"].update(stem_channels=(16, 16, 32), stage_channels=(32, 64), out_channels=width[0],
                              time_proj_dim=32, time_embed_dim=64)
    p["matcher"].update(max_side=max(latent) // 2)
    return p


def load_sd15_shaped(width=SD15_WIDTH, size=SD15_SIZE) -> tuple[AMAdapterPipeline, str]:
    pipe = with_text_condition(AMAdapterPipeline.from_preset(sd15_shaped_config(width, size), seed=0))
    return pipe, f"random, sd15 layout, widths {tuple(width)}, {size[0]}x{size[1]}, matcher max_side {pipe.matcher.config.max_side}"


class Clock:
    """Wall time and this process's CPU time. On a shared machine the wall clock measures
    the neighbours as much as us; CPU time (with one torch thread) measures our work."""

    def __enter__(self):
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall0, time.process_time() - self.cpu0


def run_reuse(pipe, image, label, targets, seeds, steps, gs):
    with Clock() as clock:
        bank = pipe.encode_exemplar(image, label, num_inference_steps=steps, guidance_scale=gs)
        out = pipe(targets, bank=bank, seeds=seeds, num_inference_steps=steps, guidance_scale=gs)
    return out.latents, out.images, clock


def run_per_target(pipe, image, label, targets, seeds, steps, gs):
    with Clock() as clock:
        outs = [pipe([t], image, label, seeds=[s], num_inference_steps=steps, guidance_scale=gs)
                for t, s in zip(targets, seeds)]
    return torch.cat([o.latents for o in outs]), np.concatenate([o.images for o in outs]), clock


# ----------------------------------------------------------------------------- step profile
PARTS = {  # part -> (owner, attribute) whose calls are timed
    "resize": [(matcher_module, "reduced_volume"), (matcher_module, "add_upsampled_")],
    "aggregation": [(matcher_module.Separable4DConv, "forward")],
    "groupnorm": [(matcher_module, "group_norm_relu")],
    "joint": [(attention_module, "_joint_rows")],
    "refine": [(matcher_module.Matcher, "refine_")],
}


@contextmanager
def timed_parts(totals: dict):
    """Add the CPU time spent inside each part's functions to ``totals[part]`` (inclusive)."""
    saved = []

    def wrap(fn, part):
        def timed(*args, **kwargs):
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[part] = totals.get(part, 0.0) + time.process_time() - t0
        return timed

    for part, targets in PARTS.items():
        for owner, name in targets:
            fn = owner.__dict__[name]
            saved.append((owner, name, fn))
            setattr(owner, name, wrap(fn, part))
    try:
        yield totals
    finally:
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)


@torch.no_grad()
def step_profile(pipe, image, label, target, size, steps, gs, reps):
    """Median CPU time of one generation step (1 target, CFG) per mode, and of the adapter's
    parts inside the am_adapter step; the matching cost is timed cold (a fresh CostSpec)."""
    bank = pipe.encode_exemplar(image, label, num_inference_steps=steps, guidance_scale=gs)
    # The latent's shape comes from the model, as the pipeline makes it (channels: the UNet's input,
    # 48 for the bundled pixel-unshuffle latent, 4 for a KL VAE; side: image side / the VAE's factor).
    f = pipe.vae_scale_factor
    z = pipe.initial_noise([0], (size[0] // f, size[1] // f))
    lat = torch.cat([z, z])  # the CFG pair
    cond = pipe.prepare_condition(target)
    states, cond_start = pipe._embeds(1, cfg=True)
    t = bank.timesteps[0]
    spec, grids = CostSpec([target], label), []

    def cost_fn(q_hw, e_hw):  # the pipeline's own CostSpec adapter, recording the grid pairs asked for
        grids.append((q_hw, e_hw))
        return spec.cost(q_hw, e_hw, device=lat.device, dtype=lat.dtype)

    pipe.generation_eps(lat, t, cond, tokens=bank.tokens[0], mode="am_adapter", cost=cost_fn,
                        encoder_hidden_states=states, cond_start=cond_start)  # warm-up; costs cached
    times = {"am_adapter": [], "sa_aug": []}
    parts: list[dict] = []
    cost_cold = []
    for _ in range(reps):
        fresh = CostSpec([target], label)
        with Clock() as c:
            for q_hw, e_hw in dict.fromkeys(grids):
                fresh.cost(q_hw, e_hw, device=lat.device, dtype=lat.dtype)
        cost_cold.append(c.cpu)
        for mode in times:
            totals: dict = {}
            with timed_parts(totals), Clock() as clock:
                pipe.generation_eps(lat, t, cond, tokens=bank.tokens[0], mode=mode, cost=cost_fn,
                                    encoder_hidden_states=states, cond_start=cond_start)
            times[mode].append(clock.cpu)
            if mode == "am_adapter":
                parts.append(totals)
    am, sa = statistics.median(times["am_adapter"]), statistics.median(times["sa_aug"])

    def med(key):
        return statistics.median(p.get(key, 0.0) for p in parts)

    refine = med("refine")
    cost = statistics.median(cost_cold)
    split = {
        "cost_build_cold": cost,  # once per generation (cached for the other steps)
        "resize": med("resize"),
        "aggregation_conv": med("aggregation"),
        "groupnorm_relu": med("groupnorm"),
        "refine_other": refine - med("resize") - med("aggregation") - med("groupnorm"),
        "joint_softmax": med("joint") - refine,
    }
    return {"step_s_am_adapter": am, "step_s_sa_aug": sa, "adapter_share": refine / am,
            "adapter_overhead": (am - sa) / am, "refine_s": refine,
            "adapter_share_with_cost": (refine + cost / steps) / (am + cost / steps),
            "parts_s": split}


def exemplar_target_costs(pipe, image, label, target, steps, gs) -> dict:
    """CPU seconds per image of the exemplar side (encode_exemplar) and of one target's
    generation reading a bank (batch 1, decode included): Amdahl's E and G."""
    with Clock() as ce:
        bank = pipe.encode_exemplar(image, label, num_inference_steps=steps, guidance_scale=gs)
    with Clock() as cg:
        pipe([target], bank=bank, seeds=[0], num_inference_steps=steps, guidance_scale=gs)
    return {"exemplar_s": ce.cpu, "target_s": cg.cpu}


def amdahl(e: float, g: float, k: int) -> float:
    """Best reuse ratio at K when the exemplar side E is saved for K-1 targets, G never."""
    return (e + g) / (e / k + g)


# ----------------------------------------------------------------------------- one model
def bench_model(name, pipe, weights, size, steps, args) -> dict:
    gs = args.guidance
    image, label, _ = tiny_scene(0, size=size, cars=3)
    ks = [int(k) for k in args.ks.split(",")]
    pipe(label, image, label, seeds=0, num_inference_steps=1, guidance_scale=gs)  # warm-up, not timed
    print(f"model {name}: {weights}; {size[0]}x{size[1]}, {steps} steps, CFG {gs}, torch threads "
          f"{torch.get_num_threads()}, appearance pass CFG halves: {1 if pipe.text_embeds.identical_halves else 2}")
    res = {"weights": weights, "size": list(size), "steps": steps, "ks": ks,
           "reuse_images_per_s": {}, "per_target_images_per_s": {}, "ratio": {}, "per_target_targets": {},
           "reuse_images_per_s_wall": {}, "per_target_images_per_s_wall": {}, "ratio_wall": {}}
    max_lat, max_px = 0.0, 0
    for k in ks:
        targets = [tiny_scene(100 + i, size=size, cars=1 + i % 3)[1] for i in range(k)]
        seeds = list(range(k))
        n_pt = k if args.per_target_cap <= 0 else min(k, args.per_target_cap)
        best = {"reuse": [float("inf")] * 2, "per_target": [float("inf")] * 2}  # [cpu, wall]
        for _ in range(args.repeats):  # interleaved; best time of each is the least disturbed
            lat_r, img_r, c = run_reuse(pipe, image, label, targets, seeds, steps, gs)
            best["reuse"] = [min(best["reuse"][0], c.cpu), min(best["reuse"][1], c.wall)]
            lat_p, img_p, c = run_per_target(pipe, image, label, targets[:n_pt], seeds[:n_pt], steps, gs)
            best["per_target"] = [min(best["per_target"][0], c.cpu), min(best["per_target"][1], c.wall)]
        d_lat = float((lat_r[:n_pt] - lat_p).abs().max())
        d_px = int(np.abs(img_r[:n_pt].astype(int) - img_p).max())
        max_lat, max_px = max(max_lat, d_lat), max(max_px, d_px)
        (r_cpu, r_wall), (p_cpu, p_wall) = best["reuse"], best["per_target"]
        reuse, per_target = k / r_cpu, n_pt / p_cpu
        res["reuse_images_per_s"][k], res["per_target_images_per_s"][k] = reuse, per_target
        res["ratio"][k] = reuse / per_target
        res["per_target_targets"][k] = n_pt
        res["reuse_images_per_s_wall"][k], res["per_target_images_per_s_wall"][k] = k / r_wall, n_pt / p_wall
        res["ratio_wall"][k] = (k / r_wall) / (n_pt / p_wall)
        note = "" if n_pt == k else f" (per-target rate on {n_pt} of {k} targets)"
        print(f"  K={k:3d}: reuse {reuse:6.3f} img/CPU-s | per-target {per_target:6.3f} img/CPU-s | "
              f"x{reuse / per_target:5.2f} (wall x{res['ratio_wall'][k]:5.2f}) | max |dlatent| {d_lat:.2e}, "
              f"max |dpixel| {d_px}{note}")
    res["max_abs_diff"], res["max_abs_diff_pixels"] = max_lat, max_px

    target = tiny_scene(100, size=size)[1]
    share = step_profile(pipe, image, label, target, size, steps, gs, args.reps)
    res.update(share)
    p = share["parts_s"]
    print(f"  one generation step (1 target, CFG batch 2): am_adapter {share['step_s_am_adapter']:.4f} CPU-s, "
          f"sa_aug {share['step_s_sa_aug']:.4f}; adapter (matcher refinement) {100 * share['adapter_share']:.1f}% "
          f"of the step; am_adapter over sa_aug {100 * share['adapter_overhead']:.1f}%")
    print("  inside the am_adapter step (CPU-s): " + ", ".join(f"{k} {v:.4f}" for k, v in p.items())
          + f"  [cost built once per generation: {100 * share['adapter_share_with_cost']:.1f}% with it "
          f"amortized over {steps} steps]")

    costs = exemplar_target_costs(pipe, image, label, target, steps, gs)
    res.update(costs)
    e, g1 = costs["exemplar_s"], costs["target_s"]
    # the target side per image at batch K, from the reuse run: (reuse time - E) / K
    res["target_s_batched"] = {k: max(1e-9, 1 / res["reuse_images_per_s"][k] - e / k) for k in ks}
    res["amdahl_ratio"] = {k: amdahl(e, g1, k) for k in ks}  # batch-1 target side
    res["amdahl_ceiling"] = {k: (e + g1) / res["target_s_batched"][k] for k in ks}  # E free, target side at batch K
    print(f"  Amdahl: per image, exemplar side E {e:.3f} CPU-s, target side G {g1:.3f} CPU-s at batch 1 -> "
          + ", ".join(f"K={k}: G_K {res['target_s_batched'][k]:.3f}, ratio <= x{res['amdahl_ratio'][k]:.2f} at batch-1 G, "
                      f"ceiling x{res['amdahl_ceiling'][k]:.2f} (E free, G_K)" for k in ks))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="toy,sd15", help="toy, sd15 (sd15-shaped) or both")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps of the toy model")
    ap.add_argument("--sd15-steps", type=int, default=20, help="denoising steps of the sd15-shaped model")
    ap.add_argument("--sd15-width", default=",".join(map(str, SD15_WIDTH)), help="UNet block widths (SD1.5: 320,640,1280,1280)")
    ap.add_argument("--sd15-size", default=f"{SD15_SIZE[0]}x{SD15_SIZE[1]}", help="image size HxW (SD1.5: 512x512)")
    ap.add_argument("--ks", default="1,4,16,64", help="targets per exemplar")
    ap.add_argument("--per-target-cap", type=int, default=8,
                    help="run the per-target loop on at most this many targets (its rate does not depend on K); 0: all")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats per K (best time kept)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the single-step profile")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time = work done)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"bench": "exemplar_reuse", "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
              "guidance_scale": args.guidance, "timing": "process CPU time (wall-clock figures in *_wall)",
              "models": {}, "adapter_share": {}}
    for name in args.models.split(","):
        if name == "toy":
            pipe, weights = load_toy()
            res = bench_model("toy", pipe, weights, TOY_SIZE, args.steps, args)
        elif name == "sd15":
            width = tuple(int(w) for w in args.sd15_width.split(","))
            size = tuple(int(s) for s in args.sd15_size.split("x"))
            pipe, weights = load_sd15_shaped(width, size)
            res = bench_model("sd15", pipe, weights, size, args.sd15_steps, args)
        else:
            raise SystemExit(f"--models: unknown model {name!r} (toy, sd15)")
        result["models"][name] = res
        result["adapter_share"][name] = res["adapter_share"]
        del pipe
    first = result["models"][args.models.split(",")[0]]
    # today's top-level keys, from the first model (the toy model by default)
    for key in ("weights", "size", "steps", "ks", "reuse_images_per_s", "per_target_images_per_s", "ratio",
                "reuse_images_per_s_wall", "per_target_images_per_s_wall", "ratio_wall", "max_abs_diff",
                "max_abs_diff_pixels", "step_s_am_adapter", "step_s_sa_aug", "adapter_overhead"):
        result[key] = first[key]
    result["max_abs_diff"] = max(m["max_abs_diff"] for m in result["models"].values())
    result["max_abs_diff_pixels"] = max(m["max_abs_diff_pixels"] for m in result["models"].values())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
