"""The joint (multivariate) drift test: has a numeric feature lost its relation to the others?

Per-feature tests compare marginals, so they are blind when every feature keeps its own
distribution but the correlation between them changes (a feature decorrelated from the rest,
a pipeline that joins columns from different rows). This module models each numeric input
feature as a linear function of all the others, fitted on the reference's row sample, and tests
per window whether the prediction errors grew (or shrank). Categorical input features take
part as indicator columns of their frequent levels (:mod:`.indicators`), and numeric ones on
their reference normal scores (:mod:`.scale`); the model sees only columns.

Model. The reference sample is standardised (missing values imputed with the reference mean,
i.e. 0 after standardising) and its Gram matrix ``G = Z'Z + ridge * m * I`` inverted once:
``P = G^-1``. The residual of feature ``j`` regressed on all the others (ordinary least squares,
with intercept) is ``(z P)_j / P_jj``, for every ``j`` at once, so a window costs one
``(n, p) @ (p, p)`` product. The per-row statistic is the absolute standardised residual
``u_j = |e_j|``; a window's statistic is its mean per feature, compared with the reference
mean by a z-test with variance ``var(u_j) (1/n + 1/m)`` like the per-feature mean test.

Reference values come from **leave-one-out** residuals (closed form for least squares:
``r_ij / (1 - h_ij)`` with ``h_ij`` the leverage of row ``i`` in the regression without column
``j``), so they are out-of-sample like the residuals of live rows: the mean ``|e|`` of
in-sample residuals is smaller by about ``p/m`` (3% at 300 features and 10,000 rows, more than
a 1000-record window's standard error), which would make the test fire on unshifted traffic.

Why this statistic and not PCA reconstruction error (NannyML's): decorrelating feature ``j``
(with ``R^2_j`` of it explained by the others) multiplies its residual variance by
``(1 + R^2) / (1 - R^2)``, which one feature's residual sees in full, while a single
reconstruction error or Mahalanobis distance spreads it over ``p`` dimensions (its z grows like
``1/sqrt(p)``). docs/drift-joint.md has the measurements.

Coefficient error. The ``1/m`` term treats the reference's error as sampling error of ``m``
rows, which holds when the regression's coefficients are well determined (over 150 wine
references of 5000 rows the population's mean ``|e|`` under each reference's fit sat
``1.01 sd / sqrt(m)`` from the reference's own mean). With many features for few rows the fit's
coefficient error adds to it (1.2 instead of 1 at 60 features and 300 rows): the fitted
regression misfits the population by a random amount, and the leave-one-out mean, which
estimates the error of an average fit, not of this one, does not see it. Gaussian theory puts
the extra variance at ``c p / m`` in units of the sampling term (``c`` about 3.5 for Gaussian
residuals, counting the leave-one-out mean's anti-correlation with the fit's error), more
generally ``c m p / (m - p)^2``. :meth:`JointModel.reference_inflation` measures ``c`` on the
reference by refitting on random halves and scoring the other half, bounds it by
:data:`COEF_ERROR_MAX`, and returns ``kappa = 1 + c m p / (m - p)^2``: the joint test then uses
``kappa / m`` where it used ``1 / m`` (an effective reference of ``m / kappa`` rows).

Calibration is :mod:`.calibrate`'s: the ``p`` joint dimensions join the per-feature tests in the
same maximum over standardised scores, and their sums join the sequential scan. A window's mean
``|e|`` keeps some of the rows' right skew (about ``1/sqrt(n)`` of it), so the detector maps each
joint z to the normal scale with that measured skewness before folding it
(:func:`.calibrate.unskew`), and the Gaussian maximum holds in both tails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .reference import PREDICTION

__all__ = ["JointModel", "RIDGE", "MIN_ROWS_PER_FEATURE", "MIN_WINDOW_ROWS", "gap_rows"]

#: Ridge on the standardised Gram matrix (relative to the rows): keeps exactly collinear
#: features (a column that is the sum of others) invertible at a negligible cost in power.
RIDGE = 1e-4
#: A joint test needs at least this many reference rows per joint feature (plus 20).
MIN_ROWS_PER_FEATURE = 2
#: Fewest rows a window keeps for its joint test when rows are left out (:func:`gap_rows`).
MIN_WINDOW_ROWS = 20
#: Upper bound of the measured coefficient-error constant ``c`` (the module notes): above the
#: Gaussian theory's 3.5, so a noisy measurement on a large reference, where ``p / m`` makes the
#: term negligible anyway, cannot inflate it more than theory allows.
COEF_ERROR_MAX = 4.0
#: Random halves :meth:`JointModel.reference_inflation` refits on.
INFLATION_SPLITS = 24
#: The per-row statistic: ``"abs"`` (``|e|``) or ``"square"`` (``e^2``), see :func:`_row_stat`.
ROW_STAT = "abs"


@dataclass
class JointModel:
    """Each joint feature regressed on the others (see the module notes).

    ``cols`` index the columns of the numeric matrix (``Profile.num`` order) the model uses;
    ``names`` name them. ``w`` maps a standardised row to its standardised residuals.
    """

    names: list[str]
    cols: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    w: np.ndarray
    rows: int

    def __post_init__(self) -> None:
        # the window path: a view when the columns are contiguous (the usual case: all numeric
        # features but the prediction), and the product in float32 (several times faster than
        # float64 at 300 features; the window is standardised first, so nothing large cancels)
        lo = int(self.cols[0]) if len(self.cols) else 0
        contiguous = np.array_equal(self.cols, np.arange(lo, lo + len(self.cols)))
        self._take: slice | np.ndarray = slice(lo, lo + len(self.cols)) if contiguous \
            else self.cols
        self._inv_scale = 1.0 / self.scale
        self._w32 = self.w.astype(np.float32)

    @classmethod
    def fit(cls, x: np.ndarray, names: Sequence[str]) -> "JointModel | None":
        """Fit on the reference's numeric sample ``x`` (``(m, Fn)``, NaN missing; columns named
        ``names``). The prediction, constant columns and columns missing in more than half of
        the rows are left out. ``None`` when fewer than 2 features remain or the sample is too
        small for them (``m < MIN_ROWS_PER_FEATURE * p + 20``)."""
        m = x.shape[0]
        present = (~np.isnan(x)).sum(axis=0)
        with np.errstate(invalid="ignore"):
            sd = np.nanstd(x, axis=0) if m else np.zeros(x.shape[1])
        keep = [j for j, n in enumerate(names) if n != PREDICTION and present[j] * 2 > m
                and np.isfinite(sd[j]) and sd[j] > 1e-12 * max(1.0, abs(np.nanmean(x[:, j])))]
        p = len(keep)
        if p < 2 or m < MIN_ROWS_PER_FEATURE * p + 20:
            return None
        cols = np.asarray(keep, dtype=np.int64)
        mean = np.nanmean(x[:, cols], axis=0)
        scale = sd[cols]
        z = _standardise(x[:, cols], mean, scale)
        z -= z.mean(axis=0)  # exact centring after imputation (the intercept)
        prec = _precision(z)
        w = prec / np.sqrt(np.diag(prec))[None, :]
        return cls(names=[names[j] for j in keep], cols=cols, mean=mean, scale=scale,
                   w=w * math.sqrt(m), rows=m)

    @property
    def dims(self) -> int:
        return len(self.names)

    def residuals(self, x: np.ndarray) -> np.ndarray:
        """``(n, p)`` per-row statistics ``|e|`` of live rows ``x`` (``(n, Fn)``, NaN missing)."""
        z = _standardise(x[:, self.cols], self.mean, self.scale)
        return _row_stat(z @ self.w)

    def window_sums(self, x: np.ndarray, present: np.ndarray | None = None) -> np.ndarray:
        """Sum over the window's rows of each joint feature's ``|e|`` (``(p,)``).

        ``present`` (per column of ``x``: how many values are not missing) lets a window
        without missing values skip the search for them."""
        z = np.multiply(x[:, self._take] - self.mean, self._inv_scale, dtype=np.float32)
        complete = bool(np.all(present[self.cols] >= x.shape[0])) if present is not None \
            else False
        if not complete:
            z[np.isnan(z)] = 0.0
        return _row_stat(z @ self._w32).sum(axis=0, dtype=np.float64)

    def loo_residuals(self, x: np.ndarray) -> np.ndarray:
        """``(m, p)`` leave-one-out ``|e|`` of the reference rows the model was fitted on."""
        z = _standardise(x[:, self.cols], self.mean, self.scale)
        z -= z.mean(axis=0)
        return _loo_stat(z, _precision(z))

    def reference_inflation(self, x: np.ndarray, rng: np.random.Generator,
                            splits: int = INFLATION_SPLITS) -> float:
        """``kappa >= 1``: the reference's error in the joint means, in units of the ``1/m``
        sampling term, coefficient error included (module notes).

        Each split fits on ``a`` random rows (half, or ``MIN_ROWS_PER_FEATURE p + 20`` if more)
        and scores the other ``b``: ``D = mean_b |e| - loo_mean_a`` has variance
        ``kappa(a) s^2 / a + s^2 / b``, so ``kappa(a) = a D^2 / s^2 - a / b`` (pooled over
        features and splits); ``c`` follows from ``kappa(a) - 1 = c a p / (a - p)^2``.
        Without room for a split (fewer than 20 rows left to score) ``c`` is the bound."""
        z = _standardise(x[:, self.cols], self.mean, self.scale)
        m, p = z.shape
        a = max(m // 2, MIN_ROWS_PER_FEATURE * p + 20)
        c = COEF_ERROR_MAX
        if m - a >= 20 and a > p + 1:
            b = m - a
            vals = []
            for _ in range(splits):
                idx = rng.permutation(m)
                za, zb = z[idx[:a]], z[idx[a:]]
                centre = za.mean(axis=0)
                za = za - centre
                prec = _precision(za)
                loo = _loo_stat(za, prec)
                w = prec / np.sqrt(np.diag(prec))[None, :] * math.sqrt(a)
                d = _row_stat((zb - centre) @ w).mean(axis=0) - loo.mean(axis=0)
                s2 = np.maximum(loo.var(axis=0), 1e-24)
                vals.append(a * d ** 2 / s2 - a / b)
            excess = float(np.mean(vals)) - 1.0
            c = min(max(excess / (a * p / (a - p) ** 2), 0.0), COEF_ERROR_MAX)
        return 1.0 + c * m * p / (m - p) ** 2


def gap_rows(x: np.ndarray, gapped: Sequence[int], ref_rate: Sequence[float]) -> np.ndarray:
    """Rows of window ``x`` the joint test keeps when columns ``gapped`` are missing far more
    often than in the reference (``ref_rate``: their reference missing shares).

    Imputed with the reference mean, a column missing in the window makes the features it
    helps predict look unrelated to the others: the joint test named *them* as drifting. So
    the rows where a gapped column is missing are left out, but for as many as keep its
    reference share among the rows kept (the reference's residuals include rows imputed at
    that share: leaving them all out would shrink the residuals of its neighbours).

    >>> x = np.array([[1.0, np.nan], [2.0, 1.0], [3.0, np.nan], [4.0, 2.0], [5.0, np.nan]])
    >>> gap_rows(x, [1], [0.0]).tolist()
    [False, True, False, True, False]
    >>> gap_rows(x, [1], [1 / 3]).tolist()     # 2 present rows: one missing row kept
    [True, True, False, True, False]
    """
    keep = np.ones(x.shape[0], dtype=bool)
    for c, rate in zip(gapped, ref_rate):
        miss = np.isnan(x[:, c]) & keep
        present = int(keep.sum()) - int(miss.sum())
        share = min(max(float(rate), 0.0), 0.99)
        allowed = int(round(share / (1.0 - share) * present))
        drop = np.flatnonzero(miss)[allowed:]
        keep[drop] = False
    return keep


def _loo_stat(z: np.ndarray, prec: np.ndarray) -> np.ndarray:
    """Leave-one-out per-row statistics of centred rows ``z`` with precision ``prec``.

    For least squares the residual of row ``i`` from the model fitted without it is
    ``r_i / (1 - h_i)``; regressing column ``j`` on the others, ``h_ij = h_i - r_ij^2 P_jj``
    with ``h_i = 1/m + z_i' P z_i`` the leverage in the regression on all columns."""
    m = z.shape[0]
    zp = z @ prec
    h = 1.0 / m + np.einsum("ij,ij->i", zp, z)
    pjj = np.diag(prec)
    r = zp / pjj  # raw residual of column j regressed on the rest
    hj = h[:, None] - r ** 2 * pjj
    loo = r / np.clip(1.0 - hj, 1e-6, None)
    return _row_stat(loo * np.sqrt(pjj * m))


def _row_stat(e: np.ndarray) -> np.ndarray:
    """The per-row statistic of standardised residuals: ``|e|`` (``e^2`` has heavier tails
    and a worse-calibrated extreme; docs/drift-joint.md)."""
    if ROW_STAT == "abs":
        return np.abs(e, out=e)
    return np.multiply(e, e, out=e)


def _standardise(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    z = (x - mean) / scale
    z[np.isnan(z)] = 0.0
    return z


def _precision(z: np.ndarray) -> np.ndarray:
    """Inverse of the ridge-regularised Gram matrix of centred rows ``z``."""
    m, p = z.shape
    g = z.T @ z
    g[np.diag_indices(p)] += RIDGE * m
    return np.linalg.inv(g)
