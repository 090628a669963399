"""Indicator columns of categorical features for the joint drift test: which levels, and how a
window's codes become columns."""

from __future__ import annotations

import math

import numpy as np

from lrwatch.daemon.indicators import MAX_LEVELS, MIN_SHARE, IndicatorColumns


def test_frequent_levels_but_the_most_frequent_get_a_column() -> None:
    cats = [["a", "b", "c", "rare"], ["y", "n"], ["p", "q"]]
    rare = int(MIN_SHARE * 1000) - 1  # of 1000 values: under the share
    counts = [np.array([500, 300, 200 - rare, rare]), np.array([10, 990]),
              np.array([50, 50])]
    ind = IndicatorColumns.choose(["c1", "c2", "_prediction"], cats, counts,
                                  skip=["_prediction"])
    # c1: "a" is the reference level, "rare" is under MIN_SHARE; c2: "n" is the most frequent
    assert ind.names == ["c1=b", "c1=c", "c2=y"]
    assert ind.levels == [[1, 2], [0], []]


def test_at_most_max_levels_per_feature_the_most_frequent_first() -> None:
    k = MAX_LEVELS + 5
    counts = [np.arange(k, 0, -1) * 100]
    ind = IndicatorColumns.choose(["c"], [[f"v{i}" for i in range(k)]], counts)
    assert ind.width == MAX_LEVELS
    assert ind.names[0] == "c=v1" and ind.names[-1] == f"c=v{MAX_LEVELS}"


def test_codes_become_columns_missing_is_nan_unseen_is_zero() -> None:
    ind = IndicatorColumns.choose(["c"], [["a", "b", "c"]], [np.array([50, 30, 20])])
    # codes: 0..2 known, 3 unseen, 4 missing
    m = ind.matrix([np.array([0, 1, 2, 3, 4])], 5)
    assert m.shape == (5, 2)
    np.testing.assert_array_equal(m[:4], [[0, 0], [1, 0], [0, 1], [0, 0]])
    assert all(math.isnan(v) for v in m[4])


def test_the_total_is_capped_largest_shares_first_and_by_the_budget() -> None:
    from lrwatch.daemon.indicators import MAX_TOTAL

    # 10 features x 12 levels: 110 candidate columns, more than MAX_TOTAL
    counts = [np.array([300] + [100 - 5 * k - j for k in range(11)]) for j in range(10)]
    cats = [[f"v{k}" for k in range(12)] for _ in range(10)]
    ind = IndicatorColumns.choose([f"c{j}" for j in range(10)], cats, counts)
    assert ind.width == MAX_TOTAL
    # the rarest levels (the last ones of every feature) are the ones left out
    assert all(11 not in lv for lv in ind.levels)
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
