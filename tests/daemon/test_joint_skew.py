"""The joint test's skew correction (calibrate.row_skew, window_skew, unskew)."""

from __future__ import annotations

import importlib

import numpy as np
from scipy import special

cal = importlib.import_module("lrwatch.daemon.calibrate")


def test_row_skew_measures_known_skewness():
    rng = np.random.default_rng(0)
    x = np.column_stack([np.abs(rng.standard_normal(400_000)),   # half-normal: 0.995
                         rng.standard_normal(400_000),           # 0
                         np.full(400_000, 3.0)])                 # constant: 0, not NaN
    x[::7, 1] = np.nan
    g = cal.row_skew(x)
    assert abs(g[0] - 0.995) < 0.03 and abs(g[1]) < 0.03 and g[2] == 0.0


def test_window_skew_shrinks_with_the_window_and_matches_simulation():
    rng = np.random.default_rng(1)
    n, m = 100, 5000
    g = cal.window_skew(np.array([0.995]), n, m, m)[0]
    assert 0.08 < g < 0.11
    assert cal.window_skew(np.array([0.995]), 1000, m, m)[0] < g / 3
    # simulated z of half-normal windows against a half-normal reference
    win = np.abs(rng.standard_normal((20_000, n))).mean(axis=1)
    ref = np.abs(rng.standard_normal((20_000, m // 10))).mean(axis=1)  # m/10 for speed
    z = win - ref
    sim = float(cal.row_skew(z[:, None])[0])
    assert abs(sim - cal.window_skew(np.array([0.995]), n, m // 10, m // 10)[0]) < 0.04


def test_unskew_inverts_the_cornish_fisher_expansion_and_is_monotone():
    z = np.linspace(-4, 4, 81)
    for g in (0.25, -0.25, 0.05):
        x = z + g / 6 * (z * z - 1)
        assert np.allclose(cal.unskew(x, g), z)
    x = np.linspace(-60, 60, 24001)
    for g in (0.3, -0.3, 0.1, 5.0):   # 5 is clipped to SKEW_MAX
        assert np.all(np.diff(cal.unskew(x, g)) > 0)
    assert np.array_equal(cal.unskew(x, 0.0), x)


def test_unskewed_skewed_statistic_has_gaussian_tails_on_both_sides():
    rng = np.random.default_rng(2)
    n = 100
    w = np.abs(rng.standard_normal((400_000, n))).mean(axis=1)
    s = (w - w.mean()) / w.std()
    g = float(cal.row_skew(s[:, None])[0])
    c, tail = 3.2, special.ndtr(-3.2)
    raw_up, raw_lo = (s > c).mean() / tail, (s < -c).mean() / tail
    u = cal.unskew(s, g)
    up, lo = (u > c).mean() / tail, (u < -c).mean() / tail
    assert raw_up > 1.5 and raw_lo < 0.7           # the skew is visible in the raw tails
    assert 0.75 < up < 1.3 and 0.7 < lo < 1.35     # and gone after the correction
