"""CPU time of one generation step per mode, the check that the GPU work of issue 20 left the CPU
path alone: run it with this tree and with an older one on PYTHONPATH, interleaved, and compare.

One step of the generation net (``generation_eps``, CFG: batch 2 per target) on the bundled toy
model (64x128; random toy weights if absent), one torch thread, process CPU time (the shared
machine's wall clock measures the neighbours), median of ``--repeats`` interleaved runs, for
``--batches`` targets per step. Where the tree has ``amadapter.reductions`` the am_adapter step
is also timed with the GPU-style split reductions forced on the CPU ("am_adapter_split"), which
shows why the CPU keeps its own path.

Last line: one JSON object. Usage: python bench/am_step_cpu.py [--batches 1,8] [--repeats 7]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import amadapter  # noqa: E402
from amadapter.cost import CostSpec  # noqa: E402
from amadapter.loading import load_model  # noqa: E402
from amadapter.testing import tiny_scene  # noqa: E402

try:
    from amadapter.reductions import split_reductions
except ImportError:  # a tree from before the split
    split_reductions = None

SIZE = (64, 128)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=4, help="steps of the exemplar bank (one step is timed)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded = load_model("toy")
    pipe = loaded.pipe
    image, label, _ = tiny_scene(0, size=SIZE, cars=3)
    bank = pipe.encode_exemplar(image, label, num_inference_steps=args.steps, guidance_scale=3.0)
    t = bank.timesteps[0]
    modes = ["structure_only", "sa_aug", "am_adapter"] + (["am_adapter_split"] if split_reductions else [])
    result = {"tree": os.path.dirname(os.path.dirname(os.path.abspath(amadapter.__file__))), "model": loaded.name,
              "size": list(SIZE), "torch_threads": 1, "step_cpu_s": {}}
    for b in [int(x) for x in args.batches.split(",")]:
        targets = [tiny_scene(100 + i, size=SIZE, cars=1 + i % 3)[1] for i in range(b)]
        lat = torch.randn(2 * b, pipe.unet.config.in_channels, SIZE[0] // pipe.vae_scale_factor,
                          SIZE[1] // pipe.vae_scale_factor, generator=torch.Generator().manual_seed(0))
        cond = pipe.prepare_condition(targets)
        states, cond_start = pipe._embeds(b, cfg=True)
        cost = CostSpec(targets, label)

        def step(mode):
            forced = split_reductions() if mode == "am_adapter_split" else contextlib.nullcontext()
            with torch.no_grad(), forced:
                pipe.generation_eps(lat, t, cond, tokens=bank.tokens[0], mode=mode.replace("_split", ""), cost=cost,
                                    encoder_hidden_states=states, cond_start=cond_start)

        times = {m: [] for m in modes}
        for m in modes:
            step(m)  # warm-up (and the matching cost, cached per grid)
        for _ in range(args.repeats):
            for m in modes:
                c0 = time.process_time()
                step(m)
                times[m].append(time.process_time() - c0)
        med = {m: statistics.median(v) for m, v in times.items()}
        result["step_cpu_s"][f"batch{b}"] = med
        print(f"batch {b}: " + ", ".join(f"{m} {v * 1e3:.1f} ms" for m, v in med.items()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
