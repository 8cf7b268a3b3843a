"""Sample errors are quarantined; failures of the machine (CUDA OOM, CUDA errors, lost Ray objects)
are classified in one place and leave the model stages, after one split of an out-of-memory batch.
Without Ray: the classifier, the split, the stages' reactions. With Ray: tests/test_failures_ray.py."""
from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from amgen_core.quarantine import (CLUSTER, DEVICE, OOM, SAMPLE, InfrastructureError, failure_kind,
                                   is_sample_error)
from test_pipeline_fixtures import tiny_model_dir
from test_stages import _sample_row, scene, tiny_segmenter

MODEL = {"steps": 2, "guidance_scale": 2.0, "mode": "am_adapter", "granularity": "class", "dtype": "float32"}


def cuda_oom() -> torch.cuda.OutOfMemoryError:
    """What torch raises when the accelerator's memory runs out (constructed on CPU)."""
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.77 GiB total)")


def test_the_classifier_tells_the_machine_from_the_sample():
    import ray.exceptions

    assert failure_kind(cuda_oom()) == OOM
    assert failure_kind(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")) == OOM
    assert failure_kind(RuntimeError("CUDA error: device-side assert triggered\nCUDA kernel errors might be "
                                     "asynchronously reported")) == DEVICE
    assert failure_kind(RuntimeError("CUDA error: an illegal memory access was encountered")) == DEVICE
    assert failure_kind(RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR")) == DEVICE
    if hasattr(torch, "AcceleratorError"):
        assert failure_kind(torch.AcceleratorError("CUDA error: unspecified launch failure")) == DEVICE
    assert failure_kind(ray.exceptions.ObjectLostError("ab" * 14, "owner", "call site")) == CLUSTER
    assert failure_kind(ray.exceptions.ActorDiedError()) == CLUSTER
    assert failure_kind(ray.exceptions.WorkerCrashedError()) == CLUSTER
    # What a bad sample raises stays a sample error, RuntimeErrors of torch shapes included.
    for e in (ValueError("label has unknown ids [200]"),
              RuntimeError("The size of tensor a (8) must match the size of tensor b (10) at non-singleton dimension 3"),
              RuntimeError("shape '[1, 4, 8, 16]' is invalid for input of size 520"),
              IndexError("index 200 is out of bounds"), KeyError("label_3")):
        assert failure_kind(e) == SAMPLE and is_sample_error(e), e
    # A cause counts: a sample-looking error raised from an OOM is an OOM.
    try:
        try:
            raise cuda_oom()
        except RuntimeError as inner:
            raise ValueError("could not encode the exemplar") from inner
    except ValueError as outer:
        assert failure_kind(outer) == OOM
    # Ray's task error carries the worker's exception as ``cause``.
    wrapped = ray.exceptions.RayTaskError("fn", "traceback", RuntimeError("CUDA error: device-side assert triggered"))
    assert failure_kind(wrapped) == DEVICE
    assert failure_kind(ray.exceptions.RayTaskError("fn", "traceback", ValueError("bad label"))) == SAMPLE
    e = InfrastructureError(DEVICE, "synthesize: device failure")
    back = pickle.loads(pickle.dumps(e))
    assert isinstance(back, InfrastructureError) and back.kind == DEVICE and str(back) == str(e)
    assert failure_kind(back) == DEVICE


class Flaky:
    """The tiny model behind a pipeline that fails like a GPU: OOM above ``max_batch`` targets (or
    always the given error). Records the batch size of every call."""

    def __init__(self, pipe, max_batch: int | None = None, error: BaseException | None = None):
        self._pipe, self.max_batch, self.error, self.calls = pipe, max_batch, error, []

    def __call__(self, labels, **kwargs):
        self.calls.append(len(labels))
        if self.error is not None:
            raise self.error
        if self.max_batch is not None and len(labels) > self.max_batch:
            raise cuda_oom()
        return self._pipe(labels, **kwargs)

    def __getattr__(self, name):
        return getattr(self._pipe, name)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from stages.synthesize import Synthesizer

    model_dir = tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")
    return Synthesizer({"path": str(model_dir), **MODEL}, device="cpu", torch_threads=1)


def group_of(n: int):
    from stages.group import pack_arrays

    ex = scene(1)
    members = [{"sample_id": f"s{i}", "target_id": f"t{i}", "seed": 10 + i, "augment": "{}", "position": i}
               for i in range(n)]
    arrays = {"exemplar_image": ex.image, "exemplar_label": ex.label,
              **{f"label_{i}": scene(i).label for i in range(n)}}
    return {"shard": 0, "exemplar_id": "ex", "members": members}, pack_arrays(arrays)


def group_of_members(group, keep):
    """The group of ``group_of`` cut to the members at ``keep`` (their payload re-packed)."""
    from stages.group import pack_arrays

    ex = scene(1)
    arrays = {"exemplar_image": ex.image, "exemplar_label": ex.label,
              **{f"label_{j}": scene(i).label for j, i in enumerate(keep)}}
    return {**group, "members": [group["members"][i] for i in keep]}, pack_arrays(arrays)


def ray_batch(group, payload):
    import json

    return {"group": np.array([json.dumps(group)], dtype=object), "payload": np.array([payload], dtype=object),
            "error": np.array(["[]"], dtype=object)}


def test_an_oom_batch_is_split_once_into_halves(synth):
    from amgen_core.image_io import decode_png

    group, payload = group_of(4)
    clean = synth.synthesize_group(group, payload)
    pipe = synth.pipe
    try:
        synth.pipe = Flaky(pipe, max_batch=2)
        split = synth.synthesize_group(group, payload)
        assert synth.pipe.calls == [4, 2, 2], "one try, then each half once"
        assert [r["error"] for r in split] == [""] * 4
        # Exactly the halves as batches of their own (deterministic: same OOM, same bytes) ...
        synth.pipe = pipe
        halves = [synth.synthesize_group(*group_of_members(group, part)) for part in ((0, 1), (2, 3))]
        assert [r["image"] for r in split] == [r["image"] for h in halves for r in h]
        # ... and the unsplit batch's pixels up to float rounding (a batch's size can change a last bit).
        for r, c in zip(split, clean):
            diff = np.abs(decode_png(r["image"], kind="rgb").astype(int) - decode_png(c["image"], kind="rgb").astype(int))
            assert diff.max() <= 2 and diff.mean() < 0.01
        # Halves that still do not fit: no quarantine row, the error leaves the stage for Ray.
        synth.pipe = Flaky(pipe, max_batch=1)
        with pytest.raises(InfrastructureError, match="synthesize: oom failure") as info:
            synth(ray_batch(group, payload))
        assert info.value.kind == OOM and synth.pipe.calls == [4, 2]
        assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)
    finally:
        synth.pipe = pipe


@pytest.mark.parametrize("error, kind", [
    (RuntimeError("CUDA error: device-side assert triggered"), DEVICE),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB"), OOM),
])
def test_machine_failures_are_never_quarantine_rows(synth, error, kind):
    group, payload = group_of(1)  # one sample: nothing to split, no one-by-one search
    pipe = synth.pipe
    try:
        synth.pipe = Flaky(pipe, error=error)
        with pytest.raises(InfrastructureError) as info:
            synth(ray_batch(group, payload))
        assert info.value.kind == kind and synth.pipe.calls == [1]
        # A sample's own error still is a row: the run goes on.
        synth.pipe = Flaky(pipe, error=RuntimeError("The size of tensor a (8) must match the size of tensor b (10)"))
        out = synth(ray_batch(group, payload))
        assert out["image"] == [b""] and "size of tensor" in out["error"][0]
    finally:
        synth.pipe = pipe


def test_a_cuda_error_in_an_actor_ends_its_process_for_a_restart():
    code = ("from stages.failures import leave_stage\n"
            "leave_stage(RuntimeError('CUDA error: device-side assert triggered'), 'synthesize', exit_process=True)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    from stages.failures import EXIT_CODE

    assert res.returncode == EXIT_CODE, res.stderr[-2000:]
    assert "ending this actor's process for a restart" in res.stderr and "device-side assert" in res.stderr
    # Outside an actor (exit_process=False) the same error is raised, typed for Ray's retry.
    from stages.failures import leave_stage

    with pytest.raises(InfrastructureError, match="device failure"):
        leave_stage(RuntimeError("CUDA error: device-side assert triggered"), "synthesize", exit_process=False)
    with pytest.raises(KeyError):  # a bug stays what it is
        leave_stage(KeyError("x"), "synthesize", exit_process=True)


def test_the_scorer_splits_an_oom_batch_once_too(tmp_path):
    from stages.score import Scorer

    scorer = Scorer(str(tiny_segmenter(tmp_path / "seg")))
    rows = [_sample_row(i, 0) for i in range(4)]
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    clean = scorer(batch)["score_miou"]
    predict, calls = scorer.model.predict, []

    def oom_above(limit):
        def run(images):
            calls.append(len(images))
            if len(images) > limit:
                raise cuda_oom()
            return predict(images)
        return run

    scorer.model.predict = oom_above(2)
    assert np.array_equal(scorer(batch)["score_miou"], clean) and calls == [4, 2, 2]
    calls.clear()
    scorer.model.predict = oom_above(1)
    with pytest.raises(InfrastructureError, match="score: oom failure"):
        scorer(batch)
    assert calls == [4, 2]


def test_the_crash_hook_fires_once_per_marker(tmp_path):
    from stages.failures import CRASH_ENV, CrashPoint

    marker = tmp_path / "crashed"
    code = (f"from stages.failures import CrashPoint\n"
            f"c = CrashPoint({f'2:{marker}'!r})\n"
            "c.batch(); print('one', flush=True); c.batch(); print('two', flush=True)\n")
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert first.returncode != 0 and first.stdout.split() == ["one"] and marker.exists()
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.split() == ["one", "two"], "the restarted actor goes on"
    with pytest.raises(ValueError, match=CRASH_ENV):
        CrashPoint("two:")
    assert CrashPoint("").at == 0
