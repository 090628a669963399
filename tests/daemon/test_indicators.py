"""Indicator columns of categorical features for the joint drift test: which levels, and how a
window's codes become columns."""

from __future__ import annotations

import math

import numpy as np

from lrwatch.daemon.indicators import MIN_SHARE, IndicatorColumns


def test_frequent_levels_but_the_most_frequent_get_a_column() -> None:
    cats = [["a", "b", "c", "rare"], ["y", "n"], ["p", "q"]]
    rare = int(MIN_SHARE * 1000) - 1  # of 1000 values: under the share
    counts = [np.array([500, 300 - rare, 200, rare]), np.array([100, 900]),
              np.array([50, 50])]
    ind = IndicatorColumns.choose(["c1", "c2", "_prediction"], cats, counts,
                                  skip=["_prediction"])
    # c1: "a" is the reference level, "rare" is under MIN_SHARE; c2: "n" is the most frequent
    assert ind.names == ["c1=b", "c1=c", "c2=y"]
    assert ind.levels == [[1, 2], [0], []]


def test_codes_become_columns_missing_is_nan_unseen_is_zero() -> None:
    ind = IndicatorColumns.choose(["c"], [["a", "b", "c"]], [np.array([50, 30, 20])])
    # codes: 0..2 known, 3 unseen, 4 missing
    m = ind.matrix([np.array([0, 1, 2, 3, 4])], 5)
    assert m.shape == (5, 2)
    np.testing.assert_array_equal(m[:4], [[0, 0], [1, 0], [0, 1], [0, 0]])
    assert all(math.isnan(v) for v in m[4])


def test_the_total_is_capped_largest_shares_first_and_by_the_budget() -> None:
    from lrwatch.daemon.indicators import MAX_TOTAL

    # 10 features x 8 levels, the 7 below the first each over MIN_SHARE: 70 candidates
    counts = [np.array([1500] + [1000 - 5 * k - j for k in range(7)]) for j in range(10)]
    assert all((c[1:] / c.sum() >= MIN_SHARE).all() for c in counts)
    cats = [[f"v{k}" for k in range(8)] for _ in range(10)]
    ind = IndicatorColumns.choose([f"c{j}" for j in range(10)], cats, counts)
    assert ind.width == MAX_TOTAL
    # the 6 left out are the smallest shares: the last level of 6 features
    assert sum(7 not in lv for lv in ind.levels) == 6
    assert all(len(lv) >= 6 for lv in ind.levels)
    small = IndicatorColumns.choose([f"c{j}" for j in range(10)], cats, counts, budget=5)
    assert small.width == 5 and small.names[0] == "c0=v1"
    assert IndicatorColumns.choose(["c"], [["a", "b"]], [np.array([5, 5])], budget=-3).width == 0


def test_a_wide_categorical_table_does_not_cost_the_numeric_joint_test() -> None:
    """40 categoricals of 4 even levels and 3 numeric features on 200 reference rows: 120
    candidate indicators would need 2 x 123 + 20 rows; the budget keeps what the rows allow."""
    from lrwatch.daemon import DriftDetector
    from lrwatch.daemon.baseline import build_reference

    rng = np.random.default_rng(9)
    x = rng.standard_normal((200, 3))
    x[:, 1] += x[:, 0]
    rows = [{"features": {**{f"x{j}": float(v) for j, v in enumerate(r)},
                          **{f"c{k:02d}": str(rng.integers(4)) for k in range(40)}}}
            for r in x]
    ref = build_reference(rows, window_size=50, sims=200, seed=9)
    det = DriftDetector(ref)
    names = det.calibration.joint_features or []
    assert {"x0", "x1", "x2"} <= set(names)
    assert 2 * len(names) + 20 <= 200
