"""Categorical features in the joint drift test, as indicator columns.

The joint test (:mod:`.multivariate`) regresses each numeric feature on the others. A categorical
feature that loses its relation to the numeric ones (a join that pairs a country code with
another row's amounts) keeps its frequencies, so the per-feature chi-square cannot see it, and
without it in the regression neither can the joint test. So each categorical or binary input
feature enters the joint model as 0/1 indicators of its frequent reference levels: they predict
the numeric features, and each is predicted by all the others, like a numeric feature.

Which levels: those with at least :data:`MIN_SHARE` of the reference's present values, minus the
most frequent level of all (the indicators of every level would sum to 1: exactly collinear).
Why 10%: the joint test's calibration treats each column's window statistic as Gaussian out to
its threshold (4-5 standard deviations at 1 false alarm per 1000 windows), and an indicator's
window statistic follows the count of its ones, whose skewness is ``1/sqrt(n p)``: 0.1 at 100
expected ones (10% of a 1000-record window), 0.27 at 1.4%. Measured: on lines of the Python
standard library (a real stream outside the benchmark) indicators of levels with 1.4-8% of the
rows made the daemon alarm at 1.9x its target at 1/1000, 0.9x with the 10% floor; levels of
9.5-50% on a generated stream stayed calibrated (docs/drift-joint.md). A share floor also bounds
a feature's indicators (at most 9). At most :data:`MAX_TOTAL` columns in all (the largest shares
first), and never so many that the reference sample becomes too small for the model
(:data:`.multivariate.MIN_ROWS_PER_FEATURE` rows per column): the model costs ``p^2`` per row,
and the numeric features' own joint test must not be lost to a wide categorical table.
A missing value is missing in every indicator of its feature (the model imputes the reference
mean); an unseen category is 0 in all of them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["IndicatorColumns", "MIN_SHARE", "MAX_TOTAL"]

#: Smallest reference share of a level that gets an indicator (the module notes say why).
MIN_SHARE = 0.1
#: Most indicators in all (the joint model's cost grows with the square of its columns).
MAX_TOTAL = 64


class IndicatorColumns:
    """The indicator columns of a profile's categorical input features.

    ``features`` lists, per categorical feature of the profile (``Profile.cat`` order), the
    codes (:meth:`Profile.encode`'s) that get a column, or none; ``names`` names the columns
    ``feature=level``.
    """

    def __init__(self, levels: list[list[int]], names: list[str], missing_codes: list[int]):
        self.levels = levels
        self.names = names
        self._missing = missing_codes

    @classmethod
    def choose(cls, cat_names: Sequence[str], categories: Sequence[Sequence[str]],
               counts: Sequence[np.ndarray], skip: Sequence[str] = (),
               budget: int = MAX_TOTAL) -> "IndicatorColumns":
        """Levels from the reference ``counts`` per feature (known levels in code order);
        features named in ``skip`` (the prediction) get none; at most ``budget`` (and
        :data:`MAX_TOTAL`) columns, the largest shares first."""
        candidates: list[tuple[float, int, int]] = []  # (-share, feature, code)
        for j, (name, cnt) in enumerate(zip(cat_names, counts)):
            cnt = np.asarray(cnt, dtype=np.float64)
            total = cnt.sum()
            if name in skip or len(cnt) < 2 or total <= 0:
                continue
            order = [int(k) for k in np.argsort(-cnt, kind="stable")]
            keep = [k for k in order[1:] if cnt[k] >= MIN_SHARE * total]
            candidates.extend((-cnt[k] / total, j, k) for k in keep)
        chosen = sorted(candidates)[:max(0, min(budget, MAX_TOTAL))]
        levels: list[list[int]] = [sorted(k for _, f, k in chosen if f == j)
                                   for j in range(len(cat_names))]
        names = [f"{name}={categories[j][k]}" for j, name in enumerate(cat_names)
                 for k in levels[j]]
        return cls(levels, names, [len(c) + 1 for c in categories])

    @property
    def width(self) -> int:
        return len(self.names)

    def matrix(self, codes: Sequence[np.ndarray], n: int) -> np.ndarray:
        """``(n, width)`` indicators of code arrays (one per categorical feature), NaN where
        the feature is missing."""
        out = np.zeros((n, self.width), dtype=np.float64)
        col = 0
        for c, keep, miss in zip(codes, self.levels, self._missing):
            if not keep:
                continue
            c = np.asarray(c)
            for k in keep:
                out[:, col] = c == k
                col += 1
            out[c == miss, col - len(keep):col] = np.nan
        return out
