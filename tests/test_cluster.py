"""The cluster side: ray_cluster.yaml is a valid autoscaler config, and `ray job submit` runs the
pipeline end to end against a head node this test starts (and stops) on 127.0.0.1."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def test_ray_cluster_yaml_matches_the_autoscaler_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert len(gpu_types) >= 1 and all(t.get("max_workers", 0) >= 1 for t in gpu_types)
    setup = " ; ".join(cfg["setup_commands"])
    assert "torch==2.13.0" in setup and "pip install" in setup and "-e " in setup
    assert setup.index("torch==2.13.0") < setup.index("-e "), "torch first, then the project"
    # A schema violation is caught (the test can fail).
    bad = dict(cfg, available_node_types={"head": {"resources": {"CPU": 8}}})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pids_of(marker: str) -> list[int]:
    """Processes whose command line holds ``marker`` (our head's private temp dir), and all their
    descendants: the raylet's agents rename themselves (``ray::DashboardAgent``), and one left
    behind spins a core after its GCS is gone."""
    import psutil

    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker.encode() in (d / "cmdline").read_bytes():
                    out.add(int(d.name))
                    out.update(c.pid for c in psutil.Process(int(d.name)).children(recursive=True))
            except (OSError, psutil.Error):
                pass
    return sorted(p for p in out if p != os.getpid())


def _alive(pids) -> list[int]:
    import psutil

    out = []
    for p in pids:
        try:
            if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _stop_head(temp_dir: str) -> set[int]:
    """Stop exactly the processes of the head we started (never `ray stop`: that would also end
    other Ray instances on this machine)."""
    family = set(_pids_of(temp_dir))  # taken before any dies: an orphaned agent loses its parent
    for sig in (signal.SIGTERM, signal.SIGKILL):
        family |= set(_pids_of(temp_dir))
        for pid in family:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while _alive(family) and time.time() < deadline:
            time.sleep(0.5)
    return family


@pytest.mark.slow
def test_ray_job_submit_end_to_end(tmp_path):
    from test_pipeline_fixtures import make_toytown, run_tree, tiny_model_dir

    tree = make_toytown(tmp_path / "toy", 8)
    model = tiny_model_dir(tmp_path / "model")
    out = tmp_path / "out"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(run_tree(tree, model, out, output={"rows_per_shard": 4})))
    temp_dir = tempfile.mkdtemp(prefix="amgenray", dir="/tmp")  # short: Ray puts sockets in it
    gcs, dash, client, agent = _free_ports(4)
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    env.pop("RAY_ADDRESS", None)
    head = [str(VENV_BIN / "ray"), "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1",
            "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    try:
        started = subprocess.run(head, env=env, capture_output=True, text=True, timeout=180)
        if started.returncode != 0:
            pytest.fail(f"ray start failed:\n{started.stdout[-2000:]}\n{started.stderr[-2000:]}")
        submit = [str(VENV_BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}",
                  "--working-dir", str(REPO), "--", "python", "-m", "pipeline", "run", "--config", str(cfg),
                  "--quiet", "--json"]
        job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
        log = job.stdout + job.stderr
        assert job.returncode == 0, log[-4000:]
        assert "succeeded" in log.lower(), log[-3000:]
        summary = json.loads(next(line for line in reversed(job.stdout.splitlines()) if line.startswith("{")))
        assert summary["written"] == 8 and summary["synthesized"] == 8 and summary["quarantined"] == 0
    finally:
        head_family = _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not _pids_of(temp_dir), "the head's processes are gone"
    assert not _alive(head_family), "the head's agents are gone too"
    from connectors.verify import verify_dataset

    report = verify_dataset(out)
    assert report.ok, report.summary()
    assert len(list((out / "data").glob("train-*.parquet"))) == 2


def _gpu_config(tmp_path, *overrides):
    from pipeline.config import config_from_dict
    from test_pipeline_fixtures import run_tree

    tree = run_tree(tmp_path / "toy", tmp_path / "model", tmp_path / "out")
    return config_from_dict(tree, where="gpu.yaml", overrides=["ray.num_cpus=2", *overrides])


def test_a_local_ray_gets_the_gpus_a_config_asks_for(tmp_path):
    from pipeline.cluster import local_ray_args

    def no_call():
        raise AssertionError("a CPU config does not look for GPUs")

    assert local_ray_args(_gpu_config(tmp_path), no_call)["num_gpus"] == 0
    args = local_ray_args(_gpu_config(tmp_path, "synthesis.num_gpus=1"), lambda: 1)
    assert (args["address"], args["num_gpus"], args["num_cpus"]) == ("local", 1, 2)
    assert local_ray_args(_gpu_config(tmp_path, "synthesis.num_gpus=0.5"), lambda: 4)["num_gpus"] == 4
    assert local_ray_args(_gpu_config(tmp_path, "synthesis.num_gpus=1"), lambda: 0)["num_gpus"] == 0


@pytest.mark.slow
def test_amgen_run_on_a_one_gpu_machine_starts_ray_with_that_gpu(tmp_path, monkeypatch):
    """The resource logic of a one-GPU machine without one: Ray is started with the GPU the device
    count reports, and the model pool is planned onto it (before, it had 0 GPUs and raised)."""
    import ray

    from pipeline.cluster import ClusterResourceError, ensure_ray, plan_workers

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()
    cfg = _gpu_config(tmp_path, "synthesis.num_gpus=1", "model.device=auto")
    assert ensure_ray(cfg, device_count=lambda: 1) is True
    try:
        assert ray.cluster_resources().get("GPU") == 1.0
        w = plan_workers(cfg, ray.cluster_resources())
        assert (w.actors, w.num_gpus, w.device, w.note) == (1, 1.0, "cuda", "")
        assert ensure_ray(cfg) is False, "a running Ray is joined, not started again"
    finally:
        ray.shutdown()
    # The same config on a machine without a GPU still fails by name, before any actor waits.
    assert ensure_ray(cfg, device_count=lambda: 0) is True
    try:
        with pytest.raises(ClusterResourceError, match="synthesis.num_gpus=1.*0 GPU"):
            plan_workers(cfg, ray.cluster_resources())
    finally:
        ray.shutdown()


def test_retrieval_and_scoring_pools_grow_only_into_the_cpus_their_feeders_leave(tmp_path):
    from pipeline.cluster import plan_workers, retrieve_pool_size

    cfg = lambda *ov: _gpu_config(tmp_path, *ov)  # noqa: E731
    # Retrieval: half a CPU each, next to one whole slot for the plan pass's read and embed tasks.
    assert retrieve_pool_size(cfg(), {"CPU": 2.0}) == 2
    assert retrieve_pool_size(cfg(), {"CPU": 1.4}) == 1
    assert retrieve_pool_size(cfg(), {"CPU": 1.0}) == 1, "never below one actor"
    assert retrieve_pool_size(cfg("exemplars.retrieve_actors=8"), {"CPU": 64.0}) == 8
    assert retrieve_pool_size(cfg("exemplars.retrieve_actors=8"), {"CPU": 3.0}) == 4
    assert retrieve_pool_size(cfg("exemplars.retrieve_actors=3"), {}) == 3, "a cluster that does not say"
    # Scoring: a quarter CPU each, after the model actors and the loader.
    assert plan_workers(cfg("score.enabled=true"), {"CPU": 2.0}).score_actors == 2
    w = plan_workers(cfg("score.enabled=true", "synthesis.num_cpus=2"), {"CPU": 2.0})
    assert (w.num_cpus, w.score_actors) == (1.5, 1), "the model actor leaves room for one scorer and the loader"
    w = plan_workers(cfg("score.enabled=true", "score.actors=8", "synthesis.num_gpus=1", "synthesis.num_cpus=4"),
                     {"CPU": 16.0, "GPU": 1.0})
    assert (w.actors, w.num_cpus, w.score_actors) == (1, 4.0, 8)
    w = plan_workers(cfg("score.enabled=true", "score.actors=8", "synthesis.num_cpus=1", "synthesis.actors=3"),
                     {"CPU": 4.0})
    assert (w.actors, w.score_actors) == (3, 3)
    # The pools' sizes are parallelism, not content: the config hash ignores them.
    from pipeline.config import config_hash

    assert config_hash(cfg("exemplars.retrieve_actors=7", "score.actors=5")) == config_hash(cfg())
