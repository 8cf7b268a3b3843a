"""The judge segmenter: persistence, prediction shape, resumable seeded training; the downstream test
on data passed in (what each arm saw, the same held-out set, reruns, noise labels)."""
import json

import numpy as np
import pytest
import torch

from evaluation.segmenter import Segmenter, SegmenterConfig, SegmenterFileError, num_parameters
from evaluation.segmenter_train import SegmenterTrainConfig, evaluate_segmenter, train_segmenter
from amgen_core.labels import NAME_TO_ID, NUM_TRAIN_IDS, TRAIN_ID_TO_ID

TINY = SegmenterConfig(widths=(4, 8, 8), image_size=(16, 32))


class StripesSource:
    """Finite hand-made scenes: sky over road, a colour that tells them apart."""

    size = 8

    def __getitem__(self, i):
        label = np.full((16, 32), NAME_TO_ID["road"], np.uint8)
        label[: 4 + i % 4] = NAME_TO_ID["sky"]
        img = np.where(label[..., None] == NAME_TO_ID["sky"], [120, 160, 230], [70, 70, 70]).astype(np.uint8)
        return img, label


def test_default_segmenter_is_small():
    assert num_parameters(Segmenter()) <= 1_000_000


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Segmenter(SegmenterConfig(widths=(4, 8, 8), image_size=(16, 32), meta={"heldout_miou": 0.5}))
    # BatchNorm running stats must travel too: give them non-default values.
    model.train()
    model(torch.randn(2, 3, 16, 32))
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 32, 3), dtype=np.uint8)
    before = model.eval()(model.to_input(images))
    model.save_pretrained(tmp_path / "seg")
    loaded = Segmenter.from_pretrained(tmp_path / "seg")
    assert loaded.config == model.config
    assert torch.equal(loaded(loaded.to_input(images)), before)
    pred = loaded.predict(images)
    assert pred.shape == (3, 16, 32) and pred.dtype == np.uint8 and pred.max() < 19


def test_missing_or_bad_files_are_named(tmp_path):
    with pytest.raises(SegmenterFileError, match="config.json"):
        Segmenter.from_pretrained(tmp_path)
    Segmenter(TINY).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"num_classes": 19, "widths": [4, 8, 16], "image_size": [16, 32]}))
    with pytest.raises(SegmenterFileError, match="model.safetensors"):
        Segmenter.from_pretrained(tmp_path)


def test_bad_image_input_is_rejected():
    with pytest.raises(ValueError, match="multiple of 4"):
        Segmenter(TINY).predict(np.zeros((1, 10, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        Segmenter(TINY).predict(np.zeros((1, 16, 32, 3), np.float32))


def test_training_learns_and_resumes_exactly(tmp_path):
    cfg = SegmenterTrainConfig(steps=60, batch_size=4, lr=3e-2, warmup_steps=2, checkpoint_every=30, log_every=30, threads=1)
    quiet = lambda *_: None
    full = train_segmenter(StripesSource(), tmp_path / "full", cfg, TINY, log=quiet)
    assert evaluate_segmenter(full, StripesSource(), 8).miou() > 0.9

    mid_dir = tmp_path / "mid"
    _train_until(StripesSource(), mid_dir, cfg, 30)
    resumed = train_segmenter(StripesSource(), mid_dir, cfg, TINY, log=quiet)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def _train_until(source, run_dir, cfg, stop_step):
    """Run the real loop but interrupt it after ``stop_step`` steps, as a kill would."""
    class Stop(Exception):
        pass

    def log(msg):
        if msg.startswith(f"step {stop_step}/"):
            raise Stop

    with pytest.raises(Stop):
        train_segmenter(source, run_dir, cfg, TINY, log=log)
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"] == stop_step


# ---------------------------------------------------------------------------------------------
# the downstream test: data as arguments, and what each arm saw

H, W = 32, 64  # a small toy-town frame keeps the two arms fast


def _write_dataset(path, n, hw=(64, 128)):
    """An amgen output dataset: Parquet shards with Image structs ``image`` and ``label``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from amgen_core.image_io import encode_png
    from toytown import make_triples

    triples = list(make_triples(n, seed=7, height=hw[0], width=hw[1]))
    struct = lambda data: {"bytes": data, "path": None}  # noqa: E731
    table = pa.table({
        "sample_id": [f"s{i}" for i in range(n)],
        "image": [struct(encode_png(t.target_image)) for t in triples],
        "label": [struct(encode_png(t.target_label)) for t in triples],
    })
    path.mkdir(parents=True)
    pq.write_table(table, path / "train-00000-of-00001.parquet")
    return triples


def test_layout_samples_read_a_parquet_dataset_back_exactly(tmp_path):
    from connectors.parquet_source import ParquetSource
    from evaluation.downstream import DatasetShapeError, LayoutSamples

    triples = _write_dataset(tmp_path / "data", 3)
    samples = LayoutSamples(ParquetSource(tmp_path), (64, 128))
    assert samples.size == 3
    img, label = samples[2]
    assert np.array_equal(img, triples[2].target_image) and np.array_equal(label, triples[2].target_label)
    with pytest.raises(DatasetShapeError, match=r"train-00000-of-00001\.parquet row 0: size .* differs"):
        LayoutSamples(ParquetSource(tmp_path), (32, 32))[0]


class Counted:
    """A sample source that counts its reads (the downstream run must really draw from it)."""

    def __init__(self, samples):
        self.samples, self.size, self.reads = list(samples), len(samples), 0

    def __getitem__(self, i):
        self.reads += 1
        return self.samples[i]


def _scenes(base, n):
    from evaluation.segmenter_train import ToyTownScenes

    scenes = ToyTownScenes(base, H, W)
    return [scenes[i] for i in range(n)]


def _synthetic(n, noise_labels=False):
    from toytown import make_triples

    out = []
    rng = np.random.default_rng(3)
    for t in make_triples(n, seed=7, height=H, width=W):
        label = t.target_label
        if noise_labels:  # the same images, each pixel labelled with a random class id
            label = rng.choice(np.asarray(TRAIN_ID_TO_ID)[:NUM_TRAIN_IDS], label.shape).astype(np.uint8)
        out.append((t.target_image, label))
    return out


def _downstream(tmp_path, name, synthetic, real=None):
    from evaluation.downstream import run_downstream

    cfg = SegmenterTrainConfig(steps=6, batch_size=4, lr=1e-2, warmup_steps=1, checkpoint_every=6, log_every=6, threads=1)
    real = real if real is not None else _scenes(50_000_000, 3)
    heldout = _scenes(60_000_000, 4)
    result = run_downstream(real, synthetic, heldout, tmp_path / name, cfg, heldout_n=4, log=lambda *_: None)
    for arm in ("real_only", "real_plus_synthetic"):
        result[arm].pop("seconds")
    return result, heldout


def test_downstream_saves_the_real_only_segmenter_as_a_judge(tmp_path):
    """--save-real-judge: the real-only arm's model as a score.segmenter folder; it reloads and
    predicts as the trained model does."""
    from evaluation.downstream import run_downstream
    from evaluation.segmenter import Segmenter
    from evaluation.segmenter_train import train_segmenter

    cfg = SegmenterTrainConfig(steps=2, batch_size=2, lr=1e-2, warmup_steps=1, checkpoint_every=2, log_every=2, threads=1)
    real, heldout = _scenes(50_000_000, 2), _scenes(60_000_000, 2)
    run_downstream(real, _synthetic(1), heldout, tmp_path / "run", cfg, heldout_n=2, log=lambda *_: None,
                   save_real_only=tmp_path / "judge")
    judge = Segmenter.from_pretrained(tmp_path / "judge")
    trained = train_segmenter(real, tmp_path / "run" / "real_only", cfg, log=lambda *_: None)  # resumes: done
    images = np.stack([im for im, _ in heldout])
    assert np.array_equal(judge.predict(images), trained.predict(images))


def test_downstream_runs_both_arms(tmp_path):
    from amgen_core.labels import to_train_ids
    from evaluation.downstream import pixels_per_class
    from evaluation.metrics import confusion_matrix

    real, synthetic = Counted(_scenes(50_000_000, 3)), Counted(_synthetic(2))
    result, heldout = _downstream(tmp_path, "a", synthetic, real)
    only, plus = result["real_only"], result["real_plus_synthetic"]
    assert result["n_real"] == 3 and result["n_synthetic"] == 2
    assert (tmp_path / "a" / "real_only" / "checkpoint.pt").exists()
    assert (tmp_path / "a" / "real_plus_synthetic" / "checkpoint.pt").exists()

    # The synthetic arm trained on the synthetic samples, the real arm never touched them; the
    # reported draws are the reads the runs made (6 steps x 4 samples each), besides one read of
    # each sample per arm that trains on it for the checkpoint's data fingerprint.
    assert only["train_samples"] == {"real": 3, "synthetic": 0} and plus["train_samples"] == {"real": 3, "synthetic": 2}
    assert only["draws"] == {"real": 24, "synthetic": 0}
    assert plus["draws"]["synthetic"] > 0 and sum(plus["draws"].values()) == 24
    assert synthetic.reads == plus["draws"]["synthetic"] + synthetic.size
    assert real.reads == only["draws"]["real"] + plus["draws"]["real"] + 2 * real.size

    # Both arms were scored on the same held-out pixels: those of the held-out labels.
    truth = sum(confusion_matrix(to_train_ids(lab), to_train_ids(lab)) for _, lab in heldout)
    assert only["heldout_pixels_per_class"] == plus["heldout_pixels_per_class"] == pixels_per_class(truth)
    assert sum(only["heldout_pixels_per_class"].values()) > 0.9 * 4 * H * W
    assert result["delta_miou"] == pytest.approx(plus["miou"] - only["miou"], abs=0.02)

    # Same data, config and seed: the same numbers, bit for bit.
    again, _ = _downstream(tmp_path, "b", _synthetic(2))
    assert again == result

    # Synthetic samples with pure-noise labels change what the synthetic arm learns, not the real arm.
    noisy, _ = _downstream(tmp_path, "c", _synthetic(2, noise_labels=True))
    assert noisy["real_only"] == only
    assert noisy["real_plus_synthetic"]["iou_per_class"] != plus["iou_per_class"]
    assert noisy["real_plus_synthetic"]["draws"] == plus["draws"]


def test_segmenter_data_may_be_a_dataset_or_an_iterable(tmp_path):
    """A torch Dataset of (image, label) and a generator of pairs train exactly as the source does."""
    cfg = SegmenterTrainConfig(steps=3, batch_size=2, warmup_steps=1, checkpoint_every=3, log_every=3, threads=1)
    quiet = lambda *_: None  # noqa: E731
    ref = train_segmenter(StripesSource(), tmp_path / "ref", cfg, TINY, log=quiet)

    class AsDataset(torch.utils.data.Dataset):
        def __len__(self):
            return StripesSource.size

        def __getitem__(self, i):
            return StripesSource()[i]

    for name, data in (("dataset", AsDataset()), ("iterable", (StripesSource()[i] for i in range(8)))):
        model = train_segmenter(data, tmp_path / name, cfg, TINY, log=quiet)
        for a, b in zip(ref.state_dict().values(), model.state_dict().values()):
            assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="held-out data holds 8"):
        evaluate_segmenter(ref, AsDataset(), 9)


def test_cli_downstream_opens_the_dataset_and_passes_it(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    _write_dataset(tmp_path / "ds" / "data", 2)
    out = tmp_path / "result.json"
    args = ["eval", "segmenter", "--dataset", str(tmp_path / "ds"), "--real-n", "2", "--steps", "1",
            "--batch-size", "2", "--heldout-n", "2", "--run-dir", str(tmp_path / "runs"), "--json", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["dataset"] == str(tmp_path / "ds") and result["n_synthetic"] == 2 and result["n_real"] == 2
    assert result["real_plus_synthetic"]["train_samples"] == {"real": 2, "synthetic": 2}
    res = CliRunner().invoke(app, ["eval", "segmenter", "--dataset", str(tmp_path / "nope"), "--steps", "1"])
    assert res.exit_code == 2 and "nope" in res.output


def test_cli_train_segmenter_passes_toytown_scenes_to_the_judge(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    args = ["eval", "train-segmenter", "--steps", "1", "--batch-size", "2", "--heldout-n", "2",
            "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "judge")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    meta = Segmenter.from_pretrained(tmp_path / "judge").config.meta
    assert meta["train_scenes"] == "np.random.default_rng(50000000 + i), i in [0, 2)"
    assert meta["heldout_scenes"] == "np.random.default_rng(60000000 + i), i in [0, 2)"
    assert meta["data"].startswith("toy-town real renderings") and 0 <= meta["heldout_miou"] <= 100
