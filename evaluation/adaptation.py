"""The domain adaptation test (``amgen eval adapt``): does amgen data lift a segmenter on a domain
it has only a handful of images of?

Labelled day scenes, a bank of a few labelled night scenes, and amgen's night renderings of the
day layouts (made by the caller with a real pipeline run whose exemplars are the bank). Segmenters
of the judge's architecture, the same steps and settings for every arm, are trained on:

- ``a_day``: the day scenes;
- ``b_day_bank``: the day scenes plus the bank, repeated so both halves weigh the same;
- ``c_amgen``: (b) plus the amgen renderings;
- ``d_fda`` / ``d_histogram`` / ``d_pda``: (b) plus the day images restyled by albumentations'
  FDA, HistogramMatching or PixelDistributionAdaptation, the bank images as references;
- ``e_night_real``: the day scenes plus as many real labelled night scenes (an upper bound);
- ``<amgen arm>+<d arm>`` (asked for by name, e.g. ``c_amgen_gate0.35+d_pda``): an amgen arm with
  a baseline's restyled day images on top, the classical trick and amgen stacked as a user would,

and scored (mIoU) on held-out night and day scenes. ``mix``: ``uniform`` (every sample of an arm
drawn alike, so each added set lowers the day scenes' share) or ``balanced`` ((b)'s rule for every
arm: the day scenes weigh as much as all the other parts together, repeated as needed), which
tells what added samples do from what a smaller day share does. The caller passes every set in
(:class:`AdaptationData`); this module only composes the arms, trains and scores.
"""
from __future__ import annotations

import multiprocessing
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from evaluation.judge import per_class_table
from evaluation.segmenter_train import ConcatSource, SegmenterTrainConfig, evaluate_segmenter, train_segmenter

# Toy-town tree seeds of the experiment (``toytown.make_tree(seed=...)``: scene i draws from
# SeedSequence([STREAM_TREE, seed, i])). Each set has its own seed; none is used by another tree
# in amgen, and the training streams of the bundled model (default_rng([seed, salt, step, rank, i]))
# and of the judge (default_rng(50_000_000 + i), default_rng(60_000_000 + i)) are other seed words.
ADAPT_TREE_SEEDS = {
    "day_train": 11_000_001,   # the labelled source (day)
    "night_bank": 11_000_002,  # the target-domain bank (night): amgen's exemplars, the baselines' references
    "night_test": 11_000_003,  # held-out night test scenes
    "day_test": 11_000_004,    # held-out day test scenes (is anything forgotten?)
    "night_real": 11_000_005,  # real labelled night scenes of the upper bound (e)
}

MIXES = ("uniform", "balanced")
ARMS = ("a_day", "b_day_bank", "c_amgen", "d_fda", "d_histogram", "d_pda", "e_night_real")
BASELINES = {"d_fda": "FDA", "d_histogram": "HistogramMatching", "d_pda": "PixelDistributionAdaptation"}
# The classes of the layout's objects (issue 21): reported one by one beside the bars; the rest as one mean.
OBJECT_CLASSES = ("car", "truck", "bus", "person", "rider")


def gated_arm(threshold: float, metric: str = "judge_miou", trusted: bool = False) -> str:
    """The name of arm (c) with the quality gate at ``threshold`` (0..1) of ``metric``
    (stages.gate.METRICS), trained on ``label_trusted`` when ``trusted``: c_amgen_gate0.3,
    c_amgen_gate_thing0.3, c_amgen_gate0.3_trusted."""
    return f"c_amgen_gate{'_thing' if metric == 'judge_thing_miou' else ''}{threshold:g}{'_trusted' if trusted else ''}"


def arm_order(gated_arms: Sequence[str] = (), stacked_arms: Sequence[str] = ()) -> tuple[str, ...]:
    """Every arm in report order: the gated (c) arms right after (c), the stacked ones after the baselines."""
    at, after_d = ARMS.index("c_amgen") + 1, ARMS.index("d_pda") + 1
    return ARMS[:at] + tuple(gated_arms) + ARMS[at:after_d] + tuple(stacked_arms) + ARMS[after_d:]


class SampleList:
    """(image, label) pairs in memory as a finite sample source; ``domain`` says where they come from."""

    def __init__(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]], name: str, domain: str):
        self.pairs = list(pairs)
        self.size = len(self.pairs)
        self.name, self.domain = name, domain

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.pairs[i]


class Repeated:
    """A sample source repeated ``times`` times, or cycled to ``size`` draws (then the first
    ``size % base.size`` samples come once more): the bank oversampled to the day set's weight,
    the day set to the weight of an arm's other parts."""

    def __init__(self, base: SampleList, times: int = 1, size: int | None = None):
        size = base.size * times if size is None else size
        if not base.size or size < base.size:
            raise ValueError(f"Repeated: {base.name} must be non-empty and repeated at least once")
        self.base, self.size = base, size
        self.times = size // base.size if size % base.size == 0 else round(size / base.size, 2)
        self.name, self.domain = base.name, base.domain

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.base[i % self.base.size]


@dataclass
class AdaptationData:
    day: SampleList          # labelled source, day
    bank: SampleList         # the few labelled night scenes
    amgen: SampleList        # amgen's night renderings of the day layouts
    night_real: SampleList   # real labelled night scenes (upper bound)
    night_test: SampleList
    day_test: SampleList
    amgen_exemplar_ids: Sequence[str] = ()  # exemplar id of every amgen sample
    bank_ids: Sequence[str] = ()            # layout ids of the bank
    # gated arm (gated_arm) -> what the quality gate kept of amgen's renderings there
    amgen_gated: dict[str, SampleList] = field(default_factory=dict)


class ExemplarOriginError(ValueError):
    """An amgen sample whose exemplar is not one of the night bank's scenes."""


def check_exemplars(exemplar_ids: Sequence[str], bank_ids: Sequence[str], where: str = "amgen output") -> None:
    bank = set(bank_ids)
    strays = sorted({e for e in exemplar_ids if e not in bank})
    if not exemplar_ids or strays:
        raise ExemplarOriginError(f"{where}: exemplars must all come from the night bank ({len(bank)} scenes); "
                                  f"{len(strays)} others found: {strays[:5]}" if strays else
                                  f"{where}: no exemplar ids recorded")


def restyle(images: Sequence[np.ndarray], references: Sequence[np.ndarray], baseline: str, seed: int = 0) -> list[np.ndarray]:
    """``images`` restyled by an albumentations domain-adaptation transform (``FDA``,
    ``HistogramMatching``, ``PixelDistributionAdaptation``) with ``references`` as its reference
    images; always applied (p=1), one seeded draw per image."""
    import albumentations as A

    if baseline not in BASELINES.values():
        raise ValueError(f"unknown baseline {baseline!r}; expected one of {', '.join(BASELINES.values())}")
    refs = [np.ascontiguousarray(r) for r in references]
    if not refs:
        raise ValueError(f"{baseline}: no reference images")
    # The references go in as metadata (the constructor's reference_images is deprecated in 2.x);
    # the transform draws one of them per image.
    transform = getattr(A, baseline)(metadata_key="night_references", p=1.0)
    pipeline = A.Compose([transform], seed=seed)
    return [pipeline(image=np.ascontiguousarray(img), night_references=refs)["image"] for img in images]


def baseline_sets(data: AdaptationData, seed: int = 0) -> dict[str, SampleList]:
    """The day scenes restyled by each baseline, labels unchanged."""
    images = [img for img, _ in data.day.pairs]
    references = [img for img, _ in data.bank.pairs]
    out = {}
    for arm, name in BASELINES.items():
        styled = restyle(images, references, name, seed)
        out[arm] = SampleList(list(zip(styled, (lab for _, lab in data.day.pairs))), name=f"day restyled by {name}",
                              domain="night (restyled day)")
    return out


def check_mix(mix: str) -> None:
    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}; the mixes are {', '.join(MIXES)}")


def balance(parts: list) -> list:
    """(b)'s rule for any arm: the day scenes (the first part) weigh at least as much as the
    other parts together, repeated to their size where they weigh less."""
    rest = sum(p.size for p in parts[1:])
    return [Repeated(parts[0], size=rest), *parts[1:]] if rest > parts[0].size else parts


def arm_parts(data: AdaptationData, baselines: dict[str, SampleList], only: Sequence[str] | None = None,
              mix: str = "uniform") -> dict[str, list]:
    """Each arm's training parts, in order (sample sources with ``name``, ``domain``, ``size``);
    ``only``: these arms (report order kept), else all; ``mix``: one of MIXES (module doc)."""
    check_mix(mix)
    times = max(1, round(data.day.size / max(1, data.bank.size)))
    bank = Repeated(data.bank, times)
    b = [data.day, bank]
    parts = {"a_day": [data.day], "b_day_bank": b, "c_amgen": b + [data.amgen]}
    for arm, kept in data.amgen_gated.items():
        parts[arm] = b + [kept]
    for arm in BASELINES:
        parts[arm] = b + [baselines[arm]]
    parts["e_night_real"] = [data.day, data.night_real]
    stacked = {arm: arm.partition("+")[::2] for arm in dict.fromkeys(only or ()) if "+" in arm}
    for arm, (amgen, baseline) in stacked.items():
        if not amgen.startswith("c_amgen") or amgen not in parts or baseline not in BASELINES:
            raise ValueError(f"unknown stacked arm {arm!r}: expected <amgen arm>+<baseline arm>, such as "
                             f"c_amgen+d_pda (amgen arms: {', '.join(['c_amgen', *data.amgen_gated])}; "
                             f"baselines: {', '.join(BASELINES)})")
        parts[arm] = parts[amgen] + [baselines[baseline]]
    amgen_order, d_order = arm_order(list(data.amgen_gated)), list(BASELINES)
    order = arm_order(list(data.amgen_gated), sorted(
        stacked, key=lambda a: (amgen_order.index(stacked[a][0]), d_order.index(stacked[a][1]))))
    unknown = sorted(set(only or ()) - set(order))
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; the arms are {', '.join(order)}")
    chosen = {arm: parts[arm] for arm in order if only is None or arm in only}
    return {arm: balance(p) for arm, p in chosen.items()} if mix == "balanced" else chosen


def describe(parts: list) -> list[dict[str, Any]]:
    return [{"name": p.name, "domain": p.domain, "samples": p.size,
             **({"distinct": p.base.size, "repeats": p.times} if isinstance(p, Repeated) else {})} for p in parts]


# Each worker process gets the arms once (pool initializer), rather than the images per job.
_SHARED: dict[str, Any] = {}


def _init_worker(shared: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(1)  # one core per segmenter; `workers` of them share the machine
    _SHARED.update(shared)


def _train_one(job: tuple[str, int]) -> dict[str, Any]:
    arm, seed = job
    parts, cfg, run_dir, test_n = _SHARED["parts"][arm], _SHARED["cfg"], _SHARED["run_dir"], _SHARED["test_n"]
    cfg = SegmenterTrainConfig(**{**asdict(cfg), "seed": seed})
    t0 = time.time()
    # An amgen arm's folder names its amgen run's setting: a work dir with runs of several
    # settings never resumes one setting's segmenter on another's data.
    tag = _SHARED.get("amgen_tag", "") if arm.startswith("c_") else ""
    # A balanced arm whose day scenes were repeated is another training set: a folder of its own.
    tag += "_balanced" if isinstance(parts[0], Repeated) else ""
    model = train_segmenter(ConcatSource(*parts), Path(run_dir) / f"{arm}{tag}-seed{seed}", cfg, log=lambda _: None)
    night = evaluate_segmenter(model, _SHARED["night_test"], test_n["night"])
    day = evaluate_segmenter(model, _SHARED["day_test"], test_n["day"])
    return {"arm": arm, "seed": seed, "night_miou": round(100 * night.miou(), 2), "day_miou": round(100 * day.miou(), 2),
            "night_iou_per_class": {c: round(100 * v, 2) for c, v in per_class_table(night.per_class()).items()},
            "training": model.training_record, "seconds": round(time.time() - t0, 1)}


def spread(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, float)
    return {"mean": round(float(v.mean()), 2), "std": round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 2),
            "min": round(float(v.min()), 2), "max": round(float(v.max()), 2)}


def object_classes(per_class: dict[str, float]) -> dict[str, float | None]:
    """The layout's object classes one by one (None: absent from the test scenes) and ``rest``,
    the mean IoU of every other class present."""
    out: dict[str, float | None] = {c: per_class.get(c) for c in OBJECT_CLASSES}
    rest = [v for c, v in per_class.items() if c not in OBJECT_CLASSES]
    out["rest"] = round(float(np.mean(rest)), 2) if rest else None
    return out


def _figures(night: dict[str, float], day: dict[str, float], arm: str) -> dict[str, Any]:
    """An amgen arm against (b), the best baseline present and (e); absent arms give no figure."""
    out: dict[str, Any] = {}
    if "b_day_bank" in night:
        out["gain_vs_b"] = round(night[arm] - night["b_day_bank"], 2)
        out["day_drop_vs_b"] = round(day["b_day_bank"] - day[arm], 2)
    present = [a for a in BASELINES if a in night]
    if present:
        best_d = max(present, key=lambda a: night[a])
        out["best_baseline"] = best_d
        out["gain_vs_best_baseline"] = round(night[arm] - night[best_d], 2)
    _, _, stacked_on = arm.partition("+")
    if stacked_on in night:  # what amgen adds on top of the classical trick it is stacked on
        out["gain_vs_own_baseline"] = round(night[arm] - night[stacked_on], 2)
        out["day_drop_vs_own_baseline"] = round(day[stacked_on] - day[arm], 2)
    if "a_day" in night:
        out["day_drop"] = round(day["a_day"] - day[arm], 2)
    if "e_night_real" in night:
        out["gap_to_e"] = round(night["e_night_real"] - night[arm], 2)
    return out


def paired(rows: list[dict[str, Any]], arm: str, other: str, key: str) -> dict[str, Any] | None:
    """``arm`` minus ``other`` on ``key`` (night_miou, day_miou), seed by seed where both ran:
    mean, standard error of the mean (n > 1), min, max and the seeds. Arms share a seed's
    initialisation and batch order, so the paired differences are what tells arms apart."""
    mine = {r["seed"]: r[key] for r in rows if r["arm"] == arm}
    theirs = {r["seed"]: r[key] for r in rows if r["arm"] == other}
    seeds = sorted(mine.keys() & theirs.keys())
    if not seeds:
        return None
    d = np.array([mine[s] - theirs[s] for s in seeds], float)
    se = round(float(d.std(ddof=1) / np.sqrt(len(d))), 2) if len(d) > 1 else None
    return {"mean": round(float(d.mean()), 2), "se": se, "min": round(float(d.min()), 2),
            "max": round(float(d.max()), 2), "seeds": seeds}


def _paired_figures(rows: list[dict[str, Any]], arm: str, f: dict[str, Any]) -> dict[str, Any]:
    """The bars' comparisons seed by seed: night and day against (b), night against the best baseline."""
    pairs = {"night_vs_b": ("b_day_bank", "night_miou"), "day_vs_b": ("b_day_bank", "day_miou")}
    if "best_baseline" in f:
        pairs["night_vs_best_baseline"] = (f["best_baseline"], "night_miou")
    out = {name: paired(rows, arm, other, key) for name, (other, key) in pairs.items()}
    return {name: v for name, v in out.items() if v is not None}


def _verdicts(f: dict[str, Any]) -> dict[str, bool]:
    """Issue 21's bars: (c) >= (b) + 10 and >= the best baseline + 3 night mIoU, at most 2 day mIoU below (b)."""
    bars = {"c_ge_b_plus_10": ("gain_vs_b", lambda v: v >= 10), "c_ge_best_d_plus_3": ("gain_vs_best_baseline", lambda v: v >= 3),
            "c_day_within_2_of_b": ("day_drop_vs_b", lambda v: v <= 2)}
    return {name: ok(f[key]) for name, (key, ok) in bars.items() if key in f}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-arm mean and spread, the mean per-class night IoU (and the object classes apart), the
    training steps each arm took, and the acceptance figures of (c) and of every gated (c)."""
    arms: dict[str, Any] = {}
    names = list(dict.fromkeys(r["arm"] for r in rows))
    for arm in names:
        mine = [r for r in rows if r["arm"] == arm]
        classes = sorted({c for r in mine for c in r["night_iou_per_class"]})
        per_class = {c: round(float(np.nanmean([r["night_iou_per_class"].get(c, np.nan) for r in mine])), 2)
                     for c in classes}
        arms[arm] = {"night": spread([r["night_miou"] for r in mine]), "day": spread([r["day_miou"] for r in mine]),
                     "seeds": [r["seed"] for r in mine], "night_iou_per_class": per_class,
                     "night_objects": object_classes(per_class),
                     "steps": [r.get("training", {}).get("steps") for r in mine]}
    night = {a: v["night"]["mean"] for a, v in arms.items()}
    day = {a: v["day"]["mean"] for a, v in arms.items()}
    out: dict[str, Any] = {"arms": arms}

    def judged(arm: str) -> dict[str, Any]:
        f = _figures(night, day, arm)
        return {**f, "verdicts": _verdicts(f), "paired": _paired_figures(rows, arm, f)}

    if "c_amgen" in arms:
        out.update(judged("c_amgen"))
    for key, mine in (("gated", [a for a in arms if a.startswith("c_amgen_gate") and "+" not in a]),
                      ("stacked", [a for a in arms if "+" in a])):
        if mine:
            out[key] = {a: judged(a) for a in mine}
    return out


def run_adaptation(data: AdaptationData, cfg: SegmenterTrainConfig, seeds: Sequence[int], run_dir: str | Path,
                   test_n: dict[str, int] | None = None, workers: int = 1, baseline_seed: int = 0,
                   log: Callable[[str], None] = print, arms: Sequence[str] | None = None,
                   amgen_tag: str = "", mix: str = "uniform") -> dict[str, Any]:
    """Train every arm (or those of ``arms``) with every seed (``workers`` processes) and score
    it. Returns the rows ({arm, seed, night_miou, day_miou, ...}), each arm's training parts and
    the summary. ``amgen_tag``: added to the amgen arms' folder names (their run's setting);
    ``mix``: how an arm's parts are weighed (MIXES)."""
    check_exemplars(data.amgen_exemplar_ids, data.bank_ids)
    test_n = test_n or {"night": data.night_test.size, "day": data.day_test.size}
    t0 = time.time()
    baselines = baseline_sets(data, baseline_seed)
    log(f"baselines: {data.day.size} day images restyled by {', '.join(BASELINES.values())} "
        f"({time.time() - t0:.1f} s)")
    parts = arm_parts(data, baselines, arms, mix)
    _SHARED.update(parts=parts, cfg=cfg, run_dir=str(run_dir), amgen_tag=amgen_tag, test_n=test_n,
                   night_test=data.night_test, day_test=data.day_test)
    jobs = [(arm, seed) for arm in parts for seed in seeds]
    rows: list[dict[str, Any]] = []

    def done(row: dict[str, Any]) -> None:
        rows.append(row)
        log(f"[{len(rows)}/{len(jobs)}] {row['arm']} seed {row['seed']}: night mIoU {row['night_miou']:.2f} "
            f"day mIoU {row['day_miou']:.2f} ({row['seconds']} s)")

    for arm in parts:
        log(f"arm {arm}: " + " + ".join(f"{p['samples']} {p['name']}" for p in describe(parts[arm])))
    try:
        if workers <= 1:
            for job in jobs:
                done(_train_one(job))
        else:
            # spawn, not fork: a fork after torch's thread pool (or Ray) has run can deadlock the child.
            with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker,
                                                             initargs=(dict(_SHARED),)) as pool:
                for row in pool.imap_unordered(_train_one, jobs):
                    done(row)
    finally:
        _SHARED.clear()
    order = list(parts)
    rows.sort(key=lambda r: (order.index(r["arm"]), r["seed"]))
    return {"rows": rows, "arms": {arm: describe(p) for arm, p in parts.items()}, "mix": mix, "summary": summarize(rows),
            "train_config": asdict(cfg), "test_n": test_n, "train_seconds": round(time.time() - t0, 1)}


def table(summary: dict[str, Any]) -> str:
    """The result as a markdown table: mean ± std (min..max) per arm, night and day, and beside
    them the night IoU of the layout's object classes and the mean of the rest (mean over seeds)."""
    head = ["arm", "night mIoU", "day mIoU", *(f"night {c}" for c in OBJECT_CLASSES), "night rest", "steps"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    cell = lambda s: f"{s['mean']:.2f} ± {s['std']:.2f} ({s['min']:.2f}..{s['max']:.2f})"  # noqa: E731
    for arm, v in summary["arms"].items():
        objects = v.get("night_objects") or object_classes(v["night_iou_per_class"])
        per = ["-" if objects[c] is None else f"{objects[c]:.1f}" for c in (*OBJECT_CLASSES, "rest")]
        steps = ", ".join(str(n) for n in v.get("steps", []) if n is not None) or "-"
        lines.append(f"| {arm} | {cell(v['night'])} | {cell(v['day'])} | " + " | ".join(per) + f" | {steps} |")
    return "\n".join(lines)


FIGURE_NAMES = {"gain_vs_b": "gain vs (b)", "gain_vs_best_baseline": "vs best baseline", "day_drop_vs_b": "day drop vs (b)",
                "gain_vs_own_baseline": "vs its own baseline", "day_drop_vs_own_baseline": "day drop vs it",
                "day_drop": "day drop vs (a)", "gap_to_e": "gap to (e)"}
# The figures whose seed-by-seed standard error is in ``paired``.
_PAIRED_KEY = {"gain_vs_b": "night_vs_b", "day_drop_vs_b": "day_vs_b", "gain_vs_best_baseline": "night_vs_best_baseline"}


def figure_lines(summary: dict[str, Any]) -> list[str]:
    """One line per amgen arm: its figures against the other arms, with the paired standard error."""
    lines = []
    for arm, f in [("c_amgen", summary), *summary.get("gated", {}).items(), *summary.get("stacked", {}).items()]:
        parts = []
        for key, label in FIGURE_NAMES.items():
            if key not in f:
                continue
            text = f"{label} {f[key]:+.2f}" + (f" ({f['best_baseline']})" if key == "gain_vs_best_baseline" else "")
            p = f.get("paired", {}).get(_PAIRED_KEY.get(key, ""))
            parts.append(text + (f" (paired SE {p['se']:.2f}, {len(p['seeds'])} seeds)" if p and p["se"] is not None else ""))
        if parts:
            lines.append(f"{arm}: " + " | ".join(parts))
    return lines


def comparison_picture(data: AdaptationData, day_ids: Sequence[str], amgen_target_ids: Sequence[str], rows: int = 4,
                       scale: int = 2, seed: int = 0) -> np.ndarray:
    """One row per amgen sample: day image | its night exemplar | amgen output | FDA output |
    HistogramMatching output (the baselines as the arms used them: same references, same seed)."""
    day_at = {d: i for i, d in enumerate(day_ids)}
    bank_at = {b: i for i, b in enumerate(data.bank_ids)}
    tiles = []
    for j in range(min(rows, data.amgen.size)):
        day_img = data.day[day_at[amgen_target_ids[j]]][0]
        exemplar = data.bank[bank_at[data.amgen_exemplar_ids[j]]][0]
        references = [img for img, _ in data.bank.pairs]
        fda, hist = (restyle([day_img], references, name, seed + j)[0] for name in ("FDA", "HistogramMatching"))
        sep = np.full((day_img.shape[0], 2, 3), 255, np.uint8)
        cells = [day_img, exemplar, data.amgen[j][0], fda, hist]
        tiles.append(np.concatenate([x for c in cells for x in (c, sep)][:-1], axis=1))
        tiles.append(np.full((2, tiles[-1].shape[1], 3), 255, np.uint8))
    grid = np.concatenate(tiles[:-1], axis=0)
    return grid.repeat(scale, 0).repeat(scale, 1)


def per_class_markdown(summary: dict[str, Any]) -> str:
    """Night-test IoU per class (mean over seeds), one column per arm."""
    arms = list(summary["arms"])
    classes = sorted({c for v in summary["arms"].values() for c in v["night_iou_per_class"]})
    lines = ["| class | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for c in classes:
        cells = [summary["arms"][a]["night_iou_per_class"].get(c) for a in arms]
        lines.append(f"| {c} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in cells) + " |")
    return "\n".join(lines)
