"""Storage by URI against a real S3-API server (moto's, on 127.0.0.1, started here; the clients
are pyarrow's own S3 file system, nothing is mocked in-process):

- a shard written to s3:// is published whole (temp key, then copy), hashed while written;
- a failed write leaves neither the final key nor a temp key;
- read-only inputs are mirrored once per node, and item paths move between nodes' mirrors;
- a whole run with the source, the model and the output on S3 gives the bytes of a local run;
- the same run on a two-node Ray cluster (ray.cluster_utils.Cluster) whose head, where the driver
  runs, has no CPU: every input is opened by workers (the driver's cache stays empty).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from test_pipeline_fixtures import file_digests, make_toytown, run_tree, tiny_model_dir

BUCKET = "amgen-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 and the environment every process (Ray workers too) uses."""
    moto_server = pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (the test extra)")
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], scheme="http",
                      allow_bucket_creation=True).create_dir(BUCKET)
    yield f"s3://{BUCKET}"
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def _keys(uri: str) -> list[str]:
    from connectors.storage import as_path
    import pyarrow.fs as pafs

    p = as_path(uri)
    return sorted(i.path[len(p.path) + 1:] for i in p.fs.get_file_info(pafs.FileSelector(p.path, recursive=True))
                  if i.type == pafs.FileType.File)


def _sample_rows(n: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return [{"sample_id": f"s{i:03d}", "target_id": f"t{i}", "exemplar_id": "e", "seed": i, "augment": {},
             "model": "m", "config_hash": "c" * 64, "image": rng.integers(0, 255, (8, 16, 3), dtype=np.uint8),
             "label": rng.integers(0, 34, (8, 16), dtype=np.uint8)} for i in range(n)]


def test_a_shard_on_s3_is_published_whole_and_hashed_as_written(s3, tmp_path):
    from connectors.parquet_sink import shard_stats_from_file, write_shard
    from connectors.storage import as_path

    out = f"{s3}/sink"
    stats = write_shard(_sample_rows(5), out, 0, 1)
    remote = as_path(out) / stats.name
    assert _keys(out) == [stats.name]  # no temp key left behind
    data = remote.read_bytes()
    assert stats.sha256 == hashlib.sha256(data).hexdigest() and stats.bytes == len(data)
    # The same rows written locally give the same bytes: where a shard goes changes nothing in it.
    local = write_shard(_sample_rows(5), tmp_path, 0, 1)
    assert local.sha256 == stats.sha256 and (tmp_path / local.name).read_bytes() == data
    again = shard_stats_from_file(remote)
    assert (again.rows, again.sha256, again.label_pixels) == (5, stats.sha256, stats.label_pixels)


def test_a_failed_write_publishes_nothing(s3):
    from connectors.storage import as_path, publish_atomic

    final = as_path(f"{s3}/failed") / "data" / "train-00000-of-00001.parquet"

    def half_then_fail(tmp):
        tmp.write_bytes(b"half a shard")
        raise OSError("disk full (injected)")

    with pytest.raises(OSError, match="injected"):
        publish_atomic(final, half_then_fail)
    assert _keys(f"{s3}/failed") == []


def test_inputs_are_mirrored_once_and_paths_move_between_mirrors(s3, tmp_path, monkeypatch):
    from connectors import storage

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "node-a"))
    base = storage.as_path(f"{s3}/model-a")
    (base / "unet" / "config.json").write_bytes(b"{}")
    (base / "model_index.json").write_bytes(b'{"a": 1}')
    storage._mirror.cache_clear()
    a = storage.local_dir(str(base))
    assert Path(a, "unet", "config.json").read_bytes() == b"{}" and Path(a).parent.parent == tmp_path / "node-a"
    assert Path(a).name == "model-a"  # the folder keeps its name (a model's name is its folder's)
    storage._mirror.cache_clear()
    assert storage.local_dir(str(base)) == a  # reused, not copied again
    (base / "model_index.json").write_bytes(b'{"a": 22}')  # changed (size, time): a new mirror
    storage._mirror.cache_clear()
    b = storage.local_dir(str(base))
    assert b != a and Path(b, "model_index.json").read_bytes() == b'{"a": 22}'
    # A path listed in another node's mirror of the same folder is read from this node's.
    other = f"/elsewhere/cache/{Path(b).parent.name}/{Path(b).name}/unet/config.json"
    assert storage.relocate(other, b) == f"{b}/unet/config.json"
    assert storage.relocate("/data/x.png", b) == "/data/x.png"
    with pytest.raises(storage.StorageError, match="no such folder"):
        storage._mirror.cache_clear()
        storage.local_dir(f"{s3}/nothing-here")


def _upload(local: Path, uri: str) -> str:
    from connectors.storage import upload_dir

    upload_dir(local, uri)
    return uri


def _download(uri: str, dest: Path) -> Path:
    from connectors.storage import as_path

    for key in _keys(uri):
        (dest / key).parent.mkdir(parents=True, exist_ok=True)
        (dest / key).write_bytes((as_path(uri) / key).read_bytes())
    return dest


@pytest.fixture(scope="module")
def world(s3, tmp_path_factory):
    base = tmp_path_factory.mktemp("s3world")
    tree, model = make_toytown(base / "toy", 8), tiny_model_dir(base / "model")
    return {"base": base, "tree": tree, "model": model,
            "tree_uri": _upload(tree, f"{s3}/inputs/toy"), "model_uri": _upload(model, f"{s3}/inputs/model")}


def _run(world, root, model, out):
    from pipeline.config import config_from_dict
    from pipeline.run import run_pipeline

    tree = run_tree(root, model, out)
    tree["source"]["root"], tree["model"]["path"], tree["output"]["dir"] = str(root), str(model), str(out)
    return run_pipeline(config_from_dict(tree, where=str(world["base"] / "cfg.yaml")))


@pytest.fixture(scope="module")
def local_run(world):
    import ray

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        out = world["base"] / "local"
        return out, _run(world, world["tree"], world["model"], out)
    finally:
        ray.shutdown()


def _check_s3_output(world, uri: str, local_out: Path, name: str):
    import datasets
    from typer.testing import CliRunner

    from pipeline.cli import app

    got = _download(uri, world["base"] / name)
    assert not any(Path(k).name.startswith(".") for k in _keys(uri)), "a temp key was left behind"
    # The config hash names the source and model locations, so it differs; every other byte of
    # every row is the local run's.
    assert sorted(file_digests(got)) == sorted(file_digests(local_out))
    for name in file_digests(local_out):
        mine, ref = pq.read_table(got / name), pq.read_table(local_out / name)
        if "config_hash" in ref.column_names:
            mine, ref = mine.drop_columns(["config_hash"]), ref.drop_columns(["config_hash"])
        assert mine.equals(ref), name
    res = CliRunner().invoke(app, ["verify", str(got)])
    assert res.exit_code == 0, res.output
    assert len(datasets.load_dataset(str(got), split="train", cache_dir=str(world["base"] / f"hf-{name}"))) == 8
    manifest = json.loads((got / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 2


@pytest.mark.slow
def test_a_run_with_source_model_and_output_on_s3_gives_the_local_bytes(s3, world, local_run):
    import ray

    local_out, local_summary = local_run
    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app

    tree = run_tree(world["tree_uri"], world["model_uri"], "unused")
    tree["source"]["root"], tree["model"]["path"] = world["tree_uri"], world["model_uri"]
    cfg = world["base"] / "s3.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:  # through the CLI: --out keeps its URI
        res = CliRunner().invoke(app, ["run", "--config", str(cfg), "--out", f"{s3}/out-local-ray", "--quiet", "--json"])
    finally:
        ray.shutdown()
    assert res.exit_code == 0, res.output
    s = json.loads([line for line in res.output.splitlines() if line.startswith("{")][-1])
    assert (s["written"], s["synthesized"], s["quarantined"]) == (8, 8, 0) and s["out"] == f"{s3}/out-local-ray"
    _check_s3_output(world, f"{s3}/out-local-ray", local_out, "got-local-ray")


@pytest.mark.slow
def test_a_two_node_cluster_run_opens_every_input_on_the_workers(s3, world, local_run, tmp_path, monkeypatch):
    """The head node (the driver's) has no CPU, so every stage's actors and tasks land on the
    worker node; each node has its own temp dir and cache. The driver process's cache stays empty:
    no stage read a source, model or index through a driver-only path."""
    import ray
    from ray.cluster_utils import Cluster

    from connectors import storage

    local_out, _ = local_run
    driver_cache, head_cache, worker_cache = (tmp_path / n for n in ("driver-cache", "head-cache", "worker-cache"))
    monkeypatch.setenv(storage.CACHE_ENV, str(driver_cache))
    storage._mirror.cache_clear()
    ray_tmp = tempfile.mkdtemp(prefix="amgen-ray-", dir="/tmp")  # sockets live here: keep the path short
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "num_gpus": 0, "include_dashboard": False, "temp_dir": ray_tmp,
        "env_vars": {storage.CACHE_ENV: str(head_cache)}})
    try:
        cluster.add_node(num_cpus=2, num_gpus=0, resources={"amgen_worker": 1},
                         env_vars={storage.CACHE_ENV: str(worker_cache)})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        head_id = ray.get_runtime_context().get_node_id()
        s = _run(world, world["tree_uri"], world["model_uri"], f"{s3}/out-cluster")
        nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2 and nodes[head_id]["Resources"].get("CPU", 0) == 0
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert (s.written, s.synthesized) == (8, 8)
    assert not driver_cache.exists(), "the driver opened an input itself"
    mirrors = sorted(p.name for d in worker_cache.iterdir() if d.is_dir() for p in d.iterdir()
                     if p.is_dir() and not p.name.startswith("."))
    assert {"toy", "model"} <= set(mirrors), mirrors  # the synthesis actors' node read them
    _check_s3_output(world, f"{s3}/out-cluster", local_out, "got-cluster")
