"""The layer rule of docs/architecture.md, enforced: every import between amgen's packages points
down a floor, and Ray and Parquet stay where the rule puts them."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Lower floors know nothing of higher ones; packages on one floor know nothing of each other.
FLOORS = {
    "configs": 0,  # YAML presets only (package data)
    "amgen_core": 0,
    "amadapter": 1, "toytown": 1,
    "connectors": 2,
    "training": 3, "evaluation": 3,
    "stages": 4,
    "pipeline": 5,
    "bench": 6,
}
# Third-party modules a package must not touch (the model library knows nothing of Parquet;
# only pipeline/ and Ray Train in training/ know Ray).
FORBIDDEN = {
    "amgen_core": {"ray", "pyarrow", "datasets", "faiss", "diffusers", "torch"},
    "amadapter": {"ray", "pyarrow", "datasets", "faiss"},
    "toytown": {"ray", "pyarrow", "datasets", "faiss", "diffusers", "torch"},
    "connectors": {"ray", "diffusers"},
    "evaluation": {"ray"},
    "stages": {"ray"},
}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every absolute import in the file, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
    return found


def violations(files: dict[str, list[Path]]) -> list[str]:
    bad = []
    for package, paths in files.items():
        floor = FLOORS[package]
        for path in paths:
            for line, module in imports(path):
                top = module.split(".")[0]
                where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{line}"
                if top in FLOORS and top != package and FLOORS[top] >= floor:
                    bad.append(f"{where}: {package} (floor {floor}) imports {module} (floor {FLOORS[top]})")
                if top in FORBIDDEN.get(package, ()):
                    bad.append(f"{where}: {package} must not import {module}")
    return bad


def package_files() -> dict[str, list[Path]]:
    return {p: sorted((REPO / p).rglob("*.py")) for p in FLOORS}


def test_every_package_is_on_a_floor():
    listed = set(FLOORS)
    on_disk = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert on_disk <= listed, f"packages without a floor in FLOORS: {sorted(on_disk - listed)}"


def test_imports_point_down():
    bad = violations(package_files())
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


@pytest.mark.parametrize("package, source, expect", [
    ("amadapter", "from connectors.index_store import ShardedIndex\n", "imports connectors.index_store"),
    ("connectors", "def f():\n    from stages.records import Layout\n", "imports stages.records"),
    ("training", "import evaluation.metrics\n", "imports evaluation.metrics"),
    ("stages", "import ray\n", "must not import ray"),
    ("amadapter", "import pyarrow.parquet as pq\n", "must not import pyarrow.parquet"),
])
def test_the_walk_catches_an_upward_import(tmp_path, package, source, expect):
    bad_file = tmp_path / "bad.py"
    bad_file.write_text(source)
    found = violations({package: [bad_file]})
    assert len(found) == 1 and expect in found[0]


def test_the_walk_accepts_a_downward_import(tmp_path):
    ok = tmp_path / "ok.py"
    ok.write_text("from amgen_core.labels import colorize\nimport torch\n")
    assert violations({"amadapter": [ok], "stages": [ok]}) == []
