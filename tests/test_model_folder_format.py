"""Model folders: diffusers' layout (what save_pretrained writes, what the bundled toy model is in)
and the older amgen layout (format_version 1) load to the same weights and the same hash."""
import json
import shutil

import pytest
import torch

import amadapter
from amadapter.bundled import toy_model_dir
from amadapter.pipeline import AMAdapterPipeline

TOY_HASH = "d3282827261a45ba04c6edbfbabfe0adf7c39108167356e0790c29a8d36233b7"  # run manifests record it
COMPONENTS = ("unet", "vae", "scheduler", "structure_net", "matcher", "text_embeds")


@pytest.fixture(scope="module")
def toy():
    return AMAdapterPipeline.from_pretrained(toy_model_dir())


def legacy_copy(src, dst):
    """The folder as amgen wrote it before the DiffusionPipeline port."""
    for name in COMPONENTS:
        shutil.copytree(src / name, dst / name)
    vae_class = json.loads((src / "vae" / "config.json").read_text())["_class_name"]
    index = {"_class_name": "AMAdapterPipeline", "format_version": 1, "preset": "toy", "model_hash": TOY_HASH,
             "components": {"unet": "UNet2DConditionModel", "vae": vae_class, "scheduler": "DDIMScheduler",
                            "structure_net": "StructureNet", "matcher": "Matcher", "text_embeds": "TextEmbeds"}}
    (dst / "model_index.json").write_text(json.dumps(index, indent=2))
    return dst


def _same_weights(a, b):
    for name in ("unet", "vae", "structure_net", "matcher", "text_embeds"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa), name


def test_bundled_toy_is_in_diffusers_layout_with_its_hash(toy):
    index = json.loads((toy_model_dir() / "model_index.json").read_text())
    assert index["_class_name"] == "AMAdapterPipeline" and "_diffusers_version" in index
    assert index["structure_net"] == ["amadapter", "StructureNet"] and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert "components" not in index and "format_version" not in index
    assert toy.model_hash() == TOY_HASH == index["_model_hash"] and toy.preset == "toy"


def test_legacy_folder_loads_the_same_model(toy, tmp_path):
    old = AMAdapterPipeline.from_pretrained(legacy_copy(toy_model_dir(), tmp_path / "old"))
    _same_weights(toy, old)
    assert old.model_hash() == TOY_HASH and old.preset == "toy"
    # re-saving an old folder writes the current layout, loadable by diffusers itself
    old.save_pretrained(tmp_path / "new")
    new_index = json.loads((tmp_path / "new" / "model_index.json").read_text())
    bundled_index = json.loads((toy_model_dir() / "model_index.json").read_text())
    skip = {"_diffusers_version"}
    assert {k: v for k, v in new_index.items() if k not in skip} == {k: v for k, v in bundled_index.items() if k not in skip}
    for name in COMPONENTS:
        for f in (toy_model_dir() / name).glob("*.safetensors"):
            assert f.read_bytes() == (tmp_path / "new" / name / f.name).read_bytes(), f"{name}/{f.name}"


def test_diffusers_loader_returns_our_pipeline(toy):
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging

    assert amadapter.StructureNet is type(toy.structure_net)  # how ["amadapter", "StructureNet"] resolves
    logging.disable_progress_bar()
    try:
        pipe = DiffusionPipeline.from_pretrained(str(toy_model_dir()), low_cpu_mem_usage=False, bank_cache_bytes=123)
    finally:
        logging.enable_progress_bar()
    assert type(pipe) is AMAdapterPipeline and pipe.preset == "toy" and pipe.bank_cache.max_bytes == 123
    _same_weights(toy, pipe)
    assert pipe.model_hash() == TOY_HASH


def test_loader_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json missing"):
        AMAdapterPipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="model_index.json: holds a 'StableDiffusionPipeline'"):
        AMAdapterPipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "AMAdapterPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(FileNotFoundError, match="unet: component folder missing"):
        AMAdapterPipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "AMAdapterPipeline", "format_version": 7, "components": {}}))
    with pytest.raises(ValueError, match="format_version 7 unsupported"):
        AMAdapterPipeline.from_pretrained(tmp_path)


def test_load_model_specs(tmp_path):
    from amadapter.loading import load_model
    from evaluation.runner import ModelNotFoundError
    from evaluation.runner import load_pipeline as eval_load
    from stages.synthesize import load_pipeline as stage_load

    toy = load_model("toy", bank_cache_bytes=5)
    assert toy.name == "toy" and toy.pipe.model_hash() == TOY_HASH and toy.pipe.bank_cache.max_bytes == 5
    rnd = load_model("random:toy")
    assert rnd.name == "toy-random" and rnd.pipe.preset == "toy" and rnd.pipe.model_hash() != TOY_HASH
    folder = legacy_copy(toy_model_dir(), tmp_path / "mymodel")
    assert load_model(folder).name == "mymodel"
    with pytest.raises(ValueError, match="sd15_dir"):
        load_model("sd15")
    # both callers go through it and keep their own behaviour and messages
    pipe, name = stage_load({"path": str(folder), "dtype": "float32"}, "cpu", bank_cache_size=3)
    assert name == "mymodel" and pipe.model_hash() == TOY_HASH and pipe.bank_cache.max_items == 3
    assert eval_load(folder).model_hash() == TOY_HASH
    with pytest.raises(ModelNotFoundError, match="no model folder here"):
        eval_load(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="model_index.json missing"):
        stage_load({"path": str(tmp_path)}, "cpu")


FP32_NOTICE = "should be kept in float32"


@pytest.fixture
def diffusers_records():
    """Records of diffusers' loggers (they do not propagate to the root logger)."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_loads_with_a_dtype_are_quiet(tmp_path, capfd, diffusers_records, dtype):
    """diffusers' ModelMixin.to warns "modules ... should be kept in float32: []" on every cast,
    for models that keep none: once per component and load (5 lines per actor). Loads and casts
    apply the dtype without it."""
    from amadapter.loading import load_model

    pipes = [load_model("toy", dtype=dtype).pipe, load_model("random:toy", dtype=dtype).pipe,
             load_model(legacy_copy(toy_model_dir(), tmp_path / "old"), dtype=dtype).pipe]
    pipes[0].to("cpu", torch.float16).to(dtype=dtype)
    for pipe in pipes:
        assert {getattr(pipe, n).dtype for n in ("unet", "vae", "structure_net", "matcher", "text_embeds")} == {dtype}
    out, err = capfd.readouterr()
    assert FP32_NOTICE not in out + err
    assert not [r for r in diffusers_records if FP32_NOTICE in r.getMessage()]


def test_a_component_that_keeps_float32_modules_still_warns(toy, diffusers_records):
    """Only the empty notice goes: a component naming modules to keep in float32 gets diffusers'
    own cast and its warning."""
    pipe = AMAdapterPipeline.from_pretrained(toy_model_dir())
    pipe.unet._keep_in_fp32_modules = ["conv_in"]
    pipe.to(torch.bfloat16)
    assert [r for r in diffusers_records if FP32_NOTICE in r.getMessage() and "conv_in" in r.getMessage()]
    assert pipe.unet.dtype == torch.bfloat16
