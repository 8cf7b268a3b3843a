"""amgen runs from a built wheel, outside its source tree: presets, bundled model and judge weights
come from the installed package (importlib.resources), never from the checkout."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Runs in the child: drop the editable install's finder, so that a module the wheel lacks fails
# instead of being found in the checkout; then check where everything came from.
PROBE = """
import json, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
import amadapter, configs, evaluation, pipeline, stages
from amadapter.bundled import toy_model_dir
from evaluation.segmenter import DEFAULT_DIR
from pipeline.presets import preset_dir, preset_names
print(json.dumps({"modules": [m.__file__ for m in (amadapter, configs, evaluation, pipeline, stages)],
                  "data": [str(toy_model_dir()), str(DEFAULT_DIR), str(preset_dir())],
                  "presets": preset_names()}))
if len(sys.argv) > 1:
    from pipeline.cli import main
    sys.argv = ["amgen", *sys.argv[1:]]
    main()
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    wheels = tmp_path_factory.mktemp("wheels")
    # No build isolation: the venv's setuptools builds it, nothing is fetched.
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(REPO)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "Deprecat" not in build.stderr, build.stderr[-3000:]
    (wheel,) = wheels.glob("amgen-*.whl")
    target = tmp_path_factory.mktemp("site")
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           str(wheel)], capture_output=True, text=True)
    assert inst.returncode == 0, inst.stderr[-3000:]
    return target


def run_installed(target: Path, cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(target))
    return subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_wheel_holds_presets_and_weights(installed, tmp_path):
    res = run_installed(installed, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    found = json.loads(res.stdout.splitlines()[0])
    for path in found["modules"] + found["data"]:
        assert Path(path).resolve().is_relative_to(installed.resolve()), path
    assert "toytown_demo" in found["presets"] and "train_toy_stage2" in found["presets"]
    assert (Path(found["data"][0]) / "model_index.json").is_file()
    assert (Path(found["data"][1]) / "model.safetensors").is_file()


def test_demo_runs_from_the_wheel_outside_the_checkout(installed, tmp_path):
    from test_quiet_console import unasked_lines

    res = run_installed(installed, tmp_path, "demo", "--n", "4", "--steps", "1", "--out", "demo")
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    # A quiet console: no Ray or diffusers warning or error line that the demo did not ask for.
    assert unasked_lines(res.stdout + res.stderr) == [], (res.stdout[-3000:], res.stderr[-3000:])
    out = tmp_path / "demo"
    assert len(list((out / "data").glob("*.parquet"))) == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"]["written"] == 4
    assert manifest["model"].startswith("toy@")
