"""``amgen eval``: the quality benchmark, the judge segmenter, the downstream segmentation test and
the domain adaptation test (``amgen eval adapt``, whose data and amgen run are made here)."""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional

import typer

from evaluation.quality import QUALITY_SEED, QualitySettings
from evaluation.runner import DEFAULT_MODEL_DIR, RANDOM_TOY
from evaluation.segmenter import DEFAULT_DIR as SEGMENTER_DIR

# the amgen run of `eval adapt` samples as the demo does (configs/toytown_demo.yaml)
DEMO_STEPS, DEMO_GUIDANCE = QualitySettings.num_inference_steps, QualitySettings.guidance_scale

eval_app = typer.Typer(no_args_is_help=True, help="Quality benchmark and downstream tests on toy-town ground truth.")


@eval_app.command("train-segmenter")
def train_segmenter_cmd(
    steps: int = typer.Option(700, help="optimizer steps"),
    batch_size: int = typer.Option(16),
    lr: float = typer.Option(3e-3),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, help="torch threads (the CPU is shared)"),
    class_balance: float = typer.Option(0.5, help="loss weight exponent on (median freq / class freq); 0 = plain CE"),
    run_dir: Path = typer.Option(Path("runs/segmenter"), help="checkpoint + log.jsonl; rerun to resume"),
    out: Path = typer.Option(SEGMENTER_DIR, help="where the trained judge is saved"),
    heldout_n: int = typer.Option(500, help="held-out scenes for its own mIoU"),
) -> None:
    """Train the judge segmenter on real toy-town renderings and report its held-out mIoU."""
    from evaluation.judge import train_judge
    from evaluation.segmenter_train import (SEGMENTER_HELDOUT_SEED_BASE, SEGMENTER_TRAIN_SEED_BASE,
                                            SegmenterTrainConfig, ToyTownScenes)

    cfg = SegmenterTrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, threads=threads,
                               class_balance=class_balance)
    about = {
        "data": "toy-town real renderings, layouts and appearances over all domains, made on the fly",
        "train_scenes": f"np.random.default_rng({SEGMENTER_TRAIN_SEED_BASE} + i), i in [0, {steps * batch_size})",
        "heldout_scenes": f"np.random.default_rng({SEGMENTER_HELDOUT_SEED_BASE} + i), i in [0, {heldout_n})",
    }
    train_judge(cfg, ToyTownScenes(SEGMENTER_TRAIN_SEED_BASE), ToyTownScenes(SEGMENTER_HELDOUT_SEED_BASE),
                run_dir, out, heldout_n=heldout_n, log=typer.echo, about=about)


@eval_app.command("quality")
def quality_cmd(
    n: int = typer.Option(200, "--n", min=1, help="held-out ground-truth triples"),
    json_file: Optional[Path] = typer.Option(None, "--json", help="write the rows as JSON here"),
    model: str = typer.Option(str(DEFAULT_MODEL_DIR), "--model", help=f"model folder, or {RANDOM_TOY!r}"),
    steps: int = typer.Option(QualitySettings.num_inference_steps, "--steps", min=1, help="DDIM steps"),
    guidance: float = typer.Option(QualitySettings.guidance_scale, "--guidance", help="classifier-free guidance"),
    seed: int = typer.Option(QUALITY_SEED, "--seed", min=0, help="toy-town triple seed (held out from training)"),
    segmenter: Path = typer.Option(SEGMENTER_DIR, "--segmenter", help="judge segmenter folder"),
    docs: Optional[Path] = typer.Option(None, "--docs", help="also write quality.md/.png/.json into this folder"),
    threads: int = typer.Option(1, "--threads", min=1, help="torch threads (the CPU is shared)"),
) -> None:
    """Score structure_only, sa_aug and am_adapter (and the ground-truth ceiling) on toy-town triples."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from evaluation.report import acceptance_section, table
    from evaluation.runner import ModelNotFoundError, json_line, run_benchmark
    from evaluation.segmenter import SegmenterFileError

    settings = QualitySettings(n=n, seed=seed, num_inference_steps=steps, guidance_scale=guidance)
    console = Console(stderr=True)
    with Progress(TextColumn("quality"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("triples", total=n)
        try:
            report = run_benchmark(settings, model, segmenter, json_path=json_file, docs_dir=docs, threads=threads,
                                   command=f"amgen eval quality --n {n} --steps {steps} --guidance {guidance}",
                                   progress=lambda done, total: bar.update(task, completed=done))
        except (ModelNotFoundError, SegmenterFileError) as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2)
    typer.echo(table(report.rows))
    typer.echo(acceptance_section(report.rows, report.comparisons))
    t = report.timings
    typer.echo(f"{n} triples x {len(settings.modes)} modes in {t['total_s']} s "
              f"({t['per_triple_all_modes_s']} s per triple generating); "
              f"outputs: {json_file or '-'}{', ' + str(docs) if docs else ''}")
    typer.echo(json_line(report))


PLATEAU_HELP = ("segmenter steps, the same for every arm; without it each arm trains until its loss plateaus "
                "(EMA of the loss, span --plateau-window, falls less than --plateau-min-improvement over a window: "
                "lr x0.3, twice; the third plateau stops it), at most --max-steps")


def downstream_train_config(steps: int | None, max_steps: int, window: int, min_improvement: float, batch_size: int,
                            seed: int = 0, threads: int = 1):
    """The downstream tests' segmenter recipe (the judge's: lr 3e-3, class balance 0.5): ``steps``
    fixed steps, or (None) until the loss plateaus (evaluation/plateau.py)."""
    from evaluation.segmenter_train import SegmenterTrainConfig

    if steps is not None:
        return SegmenterTrainConfig(steps=steps, batch_size=batch_size, lr=3e-3, seed=seed, threads=threads,
                                    class_balance=0.5, checkpoint_every=max(1, min(100, steps)))
    return SegmenterTrainConfig(batch_size=batch_size, lr=3e-3, seed=seed, threads=threads, class_balance=0.5,
                                until_plateau=True, max_steps=max_steps, plateau_window=window,
                                plateau_min_improvement=min_improvement, checkpoint_every=100)


@eval_app.command("segmenter")
def segmenter_cmd(
    dataset: Path = typer.Option(..., "--dataset", help="an amgen output folder (or its data/ Parquet shards)"),
    real_n: int = typer.Option(200, "--real-n", min=1, help="real toy-town training scenes"),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help=PLATEAU_HELP),
    max_steps: int = typer.Option(3000, "--max-steps", min=1, help="cap of a plateau run"),
    plateau_window: int = typer.Option(100, "--plateau-window", min=2),
    plateau_min_improvement: float = typer.Option(0.02, "--plateau-min-improvement", min=0.0),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    heldout_n: int = typer.Option(300, "--heldout-n", min=1, help="held-out real scenes to score on"),
    seed: int = typer.Option(0, "--seed"),
    run_dir: Path = typer.Option(Path("runs/downstream"), "--run-dir", help="checkpoints; rerun to resume"),
    json_file: Optional[Path] = typer.Option(None, "--json", help="write the result here"),
    threads: int = typer.Option(1, "--threads", min=1),
    label_column: Optional[str] = typer.Option(
        None, "--label-column", help="the dataset's label column to train on (default: label_trusted where the "
                                     "dataset has it, gate.label_trusted; else label)"),
    save_real_judge: Optional[Path] = typer.Option(
        None, "--save-real-judge", help="also save the real-only segmenter here, as a score.segmenter folder "
                                        "(a judge that has seen only the real data)"),
) -> None:
    """Downstream test: a segmenter trained on real toy-town only vs real + an amgen dataset, same
    training rule and seed, both scored (mIoU) on held-out real toy-town scenes."""
    import json

    from connectors.parquet_source import ParquetSource
    from evaluation.downstream import LayoutSamples, run_downstream
    from evaluation.segmenter_train import SEGMENTER_HELDOUT_SEED_BASE, SEGMENTER_TRAIN_SEED_BASE, ToyTownScenes

    height, width = 64, 128  # toy-town's frame, which the amgen dataset must match
    cfg = downstream_train_config(steps, max_steps, plateau_window, plateau_min_improvement, batch_size, seed, threads)
    about = {"dataset": str(dataset),
             "real_scenes": f"default_rng({SEGMENTER_TRAIN_SEED_BASE} + i), i < {real_n}",
             "heldout_scenes": f"default_rng({SEGMENTER_HELDOUT_SEED_BASE} + i), i < {heldout_n}"}
    try:
        column = label_column or trained_label_column(dataset)
        about["label_column"] = column
        typer.echo(f"training on the dataset's {column!r} column")
        synthetic = LayoutSamples(ParquetSource(dataset, label_column=column), (height, width), name=str(dataset))
        real = ToyTownScenes(SEGMENTER_TRAIN_SEED_BASE, height, width, limit=real_n)
        heldout = ToyTownScenes(SEGMENTER_HELDOUT_SEED_BASE, height, width)
        result = run_downstream(real, synthetic, heldout, run_dir, cfg, heldout_n=heldout_n, log=typer.echo,
                                about=about, save_real_only=save_real_judge)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    if json_file is not None:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(json.dumps(result, indent=2) + "\n")
    typer.echo(f"held-out mIoU on {heldout_n} real scenes: real only ({real_n}) {result['real_only']['miou']:.2f}% | "
               f"real + {result['n_synthetic']} amgen samples {result['real_plus_synthetic']['miou']:.2f}% "
               f"(delta {result['delta_miou']:+.2f}); steps {result['real_only']['training']['steps']} / "
               f"{result['real_plus_synthetic']['training']['steps']}; checkpoints in {run_dir}")
    typer.echo(json.dumps({k: result[k] for k in ("n_real", "n_synthetic", "delta_miou")} |
                          {k: result[k]["miou"] for k in ("real_only", "real_plus_synthetic")}))


def trained_label_column(dataset: Path) -> str:
    """``label_trusted`` where the dataset's first shard has it (a gate.label_trusted run), else ``label``."""
    import pyarrow.parquet as pq

    from connectors.parquet_sink import TRUSTED_LABEL
    from connectors.parquet_source import parquet_files

    return TRUSTED_LABEL if TRUSTED_LABEL in pq.read_schema(parquet_files(dataset)[0]).names else "label"


# ----------------------------------------------------------------------------- amgen eval adapt
ADAPT_TREES = {  # set -> (toy-town domain, city prefix: the prefix makes every set's layout ids distinct)
    "day_train": ("day", "adaptday"), "night_bank": ("night", "adaptbank"), "night_test": ("night", "adapttest"),
    "day_test": ("day", "adaptdaytest"), "night_real": ("night", "adaptnight"),
}


@dataclass
class AdaptSizes:
    day_n: int = 500        # labelled day scenes (the source amgen renders)
    bank_n: int = 10        # labelled night scenes: the exemplar index and the baselines' references
    test_n: int = 300       # held-out night scenes, and as many day scenes
    night_real_n: int = 500  # real night scenes of the upper bound (e)


def adapt_trees(work: Path, sizes: AdaptSizes, log: Callable[[str], None] = print) -> dict[str, Path]:
    """The experiment's toy-town trees under ``work/trees`` (made once; same seeds -> same bytes)."""
    from evaluation.adaptation import ADAPT_TREE_SEEDS
    from toytown import make_tree

    counts = {"day_train": sizes.day_n, "night_bank": sizes.bank_n, "night_test": sizes.test_n,
              "day_test": sizes.test_n, "night_real": sizes.night_real_n}
    roots = {}
    for name, (domain, prefix) in ADAPT_TREES.items():
        root = roots[name] = work / "trees" / name
        want = {"seed": ADAPT_TREE_SEEDS[name], "n": counts[name], "domain": domain, "start": 0}
        made = root / "toytown_train.json"
        if made.is_file() and all(json.loads(made.read_text()).get(k) == v for k, v in want.items()):
            continue
        if root.exists():
            shutil.rmtree(root)  # a tree of other sizes: make it again, whole
        log(f"making {counts[name]} {domain} scenes ({name}, seed {ADAPT_TREE_SEEDS[name]}) in {root}")
        make_tree(root, counts[name], seed=ADAPT_TREE_SEEDS[name], domain=domain, city_prefix=prefix)
    return roots


def adapt_run_config(day_root: Path, bank_root: Path, out: Path, model: str = "toy", model_steps: int = DEMO_STEPS,
                     guidance: float = DEMO_GUIDANCE, ray_cpus: int = 2, per_layout: int = 1):
    """The amgen run of arm (c): the day tree as targets, the night bank as the exemplar index
    (filtered to night), no augmentation (the renderings keep the day layouts), ``per_layout``
    samples per layout (each with its own exemplar)."""
    from pipeline.config import config_from_dict

    tree = {
        "name": "eval-adapt-night", "seed": 0,
        "source": {"kind": "toytown", "root": str(day_root)},
        "exemplars": {"source": {"kind": "toytown", "root": str(bank_root)}, "filters": {"domain": "night"},
                      "k": per_layout, "diversity": 0.3},
        "augment": {"enabled": False},
        "model": {"path": model, "device": "cpu", "steps": model_steps, "guidance_scale": guidance},
        "synthesis": {"actors": 1, "num_cpus": 1, "torch_threads": 1, "batch_size": 8, "allow_cpu_fallback": True},
        "output": {"dir": str(out), "rows_per_shard": 64, "preview_rows": 8},
        "ray": {"num_cpus": ray_cpus},
    }
    return config_from_dict(tree, where="amgen eval adapt (arm c run config)")


def read_tree(root: Path, name: str, domain: str):
    """A toy-town tree as in-memory samples (with its layout ids, in the connector's order)."""
    from connectors.cityscapes import CityscapesSource
    from evaluation.adaptation import SampleList

    source = CityscapesSource(root)
    layouts = [source.read_item(item) for item in source.list_items()]
    for lay in layouts:
        if lay.meta.get("domain") != domain:
            raise ValueError(f"{root}: {lay.layout_id} is a {lay.meta.get('domain')!r} scene, expected {domain!r}")
    return SampleList([(lay.image, lay.label) for lay in layouts], name=name, domain=domain), \
        [lay.layout_id for lay in layouts]


def read_amgen_output(out: Path):
    """An amgen output's samples with their target and exemplar ids, in shard and row order."""
    import pyarrow.parquet as pq

    from amgen_core.image_io import decode_png
    from evaluation.adaptation import SampleList

    pairs, targets, exemplars = [], [], []
    for p in sorted((out / "data").glob("train-*.parquet")):
        for row in pq.read_table(p, columns=["sample_id", "target_id", "exemplar_id", "image", "label"]).to_pylist():
            where = f"{p} sample {row['sample_id']}"
            pairs.append((decode_png(row["image"]["bytes"], f"{where} image", "rgb"),
                          decode_png(row["label"]["bytes"], f"{where} label", "label")))
            targets.append(row["target_id"])
            exemplars.append(row["exemplar_id"])
    if not pairs:
        raise ValueError(f"{out}: the amgen run wrote no samples")
    return SampleList(pairs, name="amgen night renderings of the day layouts", domain="night (amgen)"), targets, exemplars


def gated_amgen_sets(out: Path, thresholds: list[float], log: Callable[[str], None],
                     metric: str = "judge_miou", label_trusted: bool = False,
                     judge: Path | None = None) -> tuple[dict, dict]:
    """The gated (c) arms' data: the quality gate's own stage (``stages.gate.GateScorer``, the
    judge of ``score.segmenter``'s default) run over the (c) run's samples. A run with
    ``gate.enabled`` renders the very same images (the gate changes no sample seed) and keeps
    exactly these, so each threshold costs a judge pass, not a second rendering of every layout.
    ``label_trusted``: each threshold also gives the arm trained on the kept samples'
    ``label_trusted`` (``gate.label_trusted``; name ``..._trusted``). ``judge``: another judge
    segmenter folder (``score.segmenter``), e.g. one ``amgen eval segmenter --save-real-judge`` made.
    Returns ({gated arm: SampleList}, what the gate did at each threshold, keyed as the arm)."""
    import pyarrow.parquet as pq

    from amgen_core.image_io import decode_png
    from evaluation.adaptation import SampleList, gated_arm
    from stages.gate import GateScorer, gate_reason

    # one judge pass: the score is the same at every threshold
    scorer = GateScorer(str(judge) if judge else None, 1, metric=metric, threshold=min(thresholds),
                        label_trusted=label_trusted)
    kept: dict[float, list] = {t: [] for t in thresholds}
    trusted: dict[float, list] = {t: [] for t in thresholds}
    reasons: dict[float, dict[str, int]] = {t: {} for t in thresholds}
    for p in sorted((out / "data").glob("train-*.parquet")):
        rows = pq.read_table(p, columns=["sample_id", "image", "label"]).to_pylist()
        for lo in range(0, len(rows), 32):
            part = rows[lo:lo + 32]
            batch = {"sample_id": [r["sample_id"] for r in part], "error": [""] * len(part),
                     "image": [r["image"]["bytes"] for r in part], "label": [r["label"]["bytes"] for r in part]}
            scored = scorer(batch)
            for t in thresholds:
                for j, (r, reason) in enumerate(zip(part, (gate_reason(v, t) for v in scored["gate_score"]))):
                    if reason:
                        reasons[t][reason] = reasons[t].get(reason, 0) + 1
                        continue
                    where = f"{p} sample {r['sample_id']}"
                    image = decode_png(r["image"]["bytes"], f"{where} image", "rgb")
                    kept[t].append((image, decode_png(r["label"]["bytes"], f"{where} label", "label")))
                    if label_trusted:
                        trusted[t].append((image, decode_png(scored["label_trusted"][j], f"{where} label_trusted", "label")))
    sets, record = {}, {}
    what = "judge mIoU" if metric == "judge_miou" else "judge thing-class mIoU"
    for t in sorted(thresholds):
        arm = gated_arm(t, metric)
        sets[arm] = SampleList(kept[t], name=f"amgen night renderings, {what} >= {t:g}", domain="night (amgen, gated)")
        if label_trusted:
            sets[gated_arm(t, metric, trusted=True)] = SampleList(
                trusted[t], name=f"amgen night renderings, {what} >= {t:g}, label_trusted",
                domain="night (amgen, gated, trusted pixels)")
        record[arm.removeprefix("c_amgen_gate")] = {"metric": metric, "threshold": t, "kept": len(kept[t]),
                                                   "filtered_by_reason": dict(sorted(reasons[t].items())),
                                                   "judge": str(judge) if judge else "bundled"}
        if label_trusted and kept[t]:
            labelled = sum(int((lab != 0).sum()) for _, lab in kept[t])
            share = sum(int((lab != 0).sum()) for _, lab in trusted[t]) / max(1, labelled)
            record[arm.removeprefix("c_amgen_gate")]["label_trusted_share"] = round(share, 4)
            log(f"label_trusted at {t:g}: {100 * share:.1f}% of the kept renderings' labelled pixels")
        log(f"quality gate at {what} {t:g}: {len(kept[t])} renderings kept, "
            f"filtered {dict(sorted(reasons[t].items()))}")
    return sets, record


def folder_hash(root: Path) -> str:
    """8 hex digits of a model folder's weights and configs (names and bytes); cards and
    previews do not count."""
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:8]


def model_tag(model: str) -> str:
    """"_m" and the model folder's hash: runs of two models never share a folder, and a
    retrained model in the same path (the bundled one included) gets a new one."""
    from amadapter.bundled import toy_model_dir

    return f"_m{folder_hash(toy_model_dir() if model == 'toy' else Path(model))}"


def amgen_run_dir(work: Path, model_steps: int, guidance: float, model: str = "toy", per_layout: int = 1) -> Path:
    """Arm (c)'s amgen run folder: one per model and sampling setting, so a work dir holds the
    runs of several side by side (a run folder refuses another config)."""
    tag = model_tag(model) + (f"_k{per_layout}" if per_layout > 1 else "")
    return work / f"amgen_night_s{model_steps}_g{guidance:g}{tag}"


def prepare_adaptation(work: Path, sizes: AdaptSizes, model: str = "toy", model_steps: int = DEMO_STEPS,
                       guidance: float = DEMO_GUIDANCE,
                       ray_cpus: int = 2, log: Callable[[str], None] = print, gate_thresholds: list[float] | None = None,
                       per_layout: int = 1, gate_metric: str = "judge_miou", label_trusted: bool = False,
                       judge: Path | None = None):
    """Trees, the real amgen run of arm (c) (resumed if already done), what the quality gate keeps
    of it at each of ``gate_thresholds``, and everything read back: (AdaptationData, day ids,
    amgen target ids, run summary)."""
    from evaluation.adaptation import AdaptationData
    from pipeline.run import run_pipeline

    roots = adapt_trees(work, sizes, log)
    out = amgen_run_dir(work, model_steps, guidance, model, per_layout)
    cfg = adapt_run_config(roots["day_train"], roots["night_bank"], out, model, model_steps, guidance, ray_cpus,
                           per_layout)
    log(f"amgen run: {sizes.day_n} day layouts rendered {per_layout} time(s) each with the {sizes.bank_n} night "
        f"scenes as exemplars -> {out}")
    t0 = time.time()
    summary = run_pipeline(cfg)
    run_s = time.time() - t0
    log(f"amgen run: {summary.written} samples, {summary.quarantined} quarantined ({run_s:.0f} s)")
    day, day_ids = read_tree(roots["day_train"], "day scenes", "day")
    bank, bank_ids = read_tree(roots["night_bank"], "night bank", "night")
    amgen, targets, exemplars = read_amgen_output(out)
    data = AdaptationData(
        day=day, bank=bank, amgen=amgen,
        night_real=read_tree(roots["night_real"], "real night scenes", "night")[0],
        night_test=read_tree(roots["night_test"], "night test", "night")[0],
        day_test=read_tree(roots["day_test"], "day test", "day")[0],
        amgen_exemplar_ids=exemplars, bank_ids=bank_ids)
    made = {"day_ids": day_ids, "amgen_target_ids": targets, "run_summary": summary.to_dict(), "run_seconds": round(run_s, 1),
            "run_config": cfg.model_dump(mode="json")}
    if gate_thresholds:
        data.amgen_gated, made["gate"] = gated_amgen_sets(out, list(gate_thresholds), log, gate_metric, label_trusted,
                                                          judge)
    return data, made


@eval_app.command("adapt")
def adapt_cmd(
    work_dir: Path = typer.Option(Path("runs/adapt"), "--work-dir", help="trees, the amgen run, checkpoints; rerun to resume"),
    day_n: int = typer.Option(AdaptSizes.day_n, "--day-n", min=1, help="labelled day scenes"),
    bank_n: int = typer.Option(AdaptSizes.bank_n, "--bank-n", min=1, help="labelled night scenes (exemplars, references)"),
    test_n: int = typer.Option(AdaptSizes.test_n, "--test-n", min=1, help="held-out night scenes, and as many day scenes"),
    night_real_n: int = typer.Option(AdaptSizes.night_real_n, "--night-real-n", min=1, help="real night scenes of arm (e)"),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help=PLATEAU_HELP),
    max_steps: int = typer.Option(3000, "--max-steps", min=1, help="cap of a plateau run"),
    plateau_window: int = typer.Option(100, "--plateau-window", min=2),
    plateau_min_improvement: float = typer.Option(0.02, "--plateau-min-improvement", min=0.0),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    seeds: int = typer.Option(3, "--seeds", min=1, help="segmenter seeds per arm (0..N-1)"),
    arms: Optional[str] = typer.Option(None, "--arms", help="comma-separated arms to train (default: all); "
                                       "<amgen arm>+<d arm>, such as c_amgen_gate0.35+d_pda, stacks a baseline on an amgen arm"),
    gate: List[float] = typer.Option([], "--gate", min=0.0, max=1.0,
                                     help="also arm (c) with the quality gate at this judge mIoU (repeatable)"),
    gate_metric: str = typer.Option("judge_miou", "--gate-metric",
                                    help="what --gate thresholds: judge_miou or judge_thing_miou (gate.metric)"),
    label_trusted: bool = typer.Option(False, "--label-trusted",
                                       help="also each --gate arm trained on label_trusted (gate.label_trusted): "
                                            "the pixels the judge reads as another class left out; named ..._trusted"),
    judge: Optional[Path] = typer.Option(None, "--judge", help="the gate's judge: a segmenter folder "
                                         "(score.segmenter; default the bundled one), e.g. from eval segmenter --save-real-judge"),
    mix: str = typer.Option("uniform", "--mix", help="uniform: every sample of an arm drawn alike; balanced: the "
                            "day scenes weigh as much as the arm's other parts together, as in (b)"),
    workers: int = typer.Option(2, "--workers", min=1, help="segmenters trained at once (one core each)"),
    model: str = typer.Option("toy", "--model", help="amgen model of the run (toy = the bundled one)"),
    model_steps: int = typer.Option(DEMO_STEPS, "--model-steps", min=1,
                                    help="DDIM steps of the amgen run (the demo's)"),
    guidance: float = typer.Option(DEMO_GUIDANCE, "--guidance", min=0.0,
                                   help="classifier-free guidance of the amgen run (the demo's)"),
    per_layout: int = typer.Option(1, "--per-layout", min=1,
                                   help="amgen renderings per day layout, each with its own exemplar (exemplars.k)"),
    json_file: Optional[Path] = typer.Option(None, "--json", help="write [{arm, seed, night_miou, day_miou}] here"),
    result_file: Optional[Path] = typer.Option(None, "--result", help="write the whole result (arms, per-class IoU) here"),
    picture: Optional[Path] = typer.Option(None, "--picture", help="write day | exemplar | amgen | FDA | HistogramMatching here"),
) -> None:
    """Domain adaptation test, day -> night: segmenters trained on day data (a), + 10 night scenes (b),
    + amgen's night renderings of the day layouts (c), + classical baselines (d), + 500 real night (e)."""
    cfg = downstream_train_config(steps, max_steps, plateau_window, plateau_min_improvement, batch_size)
    try:
        result = run_adapt(work_dir, AdaptSizes(day_n, bank_n, test_n, night_real_n), train=cfg, seeds=seeds,
                           workers=workers, model=model, model_steps=model_steps, guidance=guidance, picture=picture,
                           log=typer.echo, per_layout=per_layout,
                           arms=arms.split(",") if arms else None, gate_thresholds=list(gate), gate_metric=gate_metric,
                           label_trusted=label_trusted, judge=judge, mix=mix)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    if json_file is not None:
        write_json(json_file, [{k: r[k] for k in ("arm", "seed", "night_miou", "day_miou")} for r in result["rows"]])
    if result_file is not None:
        write_json(result_file, result)
    from evaluation.adaptation import figure_lines, table

    s = result["summary"]
    typer.echo(table(s))
    for line in figure_lines(s):
        typer.echo(line)
    typer.echo(f"wall {result['wall_seconds']:.0f} s")


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def run_adapt(work_dir: Path, sizes: AdaptSizes, *, steps: int | None = 300, batch_size: int = 16, seeds: int = 3,
              workers: int = 2, model: str = "toy", model_steps: int = DEMO_STEPS, guidance: float = DEMO_GUIDANCE,
              per_layout: int = 1,
              picture: Path | None = None, log: Callable[[str], None] = print, train=None, arms: list[str] | None = None,
              gate_thresholds: list[float] | None = None, gate_metric: str = "judge_miou",
              label_trusted: bool = False, judge: Path | None = None, mix: str = "uniform") -> dict:
    """The whole experiment: data, the amgen run (and its gated sets), every arm (or ``arms``);
    the result of ``evaluation.adaptation.run_adaptation`` plus how the data were made and the
    wall time. ``train``: the segmenter recipe (default: ``steps`` fixed steps, or None: until
    the loss plateaus), the same for every arm; ``mix``: how each arm's parts are weighed
    (``evaluation.adaptation.MIXES``)."""
    from evaluation.adaptation import check_mix, run_adaptation

    check_mix(mix)  # before the amgen run, not after it
    t0 = time.time()
    work_dir = Path(work_dir)
    data, made = prepare_adaptation(work_dir, sizes, model=model, model_steps=model_steps, guidance=guidance,
                                    ray_cpus=max(1, workers), per_layout=per_layout,
                                    log=log, gate_thresholds=gate_thresholds, gate_metric=gate_metric,
                                    label_trusted=label_trusted, judge=judge)
    cfg = train or downstream_train_config(steps, 3000, 100, 0.02, batch_size)
    # A plateau run has its own folders: its checkpoints must not resume a fixed-step run's.
    seg_dir = work_dir / ("segmenters-plateau" if cfg.until_plateau else "segmenters")
    run_name = Path(made["run_config"]["output"]["dir"]).name  # amgen_run_dir's: the model hashed once
    # Another judge gates other samples: its arms get folders of their own.
    judge_tag = f"_j{folder_hash(Path(judge))}" if judge else ""
    result = run_adaptation(data, cfg, list(range(seeds)), seg_dir, workers=workers, log=log, arms=arms,
                            amgen_tag=run_name.removeprefix("amgen_night") + judge_tag, mix=mix)
    if picture is not None:
        from amgen_core.image_io import write_bytes_atomic, encode_png
        from evaluation.adaptation import comparison_picture

        write_bytes_atomic(picture, encode_png(comparison_picture(data, made["day_ids"], made["amgen_target_ids"])))
        log(f"picture: {picture}")
    result.update(sizes=asdict(sizes), amgen_run={k: made[k] for k in ("run_seconds", "run_summary", "run_config")},
                  wall_seconds=round(time.time() - t0, 1), **({"gate": made["gate"]} if "gate" in made else {}))
    return result


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
