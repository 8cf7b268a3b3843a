"""End to end through a local Ray: output loads in HF datasets, labels match their recorded
augmentation, verify passes, reruns synthesize nothing, a crashed run resumes to the same bytes,
bad inputs are quarantined, config errors are clear, dry-run plans without writing."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.config import config_from_dict
from test_pipeline_fixtures import H, W, break_three, file_digests, make_toytown, run_tree, tiny_model_dir

pytestmark = pytest.mark.slow
N_TARGETS = 12


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    base = tmp_path_factory.mktemp("e2e")
    return {"base": base, "tree": make_toytown(base / "toy", N_TARGETS), "model": tiny_model_dir(base / "model")}


def run(world, out, *, overwrite=False, dry_run=False, fail_after_shards=None, **sections):
    from pipeline.run import run_pipeline

    cfg = config_from_dict(run_tree(world["tree"], world["model"], out, **sections), where=str(world["base"] / "cfg.yaml"))
    return run_pipeline(cfg, overwrite=overwrite, dry_run=dry_run, fail_after_shards=fail_after_shards)


@pytest.fixture(scope="module")
def first(world):
    out = world["base"] / "out"
    return out, run(world, out)


def test_run_writes_an_hf_dataset_whose_labels_replay_their_augmentation(world, first):
    import datasets
    from PIL import Image

    from stages.augment import replay
    from stages.read import list_items, make_source, read_item

    out, s = first
    assert (s.mode, s.planned, s.written, s.synthesized, s.quarantined) == ("new", N_TARGETS, N_TARGETS, N_TARGETS, 0)
    assert s.shards == 3 and s.shards_written == 3 and 0 < s.banks_encoded <= s.exemplars
    ds = datasets.load_dataset("parquet", data_dir=str(out / "data"), split="train")
    assert isinstance(ds.features["image"], datasets.Image) and isinstance(ds.features["label"], datasets.Image)
    assert len(ds) == N_TARGETS and len(set(ds["sample_id"])) == N_TARGETS
    src = make_source("toytown", str(world["tree"]))
    items = {i["item_id"]: i for i in list_items(src)}
    ops_seen = set()
    for row in ds:
        assert isinstance(row["image"], Image.Image) and row["image"].size == (W, H)
        label = np.array(row["label"])
        target = read_item(src, items[row["target_id"]])[0]
        rec = json.loads(row["augment"])
        ops_seen |= {o["op"] for o in rec["ops"]}
        expected, _, _ = replay(rec, target.label, target.instance)
        assert np.array_equal(label, expected), row["sample_id"]
        assert np.array_equal(np.array(row["instance"]).astype(np.int32), replay(rec, target.label, target.instance)[1])
        assert row["exemplar_id"] != row["target_id"] and row["config_hash"] == s.config_hash
        assert row["model"] == s.model
    assert {"crop", "hflip"} <= ops_seen, "the augmentation actually changed some targets"
    # The folder itself loads too (dataset card YAML), and amgen verify passes.
    assert len(datasets.load_dataset(str(out), split="train")) == N_TARGETS
    from pipeline.cli import app

    res = CliRunner().invoke(app, ["verify", str(out)])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["config_hash"] == s.config_hash and len(manifest["shards"]) == 3
    assert manifest["counts"]["written"] == N_TARGETS and manifest["versions"]["ray"]
    assert (out / "preview.png").stat().st_size > 0 and (out / "README.md").read_text().startswith("---")
    for p in (out / "data").glob("*.parquet"):
        assert pq.read_metadata(p).num_rows == 4


def test_rerun_synthesizes_nothing_and_changes_no_byte(world, first):
    out, s = first
    before = file_digests(out)
    again = run(world, out)
    assert (again.mode, again.synthesized, again.shards_written, again.shards_skipped) == ("resume", 0, 0, 3)
    assert again.banks_encoded == 0 and again.written == N_TARGETS
    assert file_digests(out) == before
    runs = json.loads((out / "manifest.json").read_text())["runs"]
    assert [r["synthesized"] for r in runs][-2:] == [N_TARGETS, 0]


def test_crashed_run_resumes_to_the_same_bytes(world, first):
    out, _ = first
    out2 = world["base"] / "crashed"
    with pytest.raises(RuntimeError, match="injected failure after 1 shard"):
        run(world, out2, fail_after_shards=1)
    assert len(list((out2 / "data").glob("train-*.parquet"))) == 1
    resumed = run(world, out2)
    assert resumed.mode == "resume" and resumed.shards_skipped == 1 and resumed.shards_written == 2
    assert resumed.synthesized == N_TARGETS - 4
    assert file_digests(out2) == file_digests(out)
    assert not list((out2 / "data").glob(".*")), "no temporary files are left behind"


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_shard_is_moved_aside_and_remade_to_the_same_bytes(world, first, damage):
    from pipeline.cli import app

    out, _ = first
    out2 = world["base"] / f"damaged_{damage}"
    shutil.copytree(out, out2)
    shard = out2 / "data" / "train-00001-of-00003.parquet"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:1000])
    else:
        shard.unlink()
    again = run(world, out2)
    assert (again.mode, again.shards_skipped, again.shards_written, again.synthesized) == ("resume", 2, 1, 4)
    (remade,) = again.remade
    assert remade["name"] == "data/train-00001-of-00003.parquet"
    if damage == "truncate":
        assert "sha256 differs" in remade["reason"]
        moved = out2 / remade["moved_to"]
        assert moved.parent.parent.name == "damaged" and moved.stat().st_size == 1000
    else:
        assert remade["reason"] == "missing" and remade["moved_to"] is None
    assert file_digests(out2) == file_digests(out)
    assert json.loads((out2 / "manifest.json").read_text())["runs"][-1]["remade"] == again.remade
    res = CliRunner().invoke(app, ["verify", str(out2)])
    assert res.exit_code == 0, res.output


def test_another_config_is_refused_in_an_existing_output(world, first):
    from pipeline.resume import OutputFolderError

    out, _ = first
    before = file_digests(out)
    with pytest.raises(OutputFolderError, match="different config cannot resume"):
        run(world, out, model={"steps": 3})
    assert file_digests(out) == before


def test_bad_inputs_are_quarantined_and_the_run_goes_on(world):
    root = world["base"] / "bad_toy"
    shutil.copytree(world["tree"], root)
    broken = break_three(root)
    out = world["base"] / "bad_out"
    from pipeline.run import run_pipeline
    from test_stages import tiny_segmenter

    seg = tiny_segmenter(world["base"] / "seg")  # and score this run, through Ray as well
    cfg = config_from_dict(run_tree(root, world["model"], out, score={"enabled": True, "segmenter": str(seg)}))
    s = run_pipeline(cfg)
    assert s.quarantined == 3 and s.quarantined_by_stage == {"read": 3}
    assert s.written == N_TARGETS - 3 and s.synthesized == N_TARGETS - 3
    errors = pq.read_table(out / "errors" / "plan.parquet").to_pylist()
    assert {e["input_id"] for e in errors} == set(broken)
    assert all(e["reason"] and e["path"] and e["stage"] == "read" for e in errors)
    from connectors.verify import verify_dataset

    assert verify_dataset(out).ok
    scores = [v for p in sorted((out / "data").glob("*.parquet")) for v in pq.read_table(p)["score_miou"].to_pylist()]
    assert len(scores) == s.written and all(0.0 <= v <= 1.0 for v in scores)
    # verify names what is wrong, with a non-zero exit, when a shard is damaged.
    from pipeline.cli import app

    shard = sorted((out / "data").glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    res = CliRunner().invoke(app, ["verify", str(out)])
    assert res.exit_code == 1 and shard.name in res.output.replace("\n", "")


def test_dry_run_plans_without_writing(world, tmp_path):
    out = tmp_path / "dry"
    s = run(world, out, dry_run=True)
    assert (s.mode, s.planned, s.shards, s.synthesized) == ("dry-run", N_TARGETS, 3, 0)
    assert s.workers["actors"] == 1 and s.workers["device"] == "cpu"
    assert not out.exists() or not any(out.iterdir())


def test_cli_run_reports_config_errors_and_dry_run(world, tmp_path):
    from pipeline.cli import app

    cfg = tmp_path / "cfg.yaml"
    tree = run_tree(world["tree"], world["model"], tmp_path / "out")
    tree["synthesis"]["actorz"] = 2
    cfg.write_text(yaml.safe_dump(tree))
    res = CliRunner().invoke(app, ["run", "--config", str(cfg)])
    assert res.exit_code == 2 and f"{cfg}: synthesis.actorz: unknown key" in res.output.replace("\n", "")
    res = CliRunner().invoke(app, ["run", "--config", str(cfg), "--set", "synthesis.actorz=null", "--dry-run"])
    assert res.exit_code == 2  # still an unknown key, whatever its value
    del tree["synthesis"]["actorz"]
    cfg.write_text(yaml.safe_dump(tree))
    res = CliRunner().invoke(app, ["run", "--config", str(cfg), "--set", "synthesis.num_gpus=1", "--dry-run"])
    assert res.exit_code == 2 and "GPU" in res.output and "allow_cpu_fallback" in res.output.replace("\n", "")
    res = CliRunner().invoke(app, ["run", "--config", str(cfg), "--dry-run", "--set", "synthesis.num_gpus=1",
                                   "--set", "synthesis.allow_cpu_fallback=true"])
    assert res.exit_code == 0, res.output
    assert "samples planned" in res.output and "falling back to CPU" in res.output.replace("\n", " ")


def test_two_actors_and_a_ray_data_plan_write_the_same_bytes_as_one_and_an_inline_plan(world, first):
    """The actor pool and where the plan's stages run only change speed: two CPU actors, started
    after a plan made by Ray datasets (ray.inline_plan_max 0), give the bytes of one actor started
    during an inline plan (the default at this size)."""
    out, s1 = first
    out2 = world["base"] / "two_actors"
    # Half a CPU slot each, so the loader tasks still find a slot on the 2-CPU test cluster.
    s2 = run(world, out2, synthesis={"actors": 2, "num_cpus": 0.5}, ray={"inline_plan_max": 0})
    assert s1.workers["actors"] == 1 and s2.workers["actors"] == 2
    assert (s2.synthesized, s2.shards_written) == (N_TARGETS, 3)
    assert s2.config_hash == s1.config_hash
    assert (out2 / "plan.parquet").read_bytes() == (out / "plan.parquet").read_bytes()
    assert file_digests(out2) == file_digests(out)
