"""`amgen eval adapt` at a small size, end to end through a real amgen run (tiny model, a few
steps): the arms' training data differ as the issue specifies (counts, domains), amgen's
exemplars come only from the night bank, and the classical baselines really restyle the images."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from test_pipeline_fixtures import tiny_model_dir

DAY, BANK, TEST, NIGHT_REAL = 9, 3, 4, 6


@pytest.fixture(scope="module")
def adapt_run(tmp_path_factory):
    from pipeline.cli import app

    base = tmp_path_factory.mktemp("adapt")
    model = tiny_model_dir(base / "model")
    work, rows, result, picture = base / "work", base / "rows.json", base / "result.json", base / "pic.png"
    args = ["eval", "adapt", "--work-dir", str(work), "--day-n", str(DAY), "--bank-n", str(BANK), "--test-n", str(TEST),
            "--night-real-n", str(NIGHT_REAL), "--steps", "2", "--batch-size", "4", "--seeds", "2", "--workers", "2",
            "--model", str(model), "--model-steps", "2", "--guidance", "1.5", "--json", str(rows), "--result", str(result),
            "--picture", str(picture), "--gate", "0.05", "--per-layout", "2", "--label-trusted"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return {"work": work, "rows": json.loads(rows.read_text()), "result": json.loads(result.read_text()),
            "picture": picture, "output": res.output}


def test_arms_are_made_as_specified(adapt_run):
    arms = adapt_run["result"]["arms"]
    day = {"name": "day scenes", "domain": "day", "samples": DAY}
    bank = {"name": "night bank", "domain": "night", "samples": BANK * 3, "distinct": BANK, "repeats": 3}
    assert arms["a_day"] == [day]
    assert arms["b_day_bank"] == [day, bank]  # the bank oversampled to the day set's weight
    assert arms["c_amgen"][:2] == [day, bank]
    assert arms["c_amgen"][2] == {"name": "amgen night renderings of the day layouts", "domain": "night (amgen)",
                                  "samples": 2 * DAY}  # --per-layout 2
    for arm, name in (("d_fda", "FDA"), ("d_histogram", "HistogramMatching"), ("d_pda", "PixelDistributionAdaptation")):
        assert arms[arm] == [day, bank, {"name": f"day restyled by {name}", "domain": "night (restyled day)",
                                         "samples": DAY}]
    assert arms["e_night_real"] == [day, {"name": "real night scenes", "domain": "night", "samples": NIGHT_REAL}]
    assert adapt_run["result"]["test_n"] == {"night": TEST, "day": TEST}
    # The gated (c): (b) plus what the quality gate kept of the same renderings; the rest it counted.
    gate = adapt_run["result"]["gate"]["0.05"]
    assert arms["c_amgen_gate0.05"] == [day, bank, {"name": "amgen night renderings, judge mIoU >= 0.05",
                                                    "domain": "night (amgen, gated)", "samples": gate["kept"]}]
    assert gate["kept"] + sum(gate["filtered_by_reason"].values()) == 2 * DAY
    # --label-trusted: the same kept renderings, on their label_trusted (stages.gate.trusted_label).
    assert arms["c_amgen_gate0.05_trusted"] == [day, bank, {
        "name": "amgen night renderings, judge mIoU >= 0.05, label_trusted",
        "domain": "night (amgen, gated, trusted pixels)", "samples": gate["kept"]}]
    assert 0 <= gate["label_trusted_share"] <= 1


def test_another_judge_gates_and_masks(adapt_run, tmp_path):
    """--judge: the gate and label_trusted come from that segmenter. A judge that sees road
    everywhere keeps only the labels' road (and their ignored pixels)."""
    from amgen_core.labels import IGNORE_TRAIN_ID, NAME_TO_ID, to_train_ids
    from pipeline.cli_eval import gated_amgen_sets
    from test_gate import road_judge

    out = next(p for p in adapt_run["work"].iterdir() if p.name.startswith("amgen_night"))
    sets, record = gated_amgen_sets(out, [0.0], lambda *_: None, label_trusted=True, judge=road_judge(tmp_path / "seg"))
    assert record["0"]["judge"] == str(tmp_path / "seg") and record["0"]["kept"] == 2 * DAY
    plain, trusted = sets["c_amgen_gate0"], sets["c_amgen_gate0_trusted"]
    for (_, label), (_, kept) in zip(plain.pairs, trusted.pairs):
        keep = (label == NAME_TO_ID["road"]) | (to_train_ids(label) == IGNORE_TRAIN_ID)
        assert np.array_equal(kept, np.where(keep, label, 0))


def test_rows_json_and_summary(adapt_run):
    from evaluation.adaptation import ARMS

    rows = adapt_run["rows"]
    arms = ARMS[:3] + ("c_amgen_gate0.05", "c_amgen_gate0.05_trusted") + ARMS[3:]
    assert [(r["arm"], r["seed"]) for r in rows] == [(a, s) for a in arms for s in (0, 1)]
    assert all(set(r) == {"arm", "seed", "night_miou", "day_miou"} for r in rows)
    s = adapt_run["result"]["summary"]
    night = {a: np.mean([r["night_miou"] for r in rows if r["arm"] == a]) for a in arms}
    assert s["gain_vs_b"] == pytest.approx(night["c_amgen"] - night["b_day_bank"], abs=0.011)
    assert s["day_drop"] == pytest.approx(s["arms"]["a_day"]["day"]["mean"] - s["arms"]["c_amgen"]["day"]["mean"], abs=0.011)
    assert s["gated"]["c_amgen_gate0.05"]["gain_vs_b"] == pytest.approx(night["c_amgen_gate0.05"] - night["b_day_bank"],
                                                                         abs=0.011)
    assert "| c_amgen |" in adapt_run["output"] and "c_amgen: gain vs (b)" in adapt_run["output"]
    assert "(paired SE " in adapt_run["output"] and "2 seeds)" in adapt_run["output"]
    assert "| arm | night mIoU | day mIoU | night car | night truck | night bus | night person | night rider | night rest |" \
        in adapt_run["output"]
    assert all(r["training"] == {"steps": 2, "stopped": "steps", "plateau_lr_drops_at": [], "final_ema_loss": None}
               for r in adapt_run["result"]["rows"])


def test_objects_apart_and_the_rest_as_one_mean_and_bars_of_issue_21():
    from evaluation.adaptation import object_classes, summarize, table

    per_class = {"car": 60.0, "bus": 10.0, "road": 90.0, "sky": 70.0, "building": 80.0}
    assert object_classes(per_class) == {"car": 60.0, "truck": None, "bus": 10.0, "person": None, "rider": None,
                                         "rest": 80.0}

    def row(arm, seed, night, day):
        return {"arm": arm, "seed": seed, "night_miou": night, "day_miou": day, "night_iou_per_class": per_class,
                "training": {"steps": 300 + seed}}

    rows = [row("b_day_bank", 0, 40, 60), row("c_amgen", 0, 51, 59), row("c_amgen_gate0.2", 0, 45, 57.5),
            row("d_histogram", 0, 47, 61)]
    s = summarize(rows)
    assert (s["gain_vs_b"], s["gain_vs_best_baseline"], s["day_drop_vs_b"]) == (11, 4, 1)
    assert s["verdicts"] == {"c_ge_b_plus_10": True, "c_ge_best_d_plus_3": True, "c_day_within_2_of_b": True}
    assert "day_drop" not in s and "gap_to_e" not in s  # (a) and (e) were not trained
    assert s["gated"]["c_amgen_gate0.2"]["verdicts"] == {"c_ge_b_plus_10": False, "c_ge_best_d_plus_3": False,
                                                         "c_day_within_2_of_b": False}
    assert "| c_amgen_gate0.2 | 45.00 ± 0.00 (45.00..45.00) | 57.50 ± 0.00 (57.50..57.50) | 60.0 | - | 10.0 | - | - | 80.0 | 300 |" \
        in table(s)


def test_trees_have_the_right_domains_and_disjoint_seeds(adapt_run):
    from evaluation.adaptation import ADAPT_TREE_SEEDS
    from evaluation.segmenter_train import SEGMENTER_HELDOUT_SEED_BASE, SEGMENTER_TRAIN_SEED_BASE

    trees = adapt_run["work"] / "trees"
    want = {"day_train": ("day", DAY), "night_bank": ("night", BANK), "night_test": ("night", TEST),
            "day_test": ("day", TEST), "night_real": ("night", NIGHT_REAL)}
    for name, (domain, n) in want.items():
        sidecars = sorted((trees / name / "gtFine" / "train").rglob("*_toytown.json"))
        assert len(sidecars) == n
        assert {json.loads(p.read_text())["domain"] for p in sidecars} == {domain}
        assert {json.loads(p.read_text())["seed"] for p in sidecars} == {ADAPT_TREE_SEEDS[name]}
    assert len(set(ADAPT_TREE_SEEDS.values())) == len(ADAPT_TREE_SEEDS)
    assert not set(ADAPT_TREE_SEEDS.values()) & {0, SEGMENTER_TRAIN_SEED_BASE, SEGMENTER_HELDOUT_SEED_BASE}


def test_amgen_exemplars_come_only_from_the_night_bank(adapt_run):
    from connectors.cityscapes import CityscapesSource

    work = adapt_run["work"]
    bank_ids = {it.layout_id for it in CityscapesSource(work / "trees" / "night_bank").list_items()}
    day_ids = {it.layout_id for it in CityscapesSource(work / "trees" / "day_train").list_items()}
    run_dir = Path(adapt_run["result"]["amgen_run"]["run_config"]["output"]["dir"])
    assert run_dir.parent == work
    files = sorted((run_dir / "data").glob("*.parquet"))
    table = pq.read_table(files, columns=["target_id", "exemplar_id"]) if len(files) == 1 else None
    rows = [r for f in files for r in pq.read_table(f, columns=["target_id", "exemplar_id"]).to_pylist()]
    assert table is None or table.num_rows == len(rows)
    assert len(rows) == 2 * DAY
    assert {r["exemplar_id"] for r in rows} <= bank_ids and len(bank_ids) == BANK
    assert sorted(r["target_id"] for r in rows) == sorted(2 * list(day_ids))  # every day layout rendered twice
    for day_id in day_ids:  # ... each time with its own exemplar
        assert len({r["exemplar_id"] for r in rows if r["target_id"] == day_id}) == 2
    run_cfg = adapt_run["result"]["amgen_run"]["run_config"]
    assert run_cfg["model"]["guidance_scale"] == 1.5 and run_cfg["exemplars"]["k"] == 2
    # the folder names the setting, the model's content and the renderings per layout
    assert re.fullmatch(r"amgen_night_s2_g1\.5_m[0-9a-f]{8}_k2", run_dir.name), run_dir.name
    assert run_cfg["exemplars"]["filters"] == {"domain": "night"}
    assert run_cfg["exemplars"]["source"]["root"] == str(work / "trees" / "night_bank")


def test_stray_exemplar_is_refused():
    from evaluation.adaptation import ExemplarOriginError, check_exemplars

    check_exemplars(["b1", "b2", "b1"], ["b1", "b2"])
    with pytest.raises(ExemplarOriginError, match="night bank"):
        check_exemplars(["b1", "day7"], ["b1", "b2"])
    with pytest.raises(ExemplarOriginError, match="no exemplar"):
        check_exemplars([], ["b1"])


@pytest.mark.parametrize("baseline", ["FDA", "HistogramMatching", "PixelDistributionAdaptation"])
def test_baselines_restyle_day_towards_night(baseline):
    from evaluation.adaptation import restyle
    from toytown import make_scene

    day = [make_scene(5, i, "day")[3] for i in range(4)]
    night = [make_scene(6, i, "night")[3] for i in range(3)]
    out = restyle(day, night, baseline, seed=0)
    assert [o.shape for o in out] == [d.shape for d in day] and all(o.dtype == np.uint8 for o in out)
    changes = [np.abs(o.astype(int) - d.astype(int)).mean() for o, d in zip(out, day)]
    # really transformed (FDA draws its band per image in (0, 0.1): a tiny band changes little)
    assert np.mean(changes) > 20 and sum(c > 2 for c in changes) >= 3
    # towards the night references: darker on average
    assert np.mean(out) < np.mean(day) - 5
    assert all(np.array_equal(a, b) for a, b in zip(out, restyle(day, night, baseline, seed=0)))  # seeded


def test_picture_has_five_columns(adapt_run):
    from amgen_core.image_io import read_image

    pic = read_image(adapt_run["picture"])
    assert pic.shape[1] == 2 * (5 * 128 + 4 * 2)


def test_a_baseline_stacks_on_an_amgen_arm():
    from evaluation.adaptation import AdaptationData, SampleList, arm_parts, describe, summarize

    pair = (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8))
    sets = {n: SampleList([pair] * k, name=n, domain=n) for n, k in
            (("day", 4), ("bank", 2), ("amgen", 3), ("kept", 1), ("night_real", 1), ("test", 1))}
    data = AdaptationData(day=sets["day"], bank=sets["bank"], amgen=sets["amgen"], night_real=sets["night_real"],
                          night_test=sets["test"], day_test=sets["test"], amgen_gated={"c_amgen_gate0.3": sets["kept"]})
    pda = SampleList([pair] * 4, name="pda", domain="restyled")
    baselines = {"d_fda": pda, "d_histogram": pda, "d_pda": pda}
    parts = arm_parts(data, baselines, ["d_pda", "c_amgen_gate0.3+d_pda", "c_amgen+d_pda"])
    assert list(parts) == ["d_pda", "c_amgen+d_pda", "c_amgen_gate0.3+d_pda"]
    assert [p["name"] for p in describe(parts["c_amgen_gate0.3+d_pda"])] == ["day", "bank", "kept", "pda"]
    assert [p["name"] for p in describe(parts["c_amgen+d_pda"])] == ["day", "bank", "amgen", "pda"]
    for bad in ("c_amgen_gate0.5+d_pda", "b_day_bank+d_pda", "c_amgen+d_nope"):
        with pytest.raises(ValueError, match="unknown stacked arm"):
            arm_parts(data, baselines, [bad])

    def row(arm, night, day):
        return {"arm": arm, "seed": 0, "night_miou": night, "day_miou": day, "night_iou_per_class": {}, "training": {}}

    s = summarize([row("b_day_bank", 50, 70), row("d_pda", 55, 66), row("c_amgen_gate0.3+d_pda", 59, 65)])
    f = s["stacked"]["c_amgen_gate0.3+d_pda"]
    assert (f["gain_vs_own_baseline"], f["day_drop_vs_own_baseline"], f["gain_vs_best_baseline"]) == (4, 1, 4)
    assert "gated" not in s


def test_the_balanced_mix_gives_the_day_scenes_half_of_every_arm():
    from evaluation.adaptation import AdaptationData, Repeated, SampleList, arm_parts, describe

    def pairs(n, value):  # each sample tells its set by its label value
        return [(np.zeros((2, 2, 3), np.uint8), np.full((2, 2), value, np.uint8))] * n

    sets = {n: SampleList(pairs(k, v), name=n, domain=n) for n, k, v in
            (("day", 6, 1), ("bank", 2, 2), ("amgen", 5, 3), ("night_real", 6, 4), ("test", 1, 0))}
    data = AdaptationData(day=sets["day"], bank=sets["bank"], amgen=sets["amgen"], night_real=sets["night_real"],
                          night_test=sets["test"], day_test=sets["test"])
    restyled = SampleList(pairs(6, 5), name="pda", domain="restyled")
    baselines = {"d_fda": restyled, "d_histogram": restyled, "d_pda": restyled}
    uniform = arm_parts(data, baselines)
    balanced = arm_parts(data, baselines, mix="balanced")
    # (a), (b) and (e) already give the day scenes half or all: the same parts under both mixes.
    for arm in ("a_day", "b_day_bank", "e_night_real"):
        assert describe(balanced[arm]) == describe(uniform[arm])
        assert not isinstance(balanced[arm][0], Repeated)
    # (c): 6 day against 6 bank draws + 5 renderings -> the day scenes cycled to 11 draws.
    c = balanced["c_amgen"]
    assert [p["samples"] for p in describe(c)] == [11, 6, 5]
    assert describe(c)[0]["repeats"] == 1.83 and describe(balanced["d_pda"])[0]["repeats"] == 2
    day_draws = [c[0][i][1][0, 0] for i in range(c[0].size)]
    assert day_draws == [1] * 11 and [c[0].base[i] is c[0][i] for i in range(6)] == [True] * 6
    assert [p["samples"] for p in describe(uniform["c_amgen"])] == [6, 6, 5]
    with pytest.raises(ValueError, match="unknown mix 'even'"):
        arm_parts(data, baselines, mix="even")


def test_paired_differences_per_seed_with_their_standard_error():
    from evaluation.adaptation import paired, summarize

    def row(arm, seed, night, day):
        return {"arm": arm, "seed": seed, "night_miou": night, "day_miou": day, "night_iou_per_class": {},
                "training": {}}

    rows = [row("b_day_bank", 0, 50, 70), row("b_day_bank", 1, 52, 72), row("b_day_bank", 2, 40, 60),
            row("d_pda", 0, 51, 66), row("d_pda", 1, 54, 68),
            row("c_amgen", 0, 55, 69), row("c_amgen", 1, 59, 69)]  # (c) has no seed 2
    p = paired(rows, "c_amgen", "b_day_bank", "night_miou")
    assert p == {"mean": 6.0, "se": 1.0, "min": 5.0, "max": 7.0, "seeds": [0, 1]}
    assert paired(rows, "c_amgen", "e_night_real", "night_miou") is None
    s = summarize(rows)
    assert s["paired"]["day_vs_b"] == {"mean": -2.0, "se": 1.0, "min": -3.0, "max": -1.0, "seeds": [0, 1]}
    assert s["paired"]["night_vs_best_baseline"]["mean"] == 4.5 and s["best_baseline"] == "d_pda"
    assert paired(rows[:1] + rows[5:6], "c_amgen", "b_day_bank", "night_miou")["se"] is None  # one seed: no error


def test_an_unknown_mix_is_refused_before_any_work(tmp_path):
    from pipeline.cli import app

    work = tmp_path / "work"
    res = CliRunner().invoke(app, ["eval", "adapt", "--work-dir", str(work), "--mix", "even"])
    assert res.exit_code == 2 and "unknown mix 'even'; the mixes are uniform, balanced" in res.output
    assert not work.exists()  # no trees, no amgen run
