"""The quality benchmark: AM-Adapter modes against toy-town ground truth.

Each held-out triple holds an exemplar (image, labels, instances), a target layout and the
ground truth: the target layout rendered with the exemplar's appearance. Every mode turns
(exemplar, target layout) into an image; the ground-truth rendering itself is scored as the
ceiling. Scores (see metrics.py): segmenter mIoU against the target layout, per-class and
per-vehicle CIEDE2000 against the ground truth, PSNR, and controllability under the triple's
instance map given as the user's exemplar-instance -> target-instance mapping.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from evaluation import metrics as M
from evaluation.segmenter import Segmenter
from evaluation.stats import Interval, TripleRecord, compare
from amgen_core.labels import to_train_ids

MODES: tuple[str, ...] = ("structure_only", "sa_aug", "am_adapter")
GROUND_TRUTH = "ground_truth"
# The ground truth encoded and decoded by the model's own VAE: every output passes through that
# decoder, so this is the best any mode can score with this VAE (and how well the judge reads it).
GROUND_TRUTH_VAE = "ground_truth_vae"
# toytown.make_triples(n, seed=QUALITY_SEED): the held-out triples. Their random streams
# are spawned children of SeedSequence([1, QUALITY_SEED, j]); no training stream is (docs/quality.md).
QUALITY_SEED = 1000


@dataclass
class QualitySettings:
    n: int = 200
    seed: int = QUALITY_SEED
    # What `amgen demo` samples with (configs/toytown_demo.yaml): the benchmark scores what users get.
    num_inference_steps: int = 2
    guidance_scale: float = 1.0
    exemplar_guidance_end: float = 1.0  # fraction of steps that read the exemplar (model.exemplar_guidance_end)
    granularity: str = "instance"  # the triple's instance map is the user's mapping
    modes: tuple[str, ...] = MODES
    vae_ceiling: bool = True  # also score GROUND_TRUTH_VAE
    num_examples: int = 4  # triples kept for the picture: the first of each domain, then the first ones


@dataclass
class Measures:
    """Everything measured on one output image."""

    segmentation: np.ndarray
    target_label: np.ndarray
    class_errors: list[float]
    instance_errors: list[float]
    psnr: float
    control: M.ControlResult


def measure(output: np.ndarray, segmentation: np.ndarray, triple) -> Measures:
    return Measures(
        segmentation=segmentation,
        target_label=triple.target_label,
        class_errors=M.class_colour_errors(output, triple.target_image, triple.target_label, triple.exemplar_label),
        # Only mapped vehicles: an unmapped one wears a paint the exemplar never shows.
        instance_errors=M.instance_colour_errors(output, triple.target_image, triple.target_instance,
                                                 only=set(triple.instance_map)),
        psnr=M.psnr(output, triple.target_image),
        control=M.controllability(output, triple.target_instance, triple.exemplar_image, triple.exemplar_instance,
                                  triple.instance_map),
    )


class ModeScores:
    """Running sums for one row of the table (and, one level down, for each toy-town domain)."""

    def __init__(self, by_domain: bool = True) -> None:
        self.n = 0
        self.confusion = M.ConfusionAccumulator()
        self.class_errors: list[float] = []
        self.instance_errors: list[float] = []
        self.psnrs: list[float] = []
        self.control = M.ControlResult(0, 0)
        self.seconds = 0.0
        self.domains: dict[str, ModeScores] | None = {} if by_domain else None
        self.records: list[TripleRecord] = []  # per triple, for paired bootstrap intervals

    def add(self, m: Measures, domain: str | None = None) -> None:
        self.n += 1
        cm = M.confusion_matrix(m.segmentation, to_train_ids(m.target_label))
        self.confusion.cm += cm
        self.class_errors += m.class_errors
        self.instance_errors += m.instance_errors
        self.psnrs.append(m.psnr)
        self.control = M.ControlResult(self.control.hits + m.control.hits, self.control.total + m.control.total)
        self.records.append(TripleRecord(cm, float(sum(m.class_errors)), len(m.class_errors), m.control.hits, m.control.total))
        if self.domains is not None and domain is not None:
            self.domains.setdefault(domain, ModeScores(by_domain=False)).add(m)

    def row(self, mode: str) -> dict[str, Any]:
        finite = [p for p in self.psnrs if math.isfinite(p)]
        return {
            "mode": mode,
            "n": self.n,
            "miou": _r(100.0 * self.confusion.miou()),
            "class_de2000": _r(float(np.mean(self.class_errors)) if self.class_errors else float("nan")),
            "instance_de2000": _r(float(np.mean(self.instance_errors)) if self.instance_errors else float("nan")),
            # Identical images have infinite PSNR: the ceiling row reports null.
            "psnr": _r(float(np.mean(finite))) if len(finite) == len(self.psnrs) and finite else None,
            "controllability": _r(self.control.rate, 4),
            "controllability_count": [self.control.hits, self.control.total],
            "class_pairs": len(self.class_errors),
            "vehicle_instances": len(self.instance_errors),
            "seconds": round(self.seconds, 2),
            **({"by_domain": {d: sub.row(mode) for d, sub in sorted(self.domains.items())}} if self.domains else {}),
        }


def _r(x: float, nd: int = 3) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), nd)


@dataclass
class QualityReport:
    rows: list[dict[str, Any]]
    examples: list[dict[str, Any]] = field(default_factory=list)  # exemplar, target, gt, one image per mode
    settings: QualitySettings | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # Paired bootstrap: am_adapter vs sa_aug and vs structure_only (stats.compare).
    comparisons: dict[str, dict[str, Interval]] = field(default_factory=dict)

    def json_rows(self) -> list[dict[str, Any]]:
        """The issue's schema: {mode, n, miou, class_de2000, instance_de2000, psnr, controllability}."""
        keys = ("mode", "n", "miou", "class_de2000", "instance_de2000", "psnr", "controllability")
        return [{k: r[k] for k in keys} for r in self.rows]


def pipeline_mapping(instance_map: dict[int, int]) -> dict[int, list[int]]:
    """The triple's {target instance: exemplar instance} as the pipeline's {exemplar: [targets]}."""
    out: dict[int, list[int]] = {}
    for target, exemplar in sorted(instance_map.items()):
        out.setdefault(int(exemplar), []).append(int(target))
    return out


def generate(pipe, triple, modes: Iterable[str], seed: int, settings: QualitySettings
             ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """One image per mode for one triple, and seconds per step of the work ("encode", each mode).

    The exemplar is encoded once and its bank serves every mode.
    """
    seconds = {}
    t0 = time.perf_counter()
    bank = pipe.encode_exemplar(
        triple.exemplar_image, triple.exemplar_label, triple.exemplar_instance,
        num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
    )
    seconds["encode"] = time.perf_counter() - t0
    out = {}
    for mode in modes:
        t0 = time.perf_counter()
        result = pipe(
            [triple.target_label],
            bank=bank,
            exemplar_instance=triple.exemplar_instance,
            target_instances=[triple.target_instance],
            instance_mapping=pipeline_mapping(triple.instance_map),
            granularity=settings.granularity,
            seeds=[seed],
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            mode=mode,
            exemplar_guidance_end=settings.exemplar_guidance_end,
        )
        out[mode] = result.images[0]
        seconds[mode] = time.perf_counter() - t0
    return out, seconds


def run_quality(
    pipe,
    segmenter: Segmenter,
    triples: Iterable,
    settings: QualitySettings | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> QualityReport:
    """Score every mode and the ground-truth ceiling on ``triples``."""
    settings = settings or QualitySettings()
    for mode in settings.modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    references = (GROUND_TRUTH_VAE, GROUND_TRUTH) if settings.vae_ceiling else (GROUND_TRUTH,)
    scores = {m: ModeScores() for m in (*settings.modes, *references)}
    examples: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    t_encode = 0.0
    for i, triple in enumerate(triples):
        images, seconds = generate(pipe, triple, settings.modes, seed=settings.seed + i, settings=settings)
        t_encode += seconds.pop("encode")
        for mode, sec in seconds.items():
            scores[mode].seconds += sec
        if settings.vae_ceiling:
            images[GROUND_TRUTH_VAE] = pipe.decode_latents(pipe.encode_images(triple.target_image[None]))[0]
        images[GROUND_TRUTH] = triple.target_image
        names = list(images)
        segs = segmenter.predict(np.stack([images[m] for m in names]))
        for name, seg in zip(names, segs):
            scores[name].add(measure(images[name], seg, triple), triple.domain)
        seen = {e["triple"].domain for e in examples}
        if len(examples) < 2 * settings.num_examples or triple.domain not in seen:
            examples.append({"triple": triple, "images": images})
        if progress:
            progress(i + 1, settings.n)
    total = time.perf_counter() - t_start
    rows = [scores[m].row(m) for m in (*settings.modes, *references)]
    n = rows[0]["n"]
    t_generate = t_encode + sum(scores[m].seconds for m in settings.modes)
    timings = {"total_s": round(total, 1), "generate_s": round(t_generate, 1), "encode_s": round(t_encode, 1),
               "per_triple_all_modes_s": round(t_generate / max(1, n), 3)}
    comparisons = {f"am_adapter vs {other}": compare(scores["am_adapter"].records, scores[other].records)
                   for other in ("sa_aug", "structure_only") if "am_adapter" in scores and other in scores}
    return QualityReport(rows, _pick_examples(examples, settings.num_examples), settings, timings, comparisons)


def _pick_examples(candidates: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The first example of each domain, then the earliest others, in triple order."""
    firsts, seen = [], set()
    for i, e in enumerate(candidates):
        if e["triple"].domain not in seen:
            seen.add(e["triple"].domain)
            firsts.append(i)
    chosen = set(firsts[:k])
    chosen |= set([i for i in range(len(candidates)) if i not in chosen][: k - len(chosen)])
    return [candidates[i] for i in sorted(chosen)]


def acceptance(rows: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    """The bar of issue 3, checked on the table: (criterion, passed, the numbers)."""
    by = {r["mode"]: r for r in rows}
    if not all(m in by for m in MODES):
        return []
    am, sa, so = by["am_adapter"], by["sa_aug"], by["structure_only"]
    out = []
    if am["class_de2000"] is not None and sa["class_de2000"]:
        gain = 1.0 - am["class_de2000"] / sa["class_de2000"]
        out.append(("am_adapter beats sa_aug on per-class colour error by >= 25%", gain >= 0.25,
                     f"{am['class_de2000']:.2f} vs {sa['class_de2000']:.2f} ({100 * gain:+.1f}% lower)"))
    ca, cs = am["controllability"], sa["controllability"]
    out.append(("am_adapter beats sa_aug on controllability", ca is not None and cs is not None and ca > cs,
                 f"{ca} vs {cs}"))
    out.append(("am_adapter mIoU within 2 points of structure_only or better", am["miou"] >= so["miou"] - 2.0,
                 f"{am['miou']:.2f} vs {so['miou']:.2f}"))
    return out
