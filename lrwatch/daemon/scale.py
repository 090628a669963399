"""The scale the location tests work on: reference normal scores.

The mean test, the sequential scan and the joint test compare means. On a heavy-tailed feature
(amounts, durations, counts with a long tail) a window mean is far from Gaussian at the
thresholds the daemon works at (1e-3 to 1e-5), and a reference of a few thousand rows usually
under-states both the mean and the spread of such a feature. Resampling the reference cannot
show the calibration what the reference lacks, so these tests alarmed at 2 to 77 times their
target (docs/drift-joint.md, "Heavy-tailed features: the location tests on normal scores").

So each numeric feature is first mapped through its reference's **normal scores**: a value
``x`` becomes ``Phi^-1(F(x))`` with ``F`` the reference's empirical distribution (mid-ranks for
tied values), linear between knots. On that scale every feature is close to N(0, 1) under the
reference, whatever its shape, and the location tests are calibrated where the Gaussian
calibration assumes them to be. For location shifts, a test on normal scores is never less
efficient than the same test on the raw values (Chernoff and Savage, 1958: asymptotic relative
efficiency >= 1 against the t-test for every continuous distribution, 1 at the normal), and much
more efficient on heavy tails. The distribution tests (KS and chi-square on quantile bins) do
not change under a monotone map, so they keep working on the raw values, and so do the effect
sizes and exported statistics in raw units (Wasserstein distance, ranges).

Beyond the reference's range a value gets ``log(1 + d)`` added to the end score, ``d`` its
distance from the range in reference standard deviations: wild values (a pipeline emitting
1e9 in 1% of the rows) still move the window mean, while the ordinary tail values that fall
outside a reference's range (about ``2 n / m`` per window of ``n``) add little. The raw distance itself, tried first,
made the tests alarm at 13 times their target on log-normal amounts: the distance of a
heavy-tailed value beyond the reference's maximum is itself heavy-tailed.

The map is fitted on the reference's row sample, deterministically, whenever a profile is
compiled; nothing is stored in the reference file.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

from . import finite_stats

_MAX = float(np.finfo(np.float64).max)

__all__ = ["NormalScores", "LOCATION_SCALE", "MAX_KNOTS"]

#: Name of the location scale, stored with a calibration: a calibration made on another scale
#: (``None``: lrwatch before this module, raw values) is recalibrated.
LOCATION_SCALE = "normal_scores"
#: Knots per feature: distinct reference values when there are at most this many, otherwise
#: knots evenly spaced in score (every 0.12 of a standard normal at 5,000 rows), so that the
#: linear interpolation between them is as fine in the tails as in the middle. Any monotone
#: map keeps the tests calibrated (the calibration resamples through the same map); the knots
#: only decide how close the map is to the exact scores (power), and fewer keep each value's
#: search short (speed).
MAX_KNOTS = 64


class NormalScores:
    """Per column, the monotone map from raw values to reference normal scores.

    ``fit`` takes the reference sample ``(m, Fn)`` (NaN missing); ``apply`` maps a window of
    the same columns, NaN staying NaN. A column with fewer than two present values maps through
    its raw values standardised by ``fallback`` mean and standard deviation.
    """

    def __init__(self, xs: list[np.ndarray], zs: list[np.ndarray], sd: np.ndarray) -> None:
        self.xs = xs
        self.zs = zs
        self.sd = np.where(sd > 0, sd, 1.0)
        self.lo = np.array([x[0] if len(x) else math.nan for x in xs])
        self.hi = np.array([x[-1] if len(x) else math.nan for x in xs])

    @classmethod
    def fit(cls, sample: np.ndarray, fallback_mean: np.ndarray,
            fallback_sd: np.ndarray) -> "NormalScores":
        xs: list[np.ndarray] = []
        zs: list[np.ndarray] = []
        sd = np.asarray(fallback_sd, dtype=np.float64).copy()
        for j in range(sample.shape[1]):
            col = sample[:, j]
            col = col[np.isfinite(col)]
            if len(col) < 2 or col.min() == col.max():
                mu, s = float(fallback_mean[j]), float(fallback_sd[j]) or 1.0
                xs.append(np.array([mu - s, mu + s]))
                zs.append(np.array([-1.0, 1.0]))
                continue
            xk, zk = _knots(col)
            xs.append(xk)
            zs.append(zk)
            sd[j] = float(finite_stats.std(col, ddof=1))
        return cls(xs, zs, sd)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Normal scores of ``x`` (``(n, Fn)``), with the log excess beyond the knots added."""
        return self.apply_rows(np.ascontiguousarray(x.T)).T

    def apply_rows(self, xt: np.ndarray) -> np.ndarray:
        """The same for one row per feature (``(Fn, n)``). Rows sorted ascending are about 7x
        faster: the interpolation's search then starts where the last one ended."""
        out = np.empty_like(xt, dtype=np.float64)
        for j in range(xt.shape[0]):
            out[j] = np.interp(xt[j], self.xs[j], self.zs[j])
        lo, hi = self.lo[:, None], self.hi[:, None]
        with np.errstate(invalid="ignore"):
            rows, cols = np.nonzero((xt > hi) | (xt < lo))  # a few per window
        if len(rows):
            v = xt[rows, cols]
            with np.errstate(over="ignore"):  # -1.7e308 below a positive knot: clipped
                d = np.clip(np.maximum(v - self.hi[rows], 0.0)
                            - np.maximum(self.lo[rows] - v, 0.0), -_MAX, _MAX)
            out[rows, cols] += np.sign(d) * np.log1p(np.abs(d) / self.sd[rows])
        return out

    def sort_and_apply(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``x`` (``(n, Fn)``) sorted per feature (``(Fn, n)``, NaN last) and its normal scores
        in ``x``'s own layout: one argsort serves both the binned tests, which need the sorted
        values, and the scores, which are fast on sorted values (at 300 features, 10 ms
        against 16 ms for a sort plus scores of the unsorted rows)."""
        xt = np.ascontiguousarray(x.T)
        perm = np.argsort(xt, axis=1)
        xs = np.take_along_axis(xt, perm, axis=1)
        scores = np.empty_like(xs)
        np.put_along_axis(scores, perm, self.apply_rows(xs), axis=1)
        return xs, scores.T


def _knots(col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values and the normal scores of their mid-ranks, thinned to
    :data:`MAX_KNOTS` knots evenly spaced in score (the ends always kept)."""
    u, counts = np.unique(col, return_counts=True)
    m = float(counts.sum())
    mid = (np.cumsum(counts) - 0.5 * counts) / m
    z = special.ndtri(mid)
    if len(u) > MAX_KNOTS:
        grid = np.linspace(z[0], z[-1], MAX_KNOTS)
        idx = np.unique(np.concatenate([[0, len(u) - 1],
                                        np.searchsorted(z, grid).clip(0, len(u) - 1)]))
        u, z = u[idx], z[idx]
    return u, z
