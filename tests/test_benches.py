"""Every script in bench/ runs at its smallest size, as a user runs it (a subprocess from the
repository root), and its last stdout line is one JSON object (or array) with sane figures.

A bench that no longer runs against today's code (a renamed function, a model whose latent
changed shape) fails here instead of in the hands of whoever next needs its figures. A new
script in bench/ without a case here fails ``test_every_bench_has_a_case``.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
# tests/test_bench_gpu.py runs it, with the modules a lent GPU machine lacks blocked.
NOT_HERE = {"gpu.py"}


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def positive(x) -> bool:
    return finite(x) and x > 0


def check_toytown_speed(r, _):
    assert r["scenes"] == 5 and positive(r["scenes_per_s_cpu"]) and positive(r["ratio_to_goal"])
    assert set(r["ms_per_scene"]) == {"layout", "appearance", "render"}


def check_autoencoder(r, _):
    rows = {row["candidate"]: row for row in r["rows"]}
    assert {"pixel_unshuffle", "ground_truth"} <= rows.keys()
    assert rows["pixel_unshuffle"]["lossless"] is True   # space-to-depth is exact
    assert 0 <= rows["ground_truth"]["miou"] <= 100


def check_inversion_signal(r, _):
    corr = r["correlation_with_clean_latent"]
    assert r["n"] == 1 and len(corr) == 2
    for v in corr.values():
        assert -1 <= v["inverted"] <= 1 and 0 <= v["random_noise"] <= 1


def check_sampling_schedule(r, _):
    assert r["n"] == 2 and set(r["rows"]) == {"s1_e1", "s2_e1", "s2_e0.5"} and r["best_miou"] in r["rows"]
    for key, row in r["rows"].items():
        modes = ("am_adapter",) if key.endswith("e0.5") else ("structure_only", "sa_aug", "am_adapter")
        assert set(modes) <= set(row) and row["s_per_triple"] > 0
        assert all(0 <= row[m]["miou"] <= 100 and finite(row[m]["class_de2000"]) for m in modes)


def check_guidance_sweep(r, _):
    assert r["n"] == 2 and set(r["rows"]) == {"1", "3"} and r["best_miou_guidance"] in (1.0, 3.0)
    for row in r["rows"].values():
        assert all(0 <= row[m]["miou"] <= 100 and finite(row[m]["class_de2000"])
                   for m in ("structure_only", "sa_aug", "am_adapter"))
        assert positive(row["s_per_triple_all_modes"])
    # structure_only takes no exemplar, so guidance cannot change it
    assert r["rows"]["1"]["structure_only"] == r["rows"]["3"]["structure_only"]


def check_quality(rows, _):
    by_mode = {row["mode"]: row for row in rows}
    assert {"sa_aug", "am_adapter", "ground_truth"} <= by_mode.keys()
    assert all(row["n"] == 2 for row in rows)
    assert 0 <= by_mode["am_adapter"]["miou"] <= 100 and by_mode["ground_truth"]["class_de2000"] == 0


def check_am_step_cpu(r, _):
    steps = r["step_cpu_s"]["batch1"]
    assert set(steps) == {"structure_only", "sa_aug", "am_adapter", "am_adapter_split"}
    assert all(positive(v) for v in steps.values())


def check_routing_oracle(r, _):
    assert {"cross", "self", "best_oracle_cross"} <= r.keys()
    assert {"sa_aug", "am_adapter (trained matcher)"} <= r["cross"].keys()
    assert r["cross"]["sa_aug"]["class_de2000_reduction_vs_sa_aug"] == 0


def check_sampling_noise(r, _):
    assert r["n"] == 1 and "toy" in r["models"] and r["basis"]
    toy = r["models"]["toy"]
    assert len(toy["model_hash"]) == 8 and toy["samples"] and toy["denoising"]


def check_train_throughput(r, _):
    (row,) = r["rows"]
    assert row["variant"] == "fp32" and "error" not in row
    assert positive(row["samples_per_cpu_s"]) and finite(row["loss_mean"]) and row["speedup_vs_fp32"] == 1


def check_driver_share(r, _):
    assert r["samples"] == 2 and positive(r["driver_cpu_s"]) and positive(r["driver_cpu_s_per_100"])


def check_driver_writer(r, _):
    assert r["samples"] == 4 and r["size"] == [32, 64] and positive(r["png_bytes_per_sample"])
    assert finite(r["writer_cpu_s"]) and r["writer_cpu_s"] >= 0


def check_pipeline_efficiency(r, _):
    assert r["samples"] == 4 and positive(r["dag_images_per_s"]) and positive(r["bare_images_per_s"])
    assert 0 < r["efficiency_same_run"] <= 1
    assert positive(r["dag_cpu_ms_per_sample"]) and positive(r["model_cpu_ms_per_sample"])
    assert positive(r["cores_per_gpu"]) and finite(r["steady_state_efficiency"]) and finite(r["end_to_end_efficiency"])
    assert set(r["dag_cpu_ms_per_sample_parts"]) == {"driver", "ray_system", "workers"}
    m = r["marginal"]
    assert m["samples"] == [2, 4] and finite(m["dag_cpu_ms_per_sample_synthesis_pass"]) and finite(m["cores_per_gpu"])


def check_dag_parts(r, _):
    assert r["samples"] == 8 and r["size"] == [64, 128]
    parts = ("load", "png", "unpack", "write")
    assert all(finite(r[f"{p}_ms_per_sample"]) and r[f"{p}_ms_per_sample"] >= 0 for p in parts)
    assert positive(r["total_ms_per_sample"])


def check_exemplar_reuse(r, _):
    assert set(r["models"]) == {"toy", "sd15"}
    for m in r["models"].values():
        assert set(m["ratio"]) == {"1", "2"} and all(positive(v) for v in m["ratio"].values())
        assert 0 < m["adapter_share"] < 1 and positive(m["step_s_am_adapter"]) and positive(m["exemplar_s"])
        # the same samples either way (rounding only)
        assert m["max_abs_diff"] < 1e-3 and m["max_abs_diff_pixels"] <= 2


def check_sd15_memory(r, _):
    assert r["tiny"] is True and len(r["runs"]) == 2
    assert all(run["finite"] and positive(run["peak_rss_bytes"]) and positive(run["step_s_cpu"]) for run in r["runs"])
    assert 0.5 < r["adapter_peak_ratio"]["fp32"] < 3


def check_domain_adaptation(r, _):
    assert {"a_day", "b_day_bank", "c_amgen", "e_night_real"} <= r["arms"].keys()
    for arm in r["arms"].values():
        assert 0 <= arm["night_miou"] <= 100 and 0 <= arm["day_miou"] <= 100
    assert finite(r["gain_vs_b"]) and r["seeds"] == 1
    # --gate 0 keeps every rendering; --label-trusted adds the arm trained on the masked labels
    assert {"c_amgen_gate0", "c_amgen_gate0_trusted"} <= r["arms"].keys()
    assert r["gate"]["0"]["kept"] > 0 and r["gate"]["0"]["judge"] == "bundled"
    # --mix balanced; one seed gives paired differences without a standard error
    assert r["mix"] == "balanced" and r["paired"]["night_vs_b"]["seeds"] == [0] and r["paired"]["night_vs_b"]["se"] is None


def check_retrieval(r, _):
    assert r["n"] == 5000 and r["queries"] == 50 and r["threads"] == 1 and r["repeats"] == 1
    assert 0.5 <= r["recall_at_10"] <= 1 and positive(r["speedup"]) and positive(r["speedup_wall"])
    assert positive(r["bruteforce"]["cpu_ms_per_query"]) and positive(r["index"]["cpu_ms_per_query"])
    assert r["blas"].get("faiss_openblas_core")   # the kernel both arms ran on is on record
    assert r["codec"] == "pq110x4fs" and set(r["rerank_sweep"]) == {"2", "4", "8"} and len(r["nprobe_sweep"]) == 4
    assert 0.5 <= r["compare"]["IVF64,Flat|nprobe=8"]["recall_at_10"] <= 1
    assert 0 <= r["iou_best_in_top32"] <= 1


def case(script, args, check, timeout=300, name=None):
    return pytest.param(script, args, check, timeout, id=name or script.removesuffix(".py"))


TOY = str(ROOT / "amadapter" / "weights" / "toy")
WORK_DIR_FLAG = {"domain_adaptation.py": "--work-dir", "pipeline_efficiency.py": "--work"}
CASES = [
    case("toytown_speed.py", ["--n", "5", "--repeats", "1"], check_toytown_speed),
    case("autoencoder.py", ["--n", "2"], check_autoencoder),
    case("inversion_signal.py", ["--n", "1", "--steps", "2"], check_inversion_signal),
    case("quality.py", ["--n", "2", "--steps", "1", "--docs", ""], check_quality),
    case("guidance_sweep.py", ["--n", "2", "--steps", "1", "--guidance", "1,3"], check_guidance_sweep),
    case("sampling_schedule.py", ["--n", "2", "--steps", "1,2", "--ends", "0.5"], check_sampling_schedule),
    case("routing_oracle.py", ["--n", "1", "--steps", "1"], check_routing_oracle),
    case("sampling_noise.py", ["--model", f"toy={TOY}", "--n", "1", "--fit", "4", "--steps", "1"], check_sampling_noise),
    case("train_throughput.py", ["--steps", "1", "--batch", "1", "--variants", "fp32"], check_train_throughput),
    case("driver_share.py", ["--writer-only", "--n", "4", "--size", "32", "64"], check_driver_writer,
         name="driver_share-writer"),
    case("driver_share.py", ["--n", "2"], check_driver_share),
    case("pipeline_efficiency.py", ["--n", "4", "--reps", "1", "--steps", "1", "--batch", "4", "--marginal"],
         check_pipeline_efficiency),
    case("exemplar_reuse.py", ["--models", "toy,sd15", "--ks", "1,2", "--steps", "1", "--sd15-steps", "1",
                               "--per-target-cap", "1", "--reps", "1", "--sd15-width", "32,32,64,64",
                               "--sd15-size", "64x64"], check_exemplar_reuse),
    case("sd15_memory.py", ["--tiny", "--dtypes", "fp32", "--steps", "2", "--cuda", "off"], check_sd15_memory),
    case("domain_adaptation.py", ["--tiny", "--gate", "0", "--label-trusted", "--mix", "balanced"], check_domain_adaptation),
    case("dag_parts.py", ["--n", "8", "--reps", "1"], check_dag_parts),
    case("am_step_cpu.py", ["--batches", "1", "--repeats", "1", "--steps", "1"], check_am_step_cpu),
    case("retrieval.py", ["--n", "5000", "--queries", "50", "--quality-pool", "200", "--retriever-queries", "20",
                          "--repeats", "1", "--shards", "2", "--nlist", "64", "--nprobe", "8", "--codec", "pq110x4fs",
                          "--rerank", "4", "--compare", "IVF64,Flat|nprobe=8"], check_retrieval),
]


def test_every_bench_has_a_case():
    scripts = {p.name for p in BENCH.glob("*.py") if not p.name.startswith("_")} - NOT_HERE
    covered = {c.values[0] for c in CASES}
    assert scripts - covered == set(), f"bench scripts without a case in {__file__}: {sorted(scripts - covered)}"


@pytest.mark.parametrize("script,args,check,timeout", CASES)
def test_bench_runs_at_its_smallest_size(script, args, check, timeout, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
           }
    if script in WORK_DIR_FLAG:   # scratch folders in pytest's tmp, not the checkout or /tmp
        args = [*args, WORK_DIR_FLAG[script], str(tmp_path / "work")]
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, f"{script} printed nothing on stdout:\n{proc.stderr[-2000:]}"
    result = json.loads(lines[-1])
    check(result, tmp_path)
