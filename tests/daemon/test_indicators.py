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
