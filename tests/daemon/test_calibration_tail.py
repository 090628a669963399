"""The tail-fitted standardisation of p-value dims (calibrate._tail_fit, _standardisation)."""

from __future__ import annotations

import importlib
import math

import numpy as np
from scipy import special

cal = importlib.import_module("lrwatch.daemon.calibrate")


def test_gaussian_column_gets_its_own_location_and_scale():
    rng = np.random.default_rng(0)
    raw = rng.normal(0.3, 1.7, (2000, 1))
    a, b = cal._tail_fit(raw, np.array([True]))
    assert abs(a[0] - 0.3) < 0.25 and abs(b[0] - 1.7) < 0.2


def _exceedance_ratios(draw, c: float = 3.0) -> tuple[float, float]:
    """Exceedances of ``c`` on fresh draws over the normal tail: standardised with the mean and
    sd of 2000 draws, and with :func:`_standardisation` (the tail fit) of the same draws."""
    fit, new = draw(2000), draw(400_000)
    mu, sd, _, _ = cal._standardisation(fit, np.array([False]), np.array([False]))
    gauss = special.ndtr(-c)
    plain = ((new - fit.mean()) / fit.std(ddof=1) > c).mean() / gauss
    return float(plain), float(((new - mu) / sd > c).mean() / gauss)


def test_heavy_and_light_upper_tails_are_standardised_on_the_tail():
    rng = np.random.default_rng(1)
    # heavier than its bulk: the square root of a chi-square with 4 degrees of freedom
    plain, tail = _exceedance_ratios(lambda n: np.sqrt(rng.chisquare(4, (n, 1))))
    assert plain > 2.0 and 0.75 < tail < 1.3
    # lighter than its bulk (like the binned KS's normal score): a normal, compressed above 1
    def light(n):
        z = rng.normal(0, 1, (n, 1))
        return np.where(z > 1, 1 + 0.6 * (z - 1), z)
    plain, tail = _exceedance_ratios(light)
    assert plain < 0.3 and 0.5 < tail < 1.5


def test_discrete_and_signed_columns_keep_mean_and_sd():
    rng = np.random.default_rng(2)
    discrete = rng.integers(0, 5, 2000).astype(float)  # 5 distinct values: no line
    gaussian = rng.normal(0, 1, 2000)
    raw = np.column_stack([discrete, gaussian, gaussian * 2.0])
    a, b = cal._tail_fit(raw, np.array([True, True, False]))
    assert np.isnan(b[0]) and np.isfinite(b[1]) and np.isnan(b[2])
    mean_dims = np.array([False, False, True])
    mu, sd, _, live = cal._standardisation(raw, mean_dims, mean_dims)
    assert abs(sd[0] - discrete.std(ddof=1)) < 1e-9 and abs(mu[0] - discrete.mean()) < 1e-9
    assert mu[2] == 0.0 and abs(sd[2] - raw[:, 2].std(ddof=1)) < 1e-9
    assert live.all()


def test_sequential_share_moves_budget_from_the_scan_to_the_window(monkeypatch):
    from lrwatch.daemon.reference import profile_records

    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (3000, 3))
    ref = profile_records([{"features": {f"f{j}": float(v) for j, v in enumerate(r)}}
                           for r in x])

    def thresholds(share: float) -> tuple[float, float]:
        monkeypatch.setattr(cal, "SEQUENTIAL_SHARE", share)
        c = cal.calibrate(ref, window_size=500, target_windows=100, sims=300, seed=1,
                          joint=False)
        return c.threshold, c.seq_threshold

    half, quarter = thresholds(0.5), thresholds(0.25)
    # a quarter of the budget: the scan's threshold rises, the window's falls; 3 features with
    # one test dim each near the copula's tail: both move by more than their simulation noise
    assert quarter[1] > half[1] + 0.05
    assert quarter[0] < half[0] - 0.05
    only_window = cal.calibrate(ref, window_size=500, target_windows=100, sims=300, seed=1,
                                joint=False, sequential=False)
    assert only_window.threshold < quarter[0] and math.isinf(only_window.seq_threshold)
