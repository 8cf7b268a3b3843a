"""Run config: strict validation, errors that name the key and the file, overrides, the hash."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, check_paths, config_from_dict, config_hash, load_config

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, tree: dict, name: str = "run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(tree))
    return p


def base(tmp_path: Path) -> dict:
    (tmp_path / "src").mkdir(exist_ok=True)
    return {"source": {"kind": "toytown", "root": str(tmp_path / "src")}, "model": {"steps": 3}}


def test_loads_yaml_with_defaults_and_overrides(tmp_path):
    p = write(tmp_path, base(tmp_path))
    cfg = load_config(p, ["model.steps=7", "synthesis.batch_size=2", "exemplars.filters={domain: night}",
                          "augment.ops=[{op: hflip, p: 1.0}]"])
    assert cfg.model.steps == 7 and cfg.synthesis.batch_size == 2
    assert cfg.exemplars.filters == {"domain": "night"}
    assert [o.op for o in cfg.augment.ops] == ["hflip"] and cfg.augment.ops[0].p == 1.0
    assert cfg.output.rows_per_shard == 64 and cfg.origin == str(p)
    check_paths(cfg)


@pytest.mark.parametrize("tree_edit, override, key, words", [
    (lambda t: t["source"].update(colour="red"), None, "source.colour", "unknown key"),
    (lambda t: t.update(synthesis={"actors": "many"}), None, "synthesis.actors", "integer"),
    (lambda t: t.pop("source"), None, "source", "required"),
    (lambda t: t.update(augment={"ops": [{"op": "hflip", "prob": 1}]}), None, "augment.ops.0.prob", "unknown key"),
    (lambda t: None, "model.stepz=3", "model.stepz", "unknown key"),
    (lambda t: None, "model.steps=lots", "model.steps", "integer"),
    (lambda t: None, "model.mode=magic", "model.mode", "am_adapter"),
    (lambda t: None, "model.exemplar_guidance_end=1.5", "model.exemplar_guidance_end", "less than or equal to 1"),
])
def test_errors_name_key_and_file(tmp_path, tree_edit, override, key, words):
    tree = base(tmp_path)
    tree_edit(tree)
    p = write(tmp_path, tree)
    with pytest.raises(ConfigError) as e:
        load_config(p, [override] if override else None)
    msg = str(e.value)
    # A value from --set is blamed on its flag, a value from the file on the file.
    blamed = f"--set {override}: " if override else f"{p}: "
    assert msg.startswith(blamed) and f"{key}:" in msg and words in msg, msg


def test_set_errors_name_the_flag_also_for_path_checks_and_sections(tmp_path):
    p = write(tmp_path, base(tmp_path))
    with pytest.raises(ConfigError, match=r"^--set model.steps=two: model.steps: .*integer"):
        load_config(p, ["model.steps=two"])
    with pytest.raises(ConfigError, match=r"^--set model=3: model: "):
        load_config(p, ["model=3"])
    with pytest.raises(ConfigError, match=r"^--set model.steps: expected key=value"):
        load_config(p, ["model.steps"])
    cfg = load_config(p, [f"source.root={tmp_path / 'gone'}"])
    with pytest.raises(ConfigError, match=rf"^--set source.root={tmp_path / 'gone'}: source.root: path does not exist"):
        check_paths(cfg)
    cfg = load_config(p, ["model.steps=4"])  # a good flag does not take the blame for the file's keys
    cfg.source.root = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=rf"^{p}: source.root: path does not exist"):
        check_paths(cfg)


def test_missing_paths_name_key_and_file(tmp_path):
    tree = base(tmp_path)
    tree["source"]["root"] = str(tmp_path / "nowhere")
    p = write(tmp_path, tree)
    cfg = load_config(p)  # paths are checked when a run starts, not at load
    with pytest.raises(ConfigError, match=rf"{p}: source.root: path does not exist"):
        check_paths(cfg)
    cfg = load_config(write(tmp_path, base(tmp_path)), ["model.path=sd15", f"model.sd15_dir={tmp_path / 'sd'}"])
    with pytest.raises(ConfigError, match="model.sd15_dir: folder does not exist"):
        check_paths(cfg)
    # A toytown source with `make` may be absent: the run creates it.
    cfg = load_config(write(tmp_path, {"source": {"kind": "toytown", "root": str(tmp_path / "new"), "make": {"n": 2}}}))
    check_paths(cfg)


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{bad}: not valid YAML"):
        load_config(bad)
    p = write(tmp_path, base(tmp_path))
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(p, ["model.steps"])
    with pytest.raises(ConfigError, match="model.steps: is not a section"):
        load_config(p, ["model.steps.x=1"])
    with pytest.raises(ConfigError, match="'make' is only allowed for kind: toytown"):
        load_config(p, ["source.kind=cityscapes", "source.make.n=3"])
    with pytest.raises(ConfigError, match="augment.ops.0"):
        load_config(p, ["augment.ops=[{op: random_resized_crop, scale: [0.1, 1.0]}]"])


def test_config_hash_covers_what_changes_bytes_only(tmp_path):
    tree = base(tmp_path)
    h = config_hash(config_from_dict(tree))
    assert h == config_hash(config_from_dict(tree)) and len(h) == 64
    # Where the output goes and how many workers make it do not change a byte.
    same = ["output.dir=/elsewhere", "synthesis.actors=4", "synthesis.num_gpus=1", "ray.num_cpus=8",
            "output.preview=false", "name=other", "model.exemplar_guidance_end=1.0"]
    for ov in same:
        assert config_hash(config_from_dict(tree, overrides=[ov])) == h, ov
    for ov in ["model.steps=4", "seed=1", "output.rows_per_shard=7", "augment.seed=3", "exemplars.k=2",
               "synthesis.batch_size=3", "source.limit=5", "model.exemplar_guidance_end=0.5"]:
        assert config_hash(config_from_dict(tree, overrides=[ov])) != h, ov


@pytest.mark.parametrize("name", ["toytown_demo.yaml", "cityscapes_sd15.yaml", "bdd100k_sd15.yaml"])
def test_shipped_configs_validate_and_comment_every_key(name):
    path = REPO / "configs" / name
    cfg = load_config(path)
    assert cfg.source.root
    for line in path.read_text().splitlines():
        s = line.strip()
        if s and not s.startswith("#") and not s.startswith("- ") and ":" in s and not s.endswith(":"):
            assert "#" in s, f"{name}: key without a comment: {s}"


def test_workers_are_checked_against_the_cluster_before_any_actor_starts(tmp_path):
    from pipeline.cluster import ClusterResourceError, plan_workers

    def cfg(*ov):
        return config_from_dict(base(tmp_path), where="gpu.yaml", overrides=list(ov))

    with pytest.raises(ClusterResourceError, match=r"gpu.yaml: synthesis.num_gpus=1.*0 GPU.*allow_cpu_fallback"):
        plan_workers(cfg("synthesis.num_gpus=1"), {"CPU": 8.0})
    w = plan_workers(cfg("synthesis.num_gpus=1", "synthesis.allow_cpu_fallback=true"), {"CPU": 8.0})
    assert (w.device, w.num_gpus) == ("cpu", 0.0) and "falling back" in w.note
    w = plan_workers(cfg("synthesis.num_gpus=1", "synthesis.actors=4"), {"CPU": 16.0, "GPU": 2.0})
    assert (w.actors, w.device, w.num_gpus) == (2, "cuda", 1.0) and "only 2 actor" in w.note
    with pytest.raises(ClusterResourceError, match="model.device is 'cuda'"):
        plan_workers(cfg("model.device=cuda"), {"CPU": 8.0, "GPU": 1.0})
    w = plan_workers(cfg("synthesis.actors=3", "synthesis.num_cpus=1"), {"CPU": 2.0})
    assert (w.actors, w.device, w.torch_threads) == (2, "cpu", 1)
    # Actors never take every CPU slot: the loader tasks in front of them would never run (a hang).
    assert w.num_cpus == 0.875 and "leaving 0.25 for the loader" in w.note
    w = plan_workers(cfg("synthesis.num_cpus=2", "score.enabled=true"), {"CPU": 2.0})
    assert (w.actors, w.num_cpus) == (1, 1.5)
    w = plan_workers(cfg("synthesis.actors=1", "synthesis.num_cpus=1"), {"CPU": 2.0})
    assert (w.actors, w.num_cpus, w.note) == (1, 1.0, "")
    w = plan_workers(cfg("synthesis.num_gpus=1", "synthesis.num_cpus=4"), {"CPU": 4.0, "GPU": 1.0})
    assert (w.actors, w.num_gpus, w.num_cpus) == (1, 1.0, 3.75)


def test_the_demo_samples_as_the_benchmarks_and_eval_adapt_assume():
    """bench/quality.py, the regression floors and `amgen eval adapt` score "what the demo samples
    with": QualitySettings' defaults are the demo config's model settings."""
    from evaluation.quality import QualitySettings

    model, q = load_config(REPO / "configs" / "toytown_demo.yaml").model, QualitySettings()
    assert (model.steps, model.guidance_scale, model.exemplar_guidance_end) == \
        (q.num_inference_steps, q.guidance_scale, q.exemplar_guidance_end)
