"""Shared builders for the pipeline tests (no tests here): small toy-town trees, a broken tree,
a tiny random-weight model folder and run configs that point at them."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

H, W = 32, 64  # tiny scenes: the tiny test model (stride 4) takes them as they are


def make_toytown(root: Path, n: int, seed: int = 0) -> Path:
    from toytown import make_tree

    make_tree(root, n, seed=seed, height=H, width=W)
    return root


def label_files(root: Path) -> list[Path]:
    return sorted((root / "gtFine" / "train").glob("*/*_gtFine_labelIds.png"), key=lambda p: p.name)


def break_three(root: Path) -> dict[str, str]:
    """Damage three frames: a corrupt label PNG, an unknown label id, an image of the wrong size.
    Returns {layout_id: what was done}."""
    files = label_files(root)
    assert len(files) >= 4
    broken = {}
    corrupt, unknown, mismatch = files[0], files[1], files[2]
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    broken[corrupt.name.replace("_gtFine_labelIds.png", "")] = "corrupt"
    lab = np.array(Image.open(unknown))
    lab[0, :5] = 200  # not a Cityscapes id
    Image.fromarray(lab).save(unknown)
    broken[unknown.name.replace("_gtFine_labelIds.png", "")] = "unknown id"
    stem = mismatch.name.replace("_gtFine_labelIds.png", "")
    img_path = root / "leftImg8bit" / "train" / mismatch.parent.name / f"{stem}_leftImg8bit.png"
    Image.fromarray(np.zeros((H + 8, W, 3), np.uint8)).save(img_path)
    broken[stem] = "size mismatch"
    return broken


def tiny_model_dir(path: Path) -> Path:
    from amadapter.testing import tiny_pipeline

    if not (path / "model_index.json").is_file():
        tiny_pipeline(seed=0).save_pretrained(path)
    return path


def run_tree(root: Path, model_dir: Path, out: Path, **sections) -> dict:
    """A run config (as a dict) for a small toy-town tree and the tiny model."""
    tree = {
        "source": {"kind": "toytown", "root": str(root)},
        "augment": {"ops": [{"op": "random_resized_crop", "p": 0.7, "scale": [0.7, 1.0]}, {"op": "hflip", "p": 0.5},
                            {"op": "zoom_out", "p": 0.3, "scale": [0.85, 1.0]}]},
        "model": {"path": str(model_dir), "steps": 2, "guidance_scale": 2.0, "device": "cpu"},
        "synthesis": {"batch_size": 4, "torch_threads": 1},
        "output": {"dir": str(out), "rows_per_shard": 4, "preview_rows": 4},
    }
    for k, v in sections.items():
        tree.setdefault(k, {}).update(v)
    return tree


def file_digests(out: Path) -> dict[str, str]:
    """sha256 of every data and error file of an output folder, by relative path."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for sub in ("data", "errors") for p in sorted((out / sub).glob("*.parquet"))}
