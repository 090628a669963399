"""The drop statistic against a small labelled reference (docs/performance-estimation.md,
"Defects found by the seventeenth round's audit"): the test failed before its fix."""

from __future__ import annotations

import numpy as np

from lrwatch.daemon.estimation import PerformanceEstimator, drop_test

# a model sure of most rows, and unsure of a few (8% near 0.5): a 60-row reference often
# holds fewer of those than the stream does, so its own spread of estimated correctness is
# smaller than the stream's
CONFIDENCES = np.array([0.0, 0.02, 0.45, 0.55, 0.98, 1.0])
SHARES = np.array([0.44, 0.02, 0.04, 0.04, 0.02, 0.44])


def _draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    p = rng.choice(CONFIDENCES, size=n, p=SHARES)
    return p, (rng.random(n) < p).astype(int)   # calibrated: nothing to correct, nothing moves


def _alarms(rng: np.random.Generator, references: int) -> tuple[int, int]:
    """Suggested-rule alarms (``drop_z >= 3.09 and drop >= 0.02``) on one unshifted window of
    500 rows per 60-row reference: (what ships, each mean with its own spread)."""
    shipped = unpooled = fitted = 0
    while fitted < references:
        p, y = _draw(rng, 60)
        if y.min() == y.max():
            continue
        est = PerformanceEstimator.fit(p, y, method="isotonic", n_bags=4, seed=fitted)
        fitted += 1
        w = _draw(rng, 500)[0]
        r = est.estimate(w)
        c = est.correctness(w)
        big = r["accuracy_drop"] >= 0.02
        shipped += big and r["drop_z"] >= 3.09
        unpooled += big and drop_test(c, est.baseline, est.baseline_sd, 60,
                                      pooled=False) >= 3.09
    return shipped, unpooled


def test_a_small_reference_easier_than_the_stream_does_not_alarm_on_unshifted_windows():
    """Against 60 labelled rows that held fewer of the model's unsure rows than the stream,
    the drop's standard error used the reference's own (too small) spread, and unshifted
    windows read drops of 3-4 standard errors (8 of 10 windows of one generated case alarmed):
    the one-in-a-thousand threshold fired on a few percent of unshifted windows. Both means now
    share one pooled spread (the two-sample statistic of one population)."""
    shipped, unpooled = _alarms(np.random.default_rng(17), 150)
    assert shipped <= 1, f"{shipped} of 150 unshifted windows alarmed (1 in 1000 expected)"
    assert unpooled >= 3   # the statistic that shipped before, on the same windows


def test_the_pooled_statistic_is_the_two_sample_z():
    """By hand: the window's mean and spread, the reference's, one pooled variance."""
    c = np.array([0.5, 1.0] * 20)                      # mean 0.75, variance 0.0625
    z = drop_test(c, baseline=0.95, baseline_sd=0.1, reference_rows=60)
    s2 = (40 * 0.0625 + 60 * 0.01) / 100
    assert abs(z - 0.2 / np.sqrt(s2 / 40 + s2 / 60)) < 1e-4
    assert abs(drop_test(c, 0.95, 0.1, 60, pooled=False)
               - 0.2 / np.sqrt(0.0625 / 40 + 0.01 / 60)) < 1e-4
    # a window too small to measure its spread uses the reference's for both
    assert abs(drop_test(np.array([0.75]), 0.95, 0.1, 60) - 0.2 / np.sqrt(0.01 + 0.01 / 60)) < 1e-4
