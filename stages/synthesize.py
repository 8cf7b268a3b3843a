"""Synthesize stage: the AM-Adapter model as a callable class, one instance per Ray actor.

The model loads once in ``__init__``. For every group (targets sharing one exemplar) the exemplar
bank is computed once (``encode_exemplar(key=exemplar_id)``, so the pipeline's LRU also serves
later groups of the same exemplar) and all targets of the group are generated in one call with
their own seeds. A group whose batch call fails is retried one sample at a time, so one bad
sample (e.g. a size the model cannot take) becomes an error row and the others still come out.
Failures of the machine (CUDA out of memory, CUDA errors, lost Ray objects) are never error rows:
an out-of-memory batch is split in halves once, then they leave the stage (stages/failures.py).
"""
from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from amadapter.bank import DEFAULT_BANK_CACHE_BYTES
from amadapter.loading import load_model
from amgen_core.quarantine import is_sample_error, sample_error_row
from connectors.storage import local_dir
from stages.failures import CrashPoint, leave_stage, split_once_on_oom
from stages.group import unpack_arrays
from stages.sample_rows import SAMPLE_COLUMNS, png_or_empty

# Failures of one sample that must not stop the run (shape/size problems surface as these in torch);
# a RuntimeError only when amgen_core.quarantine.failure_kind does not blame the machine.
SAMPLE_ERRORS = (ValueError, RuntimeError, IndexError, KeyError)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but this worker has no CUDA device")
    return device


def load_pipeline(model: dict[str, Any], device: str = "cpu", bank_cache_size: int | None = 64,
                  bank_cache_bytes: int = DEFAULT_BANK_CACHE_BYTES):
    """The stage's view of :func:`amadapter.loading.load_model`: ``model`` config -> (pipeline,
    display name). ``path: toy`` takes the bundled trained toy weights when they exist and a
    random-weight toy model (seed 0, "toy-random") until then. Banks are cached per actor within
    ``bank_cache_bytes`` and at most ``bank_cache_size`` of them."""
    import torch

    dtype = getattr(torch, model.get("dtype", "float32"))
    path = model.get("path", "toy")
    if "://" in path:  # a model folder on shared storage: mirrored once per node
        path = local_dir(path)
    loaded = load_model(path, device=device, dtype=dtype, sd15_dir=local_dir(model.get("sd15_dir")),
                        adapter_dir=local_dir(model.get("adapter_dir")),
                        channels_last=model.get("channels_last"), compile=model.get("compile", "off"),
                        bank_cache_size=None if bank_cache_size is None else int(bank_cache_size),
                        bank_cache_bytes=int(bank_cache_bytes))
    loaded.pipe.set_progress_bar_config(disable=True)  # rows report progress, not per-step bars
    return loaded.pipe, loaded.name


class ModelClock:
    """Time spent inside the model: wall seconds and this process's CPU seconds (all its threads).

    Everything else a run spends, on any process, is the DAG's own cost around the model
    (bench/pipeline_efficiency.py divides a run's CPU time by this line)."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._t = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._t[0]
        self.cpu += time.process_time() - self._t[1]
        return False


class Synthesizer:
    """Ray Data batch function over loaded groups (see stages/group.py) -> one row per sample.

    ``encode_pngs``: False leaves image, label and instance as arrays (None where absent), for
    ``stages.sample_rows.encode_pngs`` to encode in another process: a model actor then spends its time in the model
    and not in zlib (pipeline/synthesis_actors.py). The bytes are the same either way.

    ``restart_on_device_error``: a CUDA error ends the process (for Ray to restart the actor); only
    for an instance that is a Ray actor."""

    def __init__(self, model: dict[str, Any], *, device: str = "cpu", torch_threads: int | None = None,
                 bank_cache_size: int = 64, bank_cache_bytes: int = DEFAULT_BANK_CACHE_BYTES,
                 restart_on_device_error: bool = False, encode_pngs: bool = True):
        import torch

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.settings = dict(model)
        self.device = resolve_device(device)
        self.pipe, name = load_pipeline(model, self.device, bank_cache_size, bank_cache_bytes)
        self.model_id = f"{name}@{self.pipe.model_hash()[:16]}"
        self.restart_on_device_error = restart_on_device_error
        self.crash_point = CrashPoint()
        self.clock = ModelClock()
        self.encode_pngs = encode_pngs

    # -- one group
    def _bank(self, arrays: dict[str, np.ndarray], key: str):
        m = self.settings
        if m["mode"] == "structure_only":  # the baseline ignores the exemplar
            return None
        with self.clock:
            return self.pipe.encode_exemplar(
                arrays["exemplar_image"], arrays["exemplar_label"], arrays.get("exemplar_instance"),
                num_inference_steps=m["steps"], guidance_scale=m["guidance_scale"], key=key)

    def _generate(self, bank, labels: list[np.ndarray], instances: list[np.ndarray | None], seeds: list[int],
                  exemplar_instance: np.ndarray | None, exemplar_key: str) -> np.ndarray:
        m = self.settings
        kwargs: dict[str, Any] = {}
        if m.get("granularity", "class") == "instance":
            kwargs.update(exemplar_instance=exemplar_instance, granularity="instance",
                          target_instances=None if any(i is None for i in instances) else np.stack(instances))
        with self.clock:
            out = self.pipe(np.stack(labels), bank=bank, seeds=[int(s) for s in seeds],
                            num_inference_steps=m["steps"], guidance_scale=m["guidance_scale"], mode=m["mode"],
                            exemplar_guidance_end=m.get("exemplar_guidance_end", 1.0), exemplar_key=exemplar_key,
                            **kwargs)
            images = np.asarray(out.images)
        if images.shape[:3] != (len(labels), *labels[0].shape):
            raise ValueError(f"model returned images of shape {images.shape} for {len(labels)} targets "
                             f"of size {labels[0].shape}")
        return images

    def synthesize_group(self, group: dict[str, Any], payload: bytes) -> list[dict[str, Any]]:
        members = group["members"]
        if not members:
            return []
        before = (self.clock.wall, self.clock.cpu)
        arrays = unpack_arrays(payload)
        labels = [arrays[f"label_{i}"] for i in range(len(members))]
        instances = [arrays.get(f"instance_{i}") for i in range(len(members))]
        key = group["exemplar_id"]
        misses_before = self._bank_misses()
        try:
            bank = self._bank(arrays, key)
        except SAMPLE_ERRORS as e:
            if not is_sample_error(e):
                raise
            return [self._row(group, m, None, None, None, sample_error_row(m, "exemplar", f"{type(e).__name__}: {e}"))
                    for m in members]
        bank_new = bank is not None and self._bank_misses() > misses_before
        results: list[tuple[np.ndarray | None, dict | None]] = [(None, None)] * len(members)
        # Samples the model cannot take at all are quarantined up front, so the rest still run as
        # one batch (a batch's pixels depend only on which samples are in it: deterministic).
        good = []
        for i, m in enumerate(members):
            problem = self._unfit(labels[i], labels, instances[i])
            if problem:
                results[i] = (None, sample_error_row(m, "synthesize", problem))
            else:
                good.append(i)
        ex_inst = arrays.get("exemplar_instance")
        if good:
            def generate(idx):
                return self._generate(bank, [labels[i] for i in idx], [instances[i] for i in idx],
                                      [members[i]["seed"] for i in idx], ex_inst, key)

            try:
                images = split_once_on_oom(generate, good)
                for j, i in enumerate(good):
                    results[i] = (images[j], None)
            except SAMPLE_ERRORS as e:
                if not is_sample_error(e):
                    raise
                for i in good:  # an unexpected failure: find the culprit(s) one sample at a time
                    try:
                        results[i] = (generate([i])[0], None)
                    except SAMPLE_ERRORS as e:
                        if not is_sample_error(e):
                            raise
                        results[i] = (None, sample_error_row(members[i], "synthesize", f"{type(e).__name__}: {e}"))
        seconds = (self.clock.wall - before[0]) / len(members)
        cpu_seconds = (self.clock.cpu - before[1]) / len(members)
        rows = []
        for i, (m, (img, err)) in enumerate(zip(members, results)):
            row = self._row(group, m, img, labels[i], instances[i], err)
            row["bank_new"] = bool(bank_new and i == 0)
            row["seconds"], row["cpu_seconds"] = seconds, cpu_seconds
            rows.append(row)
        return rows

    def _unfit(self, label: np.ndarray, group_labels: list[np.ndarray], instance) -> str:
        """Why the model cannot take this target (empty string when it can)."""
        stride = int(getattr(self.pipe, "stride", 1))
        h, w = label.shape
        if h % stride or w % stride:
            return f"SizeError: target size {h}x{w} is not a multiple of the model stride {stride}"
        sizes = [lab.shape for lab in group_labels]
        common = max(set(sizes), key=lambda s: (sizes.count(s), s))
        if label.shape != common:
            return f"SizeError: target size {h}x{w} differs from its batch's {common[0]}x{common[1]}"
        if instance is not None and instance.shape != label.shape:
            return f"SizeError: instance map {instance.shape} differs from the label map {label.shape}"
        return ""

    def _bank_misses(self) -> int:
        return int(self.pipe.bank_cache.misses)

    def _pixels(self, image, label, instance) -> dict[str, Any]:
        cells = {"image": image, "label": label, "instance": instance}
        return {k: png_or_empty(a) for k, a in cells.items()} if self.encode_pngs else cells

    def _row(self, group: dict, m: dict, image, label, instance, err: dict | None) -> dict[str, Any]:
        ok = err is None
        return {
            "sample_id": m["sample_id"], "shard": int(group["shard"]), "position": int(m["position"]),
            "target_id": m["target_id"], "exemplar_id": group["exemplar_id"],
            **self._pixels(image if ok else None, label if ok else None, instance if ok else None),
            "seed": int(m["seed"]), "augment": m["augment"], "model": self.model_id,
            "error": "" if ok else json.dumps(err), "bank_new": False, "seconds": 0.0,
            "cpu_seconds": 0.0,
        }

    # -- Ray Data entry point
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        self.crash_point.batch()
        try:
            return self._rows(batch)
        except Exception as e:  # noqa: BLE001 - sample errors were handled inside; classify the rest
            leave_stage(e, "synthesize", exit_process=self.restart_on_device_error)
            raise  # leave_stage always raises or exits

    def _rows(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in SAMPLE_COLUMNS}
        for g, payload, err in zip(batch["group"], batch["payload"], batch["error"]):
            group = json.loads(g)
            for e in json.loads(err):  # members the loader already quarantined
                m = {"sample_id": e["sample_id"], "target_id": e["input_id"], "position": -1, "seed": 0, "augment": "{}"}
                row = self._row(group, m, None, None, None, e)
                row["position"] = -1
                for k in SAMPLE_COLUMNS:
                    out[k].append(row[k])
            for row in self.synthesize_group(group, bytes(payload) if payload is not None else b""):
                for k in SAMPLE_COLUMNS:
                    out[k].append(row[k])
        return out
