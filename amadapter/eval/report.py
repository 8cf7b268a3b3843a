"""Writing the quality benchmark: docs/quality.json, docs/quality.png, docs/quality.md."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from amadapter.eval.quality import GROUND_TRUTH, QualityReport, acceptance
from amadapter.labels import colorize

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
    """Rows: examples; columns: exemplar | target layout | ground truth | one column per mode."""
    if not report.examples:
        raise ValueError("the report holds no examples to draw")
    modes = [m for m in report.examples[0]["images"] if m != GROUND_TRUTH]
    columns = ["exemplar", "target layout", "ground truth", *modes]
    h, w = report.examples[0]["triple"].target_label.shape
    th, tw = h * _SCALE, w * _SCALE
    canvas = Image.new("RGB", (len(columns) * (tw + _PAD) + _PAD, _HEADER + len(report.examples) * (th + _PAD) + _PAD), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        draw.text((_PAD + c * (tw + _PAD), 2), name, fill="black")
    for r, ex in enumerate(report.examples):
        t = ex["triple"]
        tiles = [t.exemplar_image, colorize(t.target_label), ex["images"][GROUND_TRUTH], *(ex["images"][m] for m in modes)]
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


def acceptance_section(rows: list[dict[str, Any]]) -> str:
    checks = acceptance(rows)
    if not checks:
        return "Not all three modes were run, so the acceptance bar was not checked."
    lines = ["| criterion (issue 3) | result | numbers |", "|---|---|---|"]
    lines += [f"| {name} | **{'PASS' if ok else 'FAIL'}** | {nums} |" for name, ok, nums in checks]
    verdict = "met" if all(ok for _, ok, _ in checks) else "NOT met"
    return "\n".join(lines) + f"\n\nOverall: the acceptance bar is **{verdict}**."
