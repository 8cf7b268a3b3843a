"""Metrics on hand-made cases whose answers are known without running the code."""
import math

import numpy as np
import pytest
from skimage.color import deltaE_ciede2000, rgb2lab

from evaluation import metrics as M
from amgen_core.labels import NAME_TO_ID, to_train_ids

ROAD, SKY, CAR, BUILDING = (NAME_TO_ID[n] for n in ("road", "sky", "car", "building"))


def _scene():
    """A 16x32 scene: sky on top, road below, two cars; noisy texture so means matter."""
    label = np.full((16, 32), ROAD, np.uint8)
    label[:6] = SKY
    inst = label.astype(np.int32).copy()
    label[8:12, 2:8] = CAR
    inst[8:12, 2:8] = CAR * 1000
    label[9:13, 20:28] = CAR
    inst[9:13, 20:28] = CAR * 1000 + 1
    img = np.zeros((16, 32, 3), np.uint8)
    img[label == SKY] = (90, 140, 220)
    img[label == ROAD] = (80, 80, 80)
    img[inst == CAR * 1000] = (200, 30, 30)
    img[inst == CAR * 1000 + 1] = (30, 40, 200)
    noise = np.random.default_rng(0).integers(-6, 7, img.shape)
    return label, inst, np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


def test_identical_images_have_zero_error_and_infinite_psnr():
    label, inst, img = _scene()
    assert M.psnr(img, img) == math.inf
    errs = M.class_colour_errors(img, img, label, label)
    assert len(errs) == 3 and max(errs) == 0.0
    ierrs = M.instance_colour_errors(img, img, inst)
    assert len(ierrs) == 2 and max(ierrs) == 0.0
    assert len(M.instance_colour_errors(img, img, inst, only={CAR * 1000 + 1})) == 1


def test_psnr_of_a_known_error():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a + 10  # MSE 100 -> 10*log10(255^2/100)
    assert M.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100))


def test_known_colour_shift_gives_expected_delta_e():
    label = np.full((8, 8), ROAD, np.uint8)
    gt = np.full((8, 8, 3), (100, 100, 100), np.uint8)
    out = np.full((8, 8, 3), (130, 100, 100), np.uint8)
    expected = deltaE_ciede2000(rgb2lab(np.array([[100, 100, 100]]) / 255.0), rgb2lab(np.array([[130, 100, 100]]) / 255.0))[0]
    errs = M.class_colour_errors(out, gt, label, label)
    assert errs == [pytest.approx(expected)]
    assert expected > 5  # a visible shift, so the test means something


def test_class_error_counts_only_classes_in_both_layouts():
    label, _, img = _scene()
    exemplar_label = np.full_like(label, SKY)  # the exemplar has no road and no car
    shifted = img.copy()
    shifted[label == ROAD] = 0  # errors on road must not count
    assert M.class_colour_errors(shifted, img, label, exemplar_label) == [0.0]


def test_miou_on_a_known_confusion():
    gt = np.array([[ROAD, ROAD, SKY, SKY]], np.uint8)
    pred = to_train_ids(np.array([[ROAD, SKY, SKY, SKY]], np.uint8))
    acc = M.ConfusionAccumulator()
    acc.add(pred, gt)
    # road: tp 1, fn 1 -> 1/2; sky: tp 2, fp 1 -> 2/3
    assert acc.miou() == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert np.isnan(acc.per_class()[to_train_ids(np.array([CAR]))[0]])


def test_miou_ignores_void_pixels():
    gt = np.array([[0, ROAD]], np.uint8)  # id 0 (unlabeled) is ignore
    pred = to_train_ids(np.array([[SKY, ROAD]], np.uint8))
    acc = M.ConfusionAccumulator()
    acc.add(pred, gt)
    assert acc.miou() == 1.0


def test_confusion_rejects_out_of_range_predictions():
    with pytest.raises(M.MetricInputError, match="prediction"):
        M.confusion_matrix(np.array([19]), np.array([0]))


def test_controllability_follows_the_mapping():
    label, inst, exemplar = _scene()
    # Target: two cars in new places; output paints them as the mapping says.
    t_inst = np.full((16, 32), ROAD, np.int32)
    t_inst[2:6, 4:10] = CAR * 1000 + 0
    t_inst[10:14, 14:22] = CAR * 1000 + 1
    out = np.full((16, 32, 3), 80, np.uint8)
    out[t_inst == CAR * 1000] = (30, 40, 200)       # the blue exemplar car
    out[t_inst == CAR * 1000 + 1] = (200, 30, 30)  # the red exemplar car
    mapping = {CAR * 1000: CAR * 1000 + 1, CAR * 1000 + 1: CAR * 1000}
    good = M.controllability(out, t_inst, exemplar, inst, mapping)
    assert (good.hits, good.total, good.rate) == (2, 2, 1.0)
    swapped = {CAR * 1000: CAR * 1000, CAR * 1000 + 1: CAR * 1000 + 1}
    bad = M.controllability(out, t_inst, exemplar, inst, swapped)
    assert (bad.hits, bad.total, bad.rate) == (0, 2, 0.0)


def test_controllability_skips_single_candidate_exemplars():
    label, inst, exemplar = _scene()
    inst = np.where(inst == CAR * 1000 + 1, ROAD, inst)  # one car left: nothing to choose
    t_inst = np.full((16, 32), ROAD, np.int32)
    t_inst[2:6, 4:10] = CAR * 1000
    r = M.controllability(exemplar, t_inst, exemplar, inst, {CAR * 1000: CAR * 1000})
    assert r.total == 0 and math.isnan(r.rate)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(M.MetricInputError, match="shapes differ"):
        M.psnr(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 3, 3), np.uint8))


def test_paired_bootstrap_on_known_records():
    from evaluation.stats import TripleRecord, compare

    eye = np.eye(19, dtype=np.int64) * 10
    # a: class error 5 per pair, 3/4 hits; b: error 10, 1/4 hits; same perfect confusion.
    a = [TripleRecord(eye, 10.0, 2, 3, 4) for _ in range(20)]
    b = [TripleRecord(eye, 20.0, 2, 1, 4) for _ in range(20)]
    c = compare(a, b, n_boot=200)
    assert c["class_de2000_reduction"].point == pytest.approx(0.5)
    assert c["controllability_difference"].point == pytest.approx(0.5)
    assert c["miou_difference"].point == 0.0
    # Identical triples: every resample gives the same value, the interval collapses.
    assert c["class_de2000_reduction"].low == pytest.approx(0.5) == c["class_de2000_reduction"].high
    # Noisy a: the interval widens around the point estimate and contains it.
    rng = np.random.default_rng(0)
    noisy = [TripleRecord(eye, float(rng.uniform(0, 40)), 2, 2, 4) for _ in range(20)]
    c2 = compare(noisy, b, n_boot=200)["class_de2000_reduction"]
    assert c2.low < c2.point < c2.high and c2.high - c2.low > 0.1
    with pytest.raises(ValueError, match="same non-zero"):
        compare(a, b[:3])
