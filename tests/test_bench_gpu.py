"""bench/gpu.py at --tiny on the CPU, with the modules a lent GPU machine lacks blocked: every
section runs, and the last line is one JSON object with the figures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# not on the lent GPU machine, and not carried to it (../shared/tools/device-wheels.sh)
ABSENT_ON_GPU_MACHINE = ("ray", "faiss", "datasets", "albumentations", "matplotlib", "typer", "rich")

RUN = f"""
import runpy, sys
for name in {ABSENT_ON_GPU_MACHINE!r}:
    sys.modules[name] = None  # import fails, as on the GPU machine
sys.argv = ["bench/gpu.py", "--tiny", "--channels-last", "on"]
runpy.run_path("bench/gpu.py", run_name="__main__")
"""


def test_gpu_bench_runs_tiny_on_cpu_without_ray_faiss_datasets():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", RUN], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bench"] == "gpu" and result["tiny"] and result["device"] == "cpu"
    assert result["speed"] == {"channels_last": "on", "compile": "off"}  # the run config's speed keys reach the bench

    sd = result["sd15"]
    assert not sd["skipped"]
    cells = {(c["dtype"], c["mode"], c["batch"]) for c in sd["cells"]}
    assert cells == {("bf16", m, b) for m in ("structure_only", "sa_aug", "am_adapter") for b in (1, 2)}
    assert all(c["images_per_s"] > 0 for c in sd["cells"])
    assert set(sd["am_adapter_over_structure_only"]) == {"bf16/b1", "bf16/b2"}
    ops = sd["top_ops"]["ops"]
    assert len(ops) == 10 and all(o["self_ms"] >= 0 and o["calls"] >= 1 for o in ops)
    assert ops == sorted(ops, key=lambda o: -o["self_ms"])

    assert [r["dtype"] for r in result["toy"]["rows"]] == ["fp32", "bf16"]
    assert all(r["images_per_s"] > 0 for r in result["toy"]["rows"])

    train = result["train"]
    assert train["samples_per_s"] > 0 and train["loss_finite"] and train["mixed_precision"] == "bf16"
    assert train["gpu_busy_share"] is None  # no GPU here


def test_gpu_bench_times_the_demo_sampling():
    import ast

    from pipeline.config import load_config

    tree = ast.parse((REPO / "bench" / "gpu.py").read_text())
    consts = next(ast.literal_eval(n.value) for n in tree.body
                  if isinstance(n, ast.Assign) and getattr(n.targets[0], "elts", None)
                  and [e.id for e in n.targets[0].elts] == ["TOY_STEPS", "TOY_CFG"])
    model = load_config(REPO / "configs" / "toytown_demo.yaml").model
    assert consts == (model.steps, model.guidance_scale)
