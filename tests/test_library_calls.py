"""Library calls that replaced hand-written code give what the hand-written code gave.

The old formulas live on here as the references.
"""
import numpy as np
import pytest
import torch
from PIL import Image

# Sizes that cover up- and downscales, whole and odd ratios, and the sizes the pipeline uses.
SIZES = [*range(1, 41), 63, 64, 65, 96, 127, 128, 129, 255, 256, 257, 512, 720, 1023, 1024, 1025, 1080]


def _old_eps_loss(pred, noise, timesteps, scheduler, snr_gamma):
    per_sample = (pred.float() - noise.float()).pow(2).flatten(1).mean(1)
    a = scheduler.alphas_cumprod.to(per_sample.device)[timesteps]
    snr = a / (1 - a)
    return (torch.clamp(snr, max=snr_gamma) / snr * per_sample).mean()


@pytest.mark.parametrize("gamma", [1.0, 5.0, 20.0])
def test_min_snr_loss_via_diffusers_compute_snr_equals_the_direct_quotient(gamma):
    from diffusers import DDIMScheduler

    from amadapter.presets import get_preset
    from training.diffusion import eps_loss

    sched = DDIMScheduler(**get_preset("toy")["scheduler"])
    t = torch.arange(sched.config.num_train_timesteps)
    g = torch.Generator().manual_seed(0)
    pred, noise = torch.randn(len(t), 4, 2, 2, generator=g), torch.randn(len(t), 4, 2, 2, generator=g)
    # One step per call (every 7th step, both sides of the cap), so each weight is compared on its own.
    t = t[::7]
    new = torch.stack([eps_loss(pred[i:i + 1], noise[i:i + 1], t[i:i + 1], sched, gamma) for i in range(len(t))])
    old = torch.stack([_old_eps_loss(pred[i:i + 1], noise[i:i + 1], t[i:i + 1], sched, gamma) for i in range(len(t))])
    # compute_snr squares sqrt(a)/sqrt(1-a): measured max relative difference 2.5e-7 (gamma 5),
    # 3.7e-7 (gamma 1), i.e. float32 rounding; weight-1 steps stay bit-identical.
    torch.testing.assert_close(new, old, rtol=1e-6, atol=0)
    a = sched.alphas_cumprod[t]
    capped = (a / (1 - a)) <= gamma
    assert torch.equal(new[capped], old[capped]) and capped.any() and not capped.all()
    # All 1000 steps in one batch.
    t = torch.arange(sched.config.num_train_timesteps)
    batch = eps_loss(pred, noise, t, sched, gamma)
    torch.testing.assert_close(batch, _old_eps_loss(pred, noise, t, sched, gamma), rtol=1e-6, atol=0)


def test_upscale_via_pil_nearest_equals_repeat():
    from stages.write import _upscale

    rng = np.random.default_rng(0)
    checked = 0
    for h in (1, 2, 3, 5, 7, 13, 32, 47, 64, 97, 128, 200):
        for w in (1, 3, 8, 33, 130):
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            for min_height in (1, h, h + 1, 96, 128, 301):
                f = max(1, -(-min_height // h))
                got = _upscale(img, min_height)
                assert got.dtype == np.uint8 and np.array_equal(got, img.repeat(f, 0).repeat(f, 1)), (h, w, f)
                checked += f > 1
    assert checked == 215  # (h, w, min_height) cases that enlarge



def test_fit_is_exact_integer_floor_which_cv2_nearest_misses():
    """_fit takes source pixel floor(i * in / out) in integers; cv2.INTER_NEAREST means the same but
    computes it in floating point and lands one pixel early on some exact boundaries, so _fit
    stays hand-written (the preview bytes depend on it)."""
    import cv2

    from stages.write import _fit

    cv2_differs = []
    for n_in in SIZES:
        src = np.repeat((np.arange(n_in) % 251).astype(np.uint8)[:, None, None], 3, axis=2)  # (n_in, 1, 3)
        for n_out in SIZES:
            want = src[(np.arange(n_out) * n_in) // n_out]
            got = _fit(src, (n_out, 1))
            assert np.array_equal(got, want) and np.array_equal(_fit(src.transpose(1, 0, 2), (1, n_out)),
                                                                want.transpose(1, 0, 2)), (n_in, n_out)
            if not np.array_equal(cv2.resize(src, (1, n_out), interpolation=cv2.INTER_NEAREST), want):
                cv2_differs.append((n_in, n_out))
    assert (6, 34) in cv2_differs  # measured with OpenCV 5.1: 46 of these 3249 size pairs

def _centres(n_in: int, n_out: int) -> np.ndarray:
    return (np.arange(n_out) + 0.5) * n_in / n_out


def test_resize_nearest_samples_pixel_centres_like_pil_except_on_exact_boundaries():
    """PIL NEAREST samples the same pixel centres; where a centre falls exactly on a pixel boundary
    ((2i + 1) * n_in divisible by 2 * n_out), PIL does not always take the later pixel as
    resize_nearest does, which is why resize_nearest stays hand-written (it fixes retrieval results)."""
    from stages.retrieve import resize_nearest

    pairs_differing = 0
    for n_in in SIZES:
        src = np.arange(n_in, dtype=np.int32)[:, None].repeat(2, 1)  # value = source row
        for n_out in SIZES:
            ours = resize_nearest(src, (n_out, 2))[:, 0]
            pil = np.asarray(Image.fromarray(src).resize((2, n_out), Image.NEAREST))[:, 0]
            c = _centres(n_in, n_out)
            boundary = c == np.floor(c)
            assert np.array_equal(ours, np.floor(c).astype(np.int64))  # centres, ties to the later pixel
            assert np.array_equal(ours[~boundary], pil[~boundary]), (n_in, n_out)
            pairs_differing += not np.array_equal(ours, pil)
            # Columns follow the same rule.
            assert np.array_equal(resize_nearest(src.T, (2, n_out))[0], ours)
    # Measured with Pillow 13.0: 515 of these 57 x 57 = 3249 size pairs; switching would change them.
    assert pairs_differing > 0


def test_resize_nearest_keeps_dtype_ids_and_identity():
    from stages.retrieve import resize_nearest

    lab = np.random.default_rng(1).integers(0, 34, (37, 53), dtype=np.uint8)
    small = resize_nearest(lab, (16, 32))
    assert small.dtype == np.uint8 and set(np.unique(small)) <= set(np.unique(lab))
    assert resize_nearest(lab, lab.shape) is lab


# ----------------------------------------------------------------------------- paired bootstrap
def _old_compare(a, b, n_boot=1000, seed=0):
    """evaluation.stats.compare before scipy: own index draws, weights from bincount, row 0 the point."""
    from evaluation.stats import Interval, _stack, _statistics

    n = len(a)
    draws = np.random.default_rng(seed).integers(0, n, (n_boot, n))
    weights = np.stack([np.bincount(d, minlength=n) for d in draws]).astype(np.float64)
    weights = np.concatenate([np.ones((1, n)), weights])
    sa, sb = _statistics(weights, *_stack(a)), _statistics(weights, *_stack(b))
    values = {"class_de2000_reduction": 1.0 - sa[:, 0] / sb[:, 0],
              "controllability_difference": sa[:, 1] - sb[:, 1], "miou_difference": sa[:, 2] - sb[:, 2]}
    out = {}
    for name, v in values.items():
        boot = v[1:][np.isfinite(v[1:])]
        low, high = np.percentile(boot, [2.5, 97.5]) if boot.size else (np.nan, np.nan)
        out[name] = Interval(float(v[0]), float(low), float(high))
    return out


def _records(n, error_scale, rng, vehicles=(0, 4)):
    from evaluation.stats import TripleRecord

    out = []
    for _ in range(n):
        cm = rng.integers(0, 20, (19, 19))
        cm[np.diag_indices(19)] += rng.integers(20, 80, 19)
        pairs, total = int(rng.integers(1, 6)), int(rng.integers(*vehicles))
        out.append(TripleRecord(cm, float(rng.uniform(5, 30) * pairs * error_scale), pairs,
                                int(rng.integers(0, total + 1)), total))
    return out


@pytest.mark.parametrize("n, n_boot, seed", [(1, 100, 0), (2, 200, 0), (3, 1000, 1), (20, 1000, 0), (57, 500, 7), (200, 1000, 0)])
def test_scipy_paired_bootstrap_gives_the_old_intervals(n, n_boot, seed):
    """scipy.stats.bootstrap(paired=True) draws rng.integers(0, n, (n_boot, n)) from default_rng(seed),
    the very indices the old code drew: the intervals are bit-identical; the point estimate, now a
    one-row matrix product, may move by one float64 rounding step."""
    from evaluation.stats import compare

    rng = np.random.default_rng(n)
    a, b = _records(n, 0.7, rng), _records(n, 1.0, rng)  # some triples have no vehicle: NaN resamples
    new, old = compare(a, b, n_boot=n_boot, seed=seed), _old_compare(a, b, n_boot=n_boot, seed=seed)
    assert list(new) == list(old)
    for name in new:
        assert np.array_equal([new[name].low, new[name].high], [old[name].low, old[name].high], equal_nan=True), name
        assert new[name].point == pytest.approx(old[name].point, rel=1e-14, abs=1e-14, nan_ok=True)
    as_array = lambda c: np.array([[i.point, i.low, i.high] for i in c.values()])  # noqa: E731
    assert np.array_equal(as_array(compare(a, b, n_boot=n_boot, seed=seed)), as_array(new), equal_nan=True)
    if n > 3:
        assert not np.array_equal(as_array(compare(a, b, n_boot=n_boot, seed=seed + 1)), as_array(new), equal_nan=True)


def test_finite_resamples_give_scipys_own_percentile_interval():
    from scipy.stats import bootstrap

    from evaluation.stats import compare

    rng = np.random.default_rng(5)
    a, b = _records(30, 0.8, rng, vehicles=(3, 6)), _records(30, 1.0, rng, vehicles=(3, 6))
    ours = compare(a, b, n_boot=400, seed=3)["controllability_difference"]
    rate = lambda recs, i: (np.array([r.hits for r in recs])[i].sum(-1)  # noqa: E731
                            / np.array([r.total for r in recs])[i].sum(-1))
    ref = bootstrap((np.arange(30),), lambda i, axis=-1: rate(a, i) - rate(b, i), n_resamples=400, paired=True,
                    vectorized=True, method="percentile", rng=3).confidence_interval
    assert (ours.low, ours.high) == pytest.approx((ref.low, ref.high), rel=1e-12)
    assert ours.low < ours.point < ours.high
