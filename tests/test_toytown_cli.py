"""``amgen toytown make`` end to end through the real typer app."""
from __future__ import annotations

from typer.testing import CliRunner

from connectors.cityscapes import CityscapesSource
from toytown import read_triples
from pipeline.cli import app


def test_toytown_make_writes_tree_triples_and_summary(tmp_path):
    out = tmp_path / "tt"
    res = CliRunner().invoke(app, ["toytown", "make", "--n", "4", "--out", str(out), "--seed", "2",
                                   "--domain", "night", "--split", "val", "--triples", "2"])
    assert res.exit_code == 0, res.output
    assert "scenes" in res.output and "triples" in res.output and "/s" in res.output
    layouts = list(CityscapesSource(out, "val"))
    assert len(layouts) == 4 and {lay.meta["domain"] for lay in layouts} == {"night"}
    triples = list(read_triples(out / "triples"))
    assert len(triples) == 2 and {t.domain for t in triples} == {"night"}


def test_toytown_make_rejects_an_unknown_domain(tmp_path):
    res = CliRunner().invoke(app, ["toytown", "make", "--n", "1", "--out", str(tmp_path), "--domain", "rain"])
    assert res.exit_code != 0 and "rain" in res.output
    assert not (tmp_path / "gtFine").exists()
