"""Writing the quality benchmark: docs/quality.json, docs/quality.png, docs/quality.md."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from evaluation.metrics import MIN_REGION_PIXELS
from evaluation.quality import GROUND_TRUTH, GROUND_TRUTH_VAE, QualityReport, acceptance
from amgen_core.labels import colorize

_COLUMN_NAMES = {GROUND_TRUTH: "ground truth", GROUND_TRUTH_VAE: "ground truth via VAE"}
_SCALE = 2      # upscale the 64x128 tiles so details are visible
_PAD = 4
_HEADER = 14


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(report: QualityReport, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(path, json.dumps(report.json_rows(), indent=2) + "\n")
    return path


def picture(report: QualityReport) -> Image.Image:
    """Rows: examples; columns: exemplar | target layout | ground truth (| through the VAE) | one per mode."""
    if not report.examples:
        raise ValueError("the report holds no examples to draw")
    refs = [m for m in (GROUND_TRUTH, GROUND_TRUTH_VAE) if m in report.examples[0]["images"]]
    modes = [m for m in report.examples[0]["images"] if m not in refs]
    columns = ["exemplar", "target layout", *(_COLUMN_NAMES[m] for m in refs), *modes]
    h, w = report.examples[0]["triple"].target_label.shape
    th, tw = h * _SCALE, w * _SCALE
    canvas = Image.new("RGB", (len(columns) * (tw + _PAD) + _PAD, _HEADER + len(report.examples) * (th + _PAD) + _PAD), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        draw.text((_PAD + c * (tw + _PAD), 2), name, fill="black")
    for r, ex in enumerate(report.examples):
        t = ex["triple"]
        tiles = [t.exemplar_image, colorize(t.target_label), *(ex["images"][m] for m in (*refs, *modes))]
        for c, tile in enumerate(tiles):
            img = Image.fromarray(np.asarray(tile, np.uint8)).resize((tw, th), Image.NEAREST)
            canvas.paste(img, (_PAD + c * (tw + _PAD), _HEADER + _PAD + r * (th + _PAD)))
    return canvas


def write_picture(report: QualityReport, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    picture(report).save(tmp)
    tmp.replace(path)
    return path


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def table(rows: list[dict[str, Any]]) -> str:
    head = "| mode | n | mIoU (%) ↑ | class ΔE00 ↓ | vehicle ΔE00 ↓ | PSNR (dB) ↑ | controllability ↑ |\n|---|---:|---:|---:|---:|---:|---:|"
    lines = [head]
    for r in rows:
        hits, total = r["controllability_count"]
        psnr = "∞ (identical)" if r["psnr"] is None and r["mode"] == GROUND_TRUTH else _fmt(r["psnr"])
        lines.append(f"| {r['mode']} | {r['n']} | {_fmt(r['miou'])} | {_fmt(r['class_de2000'])} | "
                     f"{_fmt(r['instance_de2000'])} | {psnr} | {_fmt(r['controllability'], 3)} ({hits}/{total}) |")
    return "\n".join(lines)


def domain_table(rows: list[dict[str, Any]]) -> str:
    """Per domain: class ΔE00 / controllability / mIoU for each mode."""
    domains = sorted({d for r in rows for d in r.get("by_domain", {})})
    if not domains:
        return ""
    lines = ["| mode | " + " | ".join(f"{d}: n, class ΔE00, control, mIoU" for d in domains) + " |",
             "|---|" + "---|" * len(domains)]
    for r in rows:
        cells = []
        for d in domains:
            sub = r["by_domain"].get(d)
            cells.append("-" if sub is None else
                         f"{sub['n']}, {_fmt(sub['class_de2000'])}, {_fmt(sub['controllability'], 2)}, {_fmt(sub['miou'], 1)}")
        lines.append(f"| {r['mode']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def domain_counts(rows: list[dict[str, Any]]) -> str:
    by = rows[0].get("by_domain", {}) if rows else {}
    return ", ".join(f"{d} {sub['n']}" for d, sub in sorted(by.items(), key=lambda kv: -kv[1]["n"]))


def acceptance_section(rows: list[dict[str, Any]], comparisons: dict | None = None) -> str:
    checks = acceptance(rows)
    if not checks:
        return "Not all three modes were run, so the acceptance bar was not checked."
    lines = ["| criterion (issue 3) | result | numbers |", "|---|---|---|"]
    lines += [f"| {name} | **{'PASS' if ok else 'FAIL'}** | {nums} |" for name, ok, nums in checks]
    verdict = "met" if all(ok for _, ok, _ in checks) else "NOT met"
    text = "\n".join(lines) + f"\n\nOverall: the acceptance bar is **{verdict}**."
    if comparisons:
        text += ("\n\nHow sure are these differences? Paired bootstrap over the triples (1000 resamples, "
                 "seed 0; both modes resampled together):\n\n| comparison | class ΔE00 reduction | "
                 "controllability difference | mIoU difference (points) |\n|---|---|---|---|\n")
        text += "\n".join(
            f"| {name} | {c['class_de2000_reduction']} | {c['controllability_difference']} | {c['miou_difference']} |"
            for name, c in comparisons.items())
    return text


NOTES_BEGIN, NOTES_END = "<!-- notes:begin -->", "<!-- notes:end -->"


def _kept_notes(path: Path) -> str:
    """The hand-written analysis between the notes markers of an existing file (kept on rerun)."""
    if path.is_file():
        text = path.read_text()
        if NOTES_BEGIN in text and NOTES_END in text:
            return text.split(NOTES_BEGIN, 1)[1].split(NOTES_END, 1)[0].strip("\n")
    return "(no analysis written yet)"


def markdown(report: QualityReport, context: dict[str, Any], notes: str) -> str:
    s = report.settings
    seg = context.get("segmenter_meta", {})
    t = report.timings
    n = report.rows[0]["n"] if report.rows else 0
    modes_s = {r["mode"]: r["seconds"] for r in report.rows}
    per_mode = ", ".join(f"{m} {modes_s[m] / max(1, n):.2f} s" for m in s.modes)
    return f"""# Quality benchmark: AM-Adapter against toy-town ground truth

Made by `{context['command']}` on {context['date']} ({context['threads']} torch thread(s), CPU).
Model: `{context['model']}` (hash `{context['model_hash'][:16]}`). Judge segmenter: `{context['segmenter']}`.

## Result

{table(report.rows)}

By toy-town domain (the light of the scene):

{domain_table(report.rows)}

![exemplar | target layout | ground truth | ground truth through the VAE | structure_only | sa_aug | am_adapter](quality.png)

Rows of the picture: the first {len(report.examples)} held-out triples; columns: exemplar, target
layout (Cityscapes colours), ground truth, the ground truth through the model's VAE, then the three
modes (same noise seed per triple).

## Acceptance bar (issue 3)

{acceptance_section(report.rows, report.comparisons)}

## Analysis

{NOTES_BEGIN}
{notes}
{NOTES_END}

## Setup

- **Data**: {n} held-out toy-town ground-truth triples, `toytown.make_triples({n}, seed={s.seed})`.
  Each triple draws one appearance and two independent layouts; the exemplar is the first layout
  in that appearance, the ground truth the second layout in the same appearance, and the triple's
  `instance_map` pairs each target vehicle with the exemplar vehicle that wears the same paint.
  Domains are mixed ({domain_counts(report.rows)}), 64x128 pixels.
- **Sampling**: DDIM, {s.num_inference_steps} steps, CFG {s.guidance_scale}; the initial noise of
  triple j is seeded with {s.seed} + j in every mode. The exemplar is inverted and encoded once per
  triple (`encode_exemplar`) and its bank serves the three modes. Every mode gets the triple's
  `instance_map` as the user mapping (exemplar instance -> target instances) with
  `granularity="{s.granularity}"`; `structure_only` ignores the exemplar, `sa_aug` (plain augmented
  self-attention, no adapter) ignores the mapping.
- **Ceilings**: `ground_truth` is the ground-truth rendering scored like an output (so its PSNR is
  infinite and its colour errors are 0; its mIoU is the judge's own accuracy on these target
  layouts). `ground_truth_vae` is the ground truth encoded and decoded by the model's VAE: every
  mode's output leaves through that decoder, so this row bounds what any mode can reach with this
  VAE, and shows how well the judge reads VAE-decoded images.
- **Metrics**:
  - *mIoU (%)*: the judge segmenter's prediction on the output against the target layout, over the
    19 Cityscapes trainIds (ignore = 255), one confusion matrix pooled over all triples, classes
    that never occur skipped (Cityscapes convention).
  - *class ΔE00*: CIEDE2000 between the mean Lab colour of the output and of the ground truth over
    each class region of the target, for the evaluated classes present in both the exemplar and
    the target; mean over all (triple, class) pairs.
  - *vehicle ΔE00*: the same per target vehicle instance that the `instance_map` pairs with an
    exemplar vehicle (unpaired vehicles wear a paint the exemplar never shows); mean over instances.
  - *PSNR*: per image on 8-bit RGB, mean over triples.
  - *controllability*: for each mapped target vehicle, is its mean output colour nearest (CIEDE2000)
    to the mean colour of its mapped exemplar vehicle among all exemplar vehicles? Fraction of hits,
    counted only where the exemplar offers at least two vehicles (with one, a hit is guaranteed).
    Regions under {MIN_REGION_PIXELS} pixels are skipped in all colour measures.
- **Judge segmenter** (`evaluation/weights/segmenter`, {seg.get('parameters', '?')} parameters): a
  compact U-Net trained with `amgen eval train-segmenter` on real toy-town renderings only:
  {seg.get('train_scenes', '?')}. Its own mIoU on held-out real scenes
  ({seg.get('heldout_scenes', '?')}): **{seg.get('heldout_miou', '?')}%**.

## Seeds: what is held out from what

| data | random streams |
|---|---|
| benchmark triples | children of `SeedSequence([1, {s.seed}, j])`, j < {n} (toy-town's triple stream) |
| judge training | `default_rng(50000000 + i)` (one-word roots) |
| judge held-out | `default_rng(60000000 + i)`, i < 500 |
| model training (TRAIN) | `default_rng([seed, salt, step, rank, index])` (five-word roots) |

Spawned children never equal a root sequence, and roots of different word counts (one vs five
words) give different states, so no benchmark scene is a training scene of the model or of the judge.

## Timings

Wall time {t['total_s']} s for {n} triples x {len(s.modes)} modes on one torch thread of a 2-core CPU
shared with other jobs: {t['per_triple_all_modes_s']} s of generation per triple, of which exemplar
inversion + appearance pass (once per triple, shared by the modes) {t['encode_s'] / max(1, n):.2f} s, and
per mode {per_mode}. The rest ({t['total_s'] - t['generate_s']:.0f} s) is data, the VAE ceiling, the
judge and the metrics.

## How to rerun

```
.venv/bin/python bench/quality.py                     # writes docs/quality.{{md,png,json}}, prints the JSON
amgen eval quality --n 200 --json out.json            # the same benchmark, JSON to a file
amgen eval quality --n 200 --steps 20 --json out.json # at the release's 20 steps (twice the time)
amgen eval train-segmenter                            # retrains the judge (700 steps, ~16 min on a shared thread)
.venv/bin/python bench/routing_oracle.py              # the routing oracle (40 validation triples, ~10 min)
```
"""


def write_markdown(report: QualityReport, path: str | Path, context: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(path, markdown(report, context, _kept_notes(path)))
    return path
