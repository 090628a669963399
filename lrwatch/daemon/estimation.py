"""Label-free performance estimation: what a classifier's accuracy is, before its labels arrive.

A confidence-based estimator in the spirit of NannyML's CBPE. On a labelled reference it learns
how often the model is right at each level of confidence; on an unlabelled window it averages
that over the window's predictions. Under covariate shift (the inputs move, ``P(y | x)`` does
not) the expected accuracy of the window follows from its confidences alone.

* **Binary** (``proba`` is the probability of class 1): a calibration ``q = P(y=1 | p)``;
  the model predicts 1 when ``p >= 0.5``. The expected confusion matrix gives accuracy,
  precision, recall and F1; ROC AUC is the expected AUC of the ranking by ``p`` when row ``i``
  is positive with probability ``q_i``.
* **Multiclass** (``proba`` is ``(n, k)``): a calibration of correctness,
  ``P(argmax is right | confidence)``.

Two calibrator families, averaged by default (``method="blend"``): an isotonic fit on ``p`` or
the top-class probability, and a logistic one (``logit p``; multiclass ``logit(top)``,
``log(top / second)`` and the normalised entropy) whose ridge pulls it towards the model's own
probability, chosen per reference by cross-validation. Each is bagged (Poisson-bootstrap
weights of the reference): the estimate is the mean of the bags, their spread the calibration's
own uncertainty, which goes into the band together with the window's sampling noise.
``reference_estimate`` is cross-fitted (every reference row is scored by calibrators that never
saw it), so it is an honest read of the estimator's error on the reference. Measured in
``benchmarks/performance_estimation.py``; see ``docs/performance-estimation.md``.

Examples
--------
>>> rng = np.random.default_rng(0)
>>> p = rng.random(4000)
>>> y = (rng.random(4000) < p).astype(int)          # a calibrated binary model
>>> est = PerformanceEstimator.fit(p, y)
>>> r = est.estimate(rng.random(500))
>>> abs(r["accuracy"] - 0.75) < 0.03, r["accuracy_low"] < r["accuracy"] < r["accuracy_high"]
(True, True)
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import ConfigError
from .support import WITHHELD_REASON, confidence, support_check

__all__ = ["PerformanceEstimator", "drop_test", "MIN_REFERENCE_ROWS", "ESTIMATOR_VERSION",
           "PROBA_SUM_TOLERANCE", "WITHHELD_REASON"]

#: Fewer labelled reference rows than this cannot calibrate anything.
MIN_REFERENCE_ROWS = 30
#: A window's own spread of estimated correctness is used for its drop's standard error from
#: this many rows; a smaller window uses the reference's (see :func:`drop_test`).
MIN_SPREAD_ROWS = 30
ESTIMATOR_VERSION = 1
#: Bootstrap calibrators per estimator (their spread is the calibration uncertainty).
N_BAGS = 16
#: Isotonic blocks kept per stored calibrator (two knots each).
MAX_BLOCKS = 32
#: Calibrator families. The default, ``auto`` (the family with the best cross-validated Brier
#: score on the reference), had the lowest mean absolute error over every dataset and both
#: reference modes of benchmarks/performance_estimation.py and on streams outside it (see
#: docs/performance-estimation.md; per dataset the benchmark reports the leave-one-dataset-out
#: choice).
METHODS = ("isotonic", "logistic", "blend", "auto")
#: What ``auto`` chooses from, per reference, by cross-validated Brier score.
AUTO_CHOICES = ("isotonic", "logistic", "blend")
#: What ``blend`` averages.
BLENDED = ("isotonic", "logistic")
DEFAULT_METHOD = "auto"
#: Half-width of the band in standard errors.
BAND_Z = 1.959963984540054
#: The calibration's standard error (the spread of the bagged calibrators) is multiplied by
#: this before it enters the band: the bootstrap spread of a small reference understates how
#: far a fresh population can sit from it. 3.0 is the smallest that covered 95% of the
#: benchmark's unshifted and covariate-shifted windows with a disjoint reference (2.0 sufficed
#: with a shared one); per dataset the benchmark reports the leave-one-dataset-out choice.
CALIBRATION_SCALE = 3.0
#: Candidate ridges of the logistic calibrator (chosen per reference by cross-validation).
RIDGES = (1.0, 10.0, 100.0, 1000.0)
#: Isotonic only: pseudo-weight of the model's own probability per reference row (shrinks the
#: targets towards it). 0.1 lost to 0 in the benchmark, so it is off by default.
PRIOR_WEIGHT = 0.0
CROSS_FOLDS = 5
#: How far a row of class probabilities may sum from 1 (outputs rounded to two decimals, or
#: float16 softmaxes, pass; per-class sigmoid scores of a multi-label model do not). The
#: daemon refuses live lists off by more (``invalid_prediction``) while it estimates
#: performance.
PROBA_SUM_TOLERANCE = 0.05


# --- isotonic regression -----------------------------------------------------------------------
def _pav(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted isotonic (non-decreasing) regression of ``y`` on ``x`` by pool-adjacent-
    violators. Returns the fitted blocks as rows ``(x_first, x_last, value, weight)``."""
    order = np.argsort(x, kind="mergesort")
    x, y, w = x[order], y[order], w[order]
    ux, inv = np.unique(x, return_inverse=True)
    ws = np.bincount(inv, weights=w)
    ys = np.bincount(inv, weights=w * y) / ws
    blocks: list[list[float]] = []  # [x_first, x_last, value, weight]
    for xx, v, wt in zip(ux.tolist(), ys.tolist(), ws.tolist()):
        blocks.append([xx, xx, v, wt])
        while len(blocks) > 1 and blocks[-2][2] >= blocks[-1][2]:
            b = blocks.pop()
            a = blocks[-1]
            tot = a[3] + b[3]
            a[1], a[2], a[3] = b[1], (a[2] * a[3] + b[2] * b[3]) / tot, tot
    return np.asarray(blocks, dtype=np.float64).reshape(-1, 4)


def _knots(blocks: np.ndarray, max_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """The piecewise-linear calibrator of isotonic blocks: flat over each block, linear between
    blocks (in-sample it is the isotonic fit itself, so it keeps the reference's mean). Blocks
    beyond ``max_blocks`` are merged pairwise, lightest neighbours first (weighted means)."""
    b = blocks.tolist()
    while len(b) > max_blocks:
        i = min(range(len(b) - 1), key=lambda j: b[j][3] + b[j + 1][3])
        lo, hi = b[i], b[i + 1]
        tot = lo[3] + hi[3]
        b[i: i + 2] = [[lo[0], hi[1], (lo[2] * lo[3] + hi[2] * hi[3]) / tot, tot]]
    arr = np.asarray(b)
    kx = np.column_stack([arr[:, 0], arr[:, 1]]).ravel()
    ky = np.repeat(arr[:, 2], 2)
    return kx, np.clip(ky, 0.0, 1.0)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1.0 - 1e-6)
    return np.log(p) - np.log1p(-p)


def _score(a: np.ndarray) -> np.ndarray:
    """The one-dimensional confidence the isotonic calibrator reads: ``p`` (binary) or the
    top-class probability (multiclass)."""
    return a if a.ndim == 1 else a.max(axis=1)


def _design(a: np.ndarray) -> np.ndarray:
    """The logistic calibrator's inputs: binary ``[1, logit p]`` (Platt scaling); multiclass
    ``[1, logit(top), log(top / second), normalised entropy]``."""
    if a.ndim == 1:
        return np.column_stack([np.ones(len(a)), _logit(a)])
    part = np.partition(a, -2, axis=1)
    top, second = part[:, -1], part[:, -2]
    margin = np.log(np.clip(top, 1e-6, None)) - np.log(np.clip(second, 1e-6, None))
    pc = np.clip(a, 1e-12, 1.0)
    ent = -(pc * np.log(pc)).sum(axis=1) / math.log(a.shape[1])
    return np.column_stack([np.ones(len(a)), _logit(top), np.minimum(margin, 14.0), ent])


def _identity(width: int) -> np.ndarray:
    """The logistic coefficients that reproduce the model's own probability: 1 on
    ``logit(p)`` (binary) or ``logit(top)`` (multiclass), 0 elsewhere."""
    beta = np.zeros(width)
    beta[1] = 1.0
    return beta


def _fit_logistic(z: np.ndarray, y: np.ndarray, w: np.ndarray, ridge: float) -> np.ndarray:
    """Weighted logistic regression of soft targets ``y`` on ``z`` (damped Newton steps), with
    a ridge of ``ridge`` pulling the coefficients towards :func:`_identity` (the model's own
    probability): a small or well-calibrated reference stays close to the model, a clearly
    miscalibrated one moves away."""
    beta0 = _identity(z.shape[1])
    pen = np.full(z.shape[1], ridge)
    pen[0] = ridge * 1e-3

    def loss(b: np.ndarray) -> float:
        t = z @ b
        return float((w * (np.logaddexp(0.0, t) - y * t)).sum() + 0.5 * pen @ (b - beta0) ** 2)

    beta, cur = beta0.copy(), loss(beta0)
    for _ in range(50):
        m = 1.0 / (1.0 + np.exp(-np.clip(z @ beta, -30, 30)))
        g = z.T @ (w * (m - y)) + pen * (beta - beta0)
        h = (z * (w * m * (1.0 - m))[:, None]).T @ z + np.diag(pen + 1e-6)
        step = np.linalg.lstsq(h, g, rcond=None)[0]
        t = 1.0
        while t > 1e-4 and loss(beta - t * step) > cur:
            t *= 0.5
        new = loss(beta - t * step)
        if new > cur:
            break
        beta, done = beta - t * step, cur - new < 1e-10 * (1.0 + abs(cur))
        cur = new
        if done:
            break
    return beta


def _choose_ridge(a: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> float:
    """The ridge of :func:`_fit_logistic` with the best cross-validated log-loss on the
    reference (from :data:`RIDGES`)."""
    z = _design(a)
    fold = rng.permutation(len(target)) % 3
    best, best_loss = RIDGES[0], math.inf
    for ridge in RIDGES:
        loss = 0.0
        for f in range(3):
            tr, te = fold != f, fold == f
            beta = _fit_logistic(z[tr], target[tr], np.ones(int(tr.sum())), ridge)
            m = np.clip(1.0 / (1.0 + np.exp(-np.clip(z[te] @ beta, -30, 30))), 1e-6, 1 - 1e-6)
            loss -= float((target[te] * np.log(m) + (1 - target[te]) * np.log1p(-m)).sum())
        if loss < best_loss:
            best, best_loss = ridge, loss
    return best


def _fit_one(a: np.ndarray, target: np.ndarray, w: np.ndarray, method: str,
             prior_weight: float, ridge: float) -> Any:
    """One calibrator of ``target`` (0/1) on the predictions ``a``: isotonic knots
    ``(kx, ky)`` (targets shrunk towards the model's own probability with ``prior_weight``
    pseudo-counts per row) or logistic coefficients (ridge towards the model's own
    probability)."""
    if method == "logistic":
        return _fit_logistic(_design(a), target, w, ridge)
    prior = a if a.ndim == 1 else a.max(axis=1)
    t = (target + prior_weight * prior) / (1.0 + prior_weight)
    return _knots(_pav(_score(a), t, w), MAX_BLOCKS)


def _choose_method(a: np.ndarray, target: np.ndarray, rng: np.random.Generator,
                   prior_weight: float) -> str:
    """The calibrator family (:data:`AUTO_CHOICES`) with the lowest cross-validated Brier score
    of the reference rows' correctness: measured on the reference itself, because which one
    fits depends on the model (a logistic fit bends wrongly on a k-NN's or a boosted model's
    probabilities; isotonic steps are noisy on a small reference)."""
    fold = rng.permutation(len(target)) % CROSS_FOLDS
    best, best_score = AUTO_CHOICES[0], math.inf
    for method in AUTO_CHOICES:
        score = 0.0
        for f in range(CROSS_FOLDS):
            tr, te = fold != f, fold == f
            q = _apply(_bag(a[tr], target[tr], rng, 4, method, prior_weight), a[te],
                       method).mean(axis=0)
            score += float(((q - target[te]) ** 2).sum())
        if score < best_score:
            best, best_score = method, score
    return best


def _bag(a: np.ndarray, target: np.ndarray, rng: np.random.Generator, n_bags: int,
         method: str, prior_weight: float) -> Any:
    """``n_bags`` calibrators fitted on Poisson-bootstrap weights of the rows (the logistic
    ridge chosen once, by cross-validation on all of them); ``blend``: a dict of both."""
    if method == "blend":  # half the bags each, so that a window costs the same
        return {m: _bag(a, target, rng, max(2, n_bags // 2), m, prior_weight) for m in BLENDED}
    ridge = _choose_ridge(a, target, rng) if method == "logistic" else 0.0
    out = []
    for _ in range(n_bags):
        w = rng.poisson(1.0, len(target)).astype(np.float64)
        keep = w > 0
        out.append(_fit_one(a[keep], target[keep], w[keep], method, prior_weight, ridge))
    return out


def _apply(cals: Any, a: np.ndarray, method: str) -> np.ndarray:
    """``(len(cals), n)``: every calibrator's probability for each row of ``a`` (``blend``:
    the isotonic and the logistic bags stacked, so their mean is the average of the two)."""
    if method == "blend":
        return np.vstack([_apply(cals[m], a, m) for m in BLENDED])
    if method == "isotonic":
        x = _score(a)
        return np.stack([np.interp(x, kx, ky) for kx, ky in cals])
    z = _design(a)
    return 1.0 / (1.0 + np.exp(-np.clip(z @ np.stack(cals).T, -30, 30))).T


# --- input checks -------------------------------------------------------------------------------
def _as_proba(proba: Any, n_classes: int | None, *, exc: type[Exception]) -> np.ndarray:
    """``proba`` as float64: ``(n,)`` for binary, ``(n, k)`` for multiclass. A binary ``(n, 2)``
    array becomes its class-1 column. Raises ``exc`` on NaN, a wrong width, out-of-range
    values or rows of several columns that do not sum to 1."""
    try:
        a = np.asarray(proba, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise exc(f"proba must be an array of numbers: {e}") from None
    if a.ndim not in (1, 2):
        raise exc(f"proba must be (n,) or (n, k), got shape {a.shape}")
    if a.size and not np.isfinite(a).all():
        raise exc(f"proba has {int((~np.isfinite(a)).sum())} NaN or infinite values")
    if a.size and (a.min() < -1e-9 or a.max() > 1 + 1e-9):
        raise exc(f"proba must lie in [0, 1], got values in [{a.min():.4g}, {a.max():.4g}]")
    if a.ndim == 2 and a.shape[1] >= 2 and len(a):
        _check_sums(a, exc)
    if a.ndim == 2 and a.shape[1] == 2 and n_classes in (None, 2):
        a = a[:, 1]
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    k = 2 if a.ndim == 1 else a.shape[1]
    if n_classes is not None and k != n_classes:
        raise exc(f"proba has {k} classes, the estimator was fitted on {n_classes}")
    return np.clip(a, 0.0, 1.0)


def _check_sums(a: np.ndarray, exc: type[Exception]) -> None:
    """Rows of class probabilities must sum to 1 (within :data:`PROBA_SUM_TOLERANCE`): the
    top-class probability of per-class scores (one sigmoid per class, a multi-label model)
    says nothing about how often the arg max is right, and such a window read as
    probabilities made up an estimate (``[0.9, 0.9, 0.9]`` read 92% for a model of 68%)."""
    sums = a.sum(axis=1)
    off = np.abs(sums - 1.0) > PROBA_SUM_TOLERANCE
    if off.any():
        i = int(np.argmax(off))
        raise exc(f"{int(off.sum())} of {len(a)} proba rows do not sum to 1 (row {i} sums to "
                  f"{sums[i]:.4g}; tolerance {PROBA_SUM_TOLERANCE}): send class probabilities "
                  f"(a softmax), not per-class scores")


def _as_labels(labels: Any, n: int, k: int, classes: Sequence[Any] | None) -> np.ndarray:
    """Labels as class indices 0..k-1 (class names are looked up in ``classes``)."""
    raw = np.asarray(labels)
    if raw.ndim != 1 or len(raw) != n:
        raise ConfigError(f"labels must be a flat array of {n} entries (one per proba row), "
                          f"got shape {raw.shape}")
    if classes is not None:
        index = {str(c): i for i, c in enumerate(classes)}
        if all(str(v) in index for v in raw.tolist()):
            return np.array([index[str(v)] for v in raw.tolist()], dtype=np.int64)
    try:
        f = raw.astype(np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"labels must be class indices 0..{k - 1} (or names from classes="
                          f"{list(classes) if classes is not None else None})") from None
    if np.isnan(f).any():
        raise ConfigError(f"labels have {int(np.isnan(f).sum())} NaN entries; drop the "
                          "unlabelled rows before fitting")
    bad = (f != np.round(f)) | (f < 0) | (f > k - 1)
    if bad.any():
        raise ConfigError(f"{int(bad.sum())} labels are outside the classes 0..{k - 1} "
                          f"(first: {raw[bad][0]!r})")
    return f.astype(np.int64)


# --- the estimator ------------------------------------------------------------------------------
class PerformanceEstimator:
    """Estimates a classifier's accuracy (and, binary, precision/recall/F1/ROC AUC) from its
    predicted probabilities alone. Build it with :meth:`fit` on a labelled reference."""

    def __init__(self, n_classes: int, cals: list[Any], *, method: str = "blend",
                 classes: list[Any] | None = None) -> None:
        if method not in AUTO_CHOICES:
            raise ConfigError(f"unknown calibration method {method!r}; choose one of "
                              f"{AUTO_CHOICES}")
        self.n_classes = int(n_classes)
        self.method = method
        self._cals = cals
        self.classes = classes
        self.reference_rows = 0
        #: realised accuracy of the model on the labelled reference
        self.reference_accuracy = math.nan
        #: cross-fitted estimate on the reference (each row scored by calibrators that never
        #: saw it): the estimator's honest read of the reference
        self.reference_estimate = math.nan
        #: the estimate on the reference rows themselves: what an unshifted window reads on
        #: average, the level an estimated drop is measured from
        self.baseline = math.nan
        #: standard deviation of one reference row's estimated correctness
        self.baseline_sd = 0.0
        #: the reference's largest confidence and how many of its rows reached it: the top of
        #: the range the calibration saw (``None``: an estimator saved before they were kept,
        #: whose windows are not checked against it; see :mod:`.support`)
        self.support_top: float | None = None
        self.support_top_rows = 0

    @property
    def binary(self) -> bool:
        return self.n_classes == 2

    # -- fitting --
    @classmethod
    def fit(cls, proba: Any, labels: Any, *, classes: Sequence[Any] | None = None,
            method: str = DEFAULT_METHOD, prior_weight: float = PRIOR_WEIGHT,
            n_bags: int = N_BAGS, seed: int = 0) -> "PerformanceEstimator":
        """Calibrate on a labelled reference. ``proba``: ``(n,)`` probabilities of class 1
        (binary; ``(n, 2)`` works too) or ``(n, k)`` class probabilities; ``labels``: ``(n,)``
        class indices (or names listed in ``classes``). Raises
        :class:`~lrwatch.errors.ConfigError` on too few rows, NaNs, labels outside the classes,
        a shape mismatch, rows of class probabilities that do not sum to 1, or a reference
        with nothing to calibrate on (binary labels of one class; a multiclass model right, or
        wrong, on every row; one confidence on every row)."""
        if method not in METHODS:
            raise ConfigError(f"unknown estimation method {method!r}; choose one of {METHODS}")
        if n_bags < 2 or not 0.0 <= prior_weight < 10.0:
            raise ConfigError(f"n_bags must be >= 2 and prior_weight in [0, 10), got "
                              f"{n_bags}, {prior_weight}")
        k_hint = len(classes) if classes is not None else None
        a = _as_proba(proba, k_hint, exc=ConfigError)
        k = 2 if a.ndim == 1 else a.shape[1]
        if len(a) < MIN_REFERENCE_ROWS:
            raise ConfigError(f"performance estimation needs at least {MIN_REFERENCE_ROWS} "
                              f"labelled reference rows, got {len(a)}")
        y = _as_labels(labels, len(a), k, classes)
        target = y.astype(np.float64) if a.ndim == 1 else (a.argmax(axis=1) == y) * 1.0
        if target.min() == target.max():
            raise ConfigError(_one_sided(a, y))
        conf = _score(a)
        if conf.min() == conf.max():
            raise ConfigError(
                f"the model's confidence is {conf[0]:.4g} on every one of the {len(a)} "
                f"labelled reference rows (hard one-hot outputs, or a constant model): the "
                f"estimator learns how often the model is right at each confidence, and there "
                f"is only one (send the model's probabilities)")
        rng = np.random.default_rng(seed)
        if method == "auto":
            method = _choose_method(a, target, rng, prior_weight)
        est = cls(k, _bag(a, target, rng, n_bags, method, prior_weight), method=method,
                  classes=list(classes) if classes is not None else None)
        c_ref = est._row_correctness(a).mean(axis=0)
        est.reference_rows = len(a)
        est.reference_accuracy = float(_correct(a, y).mean())
        est.baseline = float(c_ref.mean())
        est.baseline_sd = float(c_ref.std())
        est.reference_estimate = est._cross_fit(a, target, rng, prior_weight)
        top = confidence(a)
        est.support_top = float(top.max())
        est.support_top_rows = int((top >= est.support_top).sum())
        return est

    def _cross_fit(self, a: np.ndarray, target: np.ndarray, rng: np.random.Generator,
                   prior_weight: float) -> float:
        """Mean estimated correctness of the reference rows, each row scored by calibrators
        fitted on the other folds."""
        fold = rng.permutation(len(target)) % CROSS_FOLDS
        c = np.empty(len(target))
        for f in range(CROSS_FOLDS):
            tr, te = fold != f, fold == f
            cals = _bag(a[tr], target[tr], rng, 4, self.method, prior_weight)
            c[te] = self._row_correctness(a[te], cals).mean(axis=0)
        return float(c.mean())

    # -- estimating --
    def correctness(self, proba: Any) -> np.ndarray:
        """``(n,)``: each row's estimated probability that the model is right (the mean over
        the bagged calibrators; the window's estimate is their mean). Raises ``ValueError`` on
        a malformed array, as :meth:`estimate` does."""
        return self._row_correctness(_as_proba(proba, self.n_classes, exc=ValueError)).mean(axis=0)

    def _row_correctness(self, a: np.ndarray, cals: list[Any] | None = None) -> np.ndarray:
        """``(B, n)``: per calibrator, each row's probability that the model is right."""
        q = _apply(self._cals if cals is None else cals, a, self.method)
        if a.ndim == 1:
            return np.where(a >= 0.5, q, 1.0 - q)
        return q

    def estimate(self, proba: Any, *, check_support: bool = True,
                 share_test: bool | None = None) -> dict[str, float]:
        """Estimated performance of one window of predictions (no labels).

        Keys: ``accuracy``, ``accuracy_low``/``accuracy_high`` (a ~95% band for the window's
        realised accuracy: the window's sampling noise and the calibration's spread, also given
        apart as ``accuracy_se_window`` and ``accuracy_se_calibration``), ``records``,
        ``accuracy_drop`` (baseline minus estimate) and ``drop_z`` (that drop in standard
        errors); binary adds ``precision``, ``recall``, ``f1`` and ``roc_auc`` where
        they are defined. ``support_pvalue`` and ``confidence_above_reference`` say whether
        the window's confidences lie inside the range the reference calibrated
        (:mod:`.support`); a window outside it (hard 0/1 or one-hot outputs: every row at
        confidence 1.0) has its estimate **withheld**: ``withheld`` 1.0 and NaN for
        everything estimated (``check_support=False`` skips the check: what the calibration
        would extrapolate; ``share_test`` overrides :data:`.support.SHARE_TEST`, whether the
        share of rows at the reference's largest confidence decides too). An empty window gives ``records`` 0 and NaN accuracies. Raises
        ``ValueError`` on a malformed array (wrong width, NaN, values outside [0, 1], rows
        that do not sum to 1)."""
        a = _as_proba(proba, self.n_classes, exc=ValueError)
        n = len(a)
        if n == 0:
            return _withheld(0, {})
        support = self._support(a, share_test) if check_support else {}
        if support.get("withheld"):
            return _withheld(n, support)
        qb = _apply(self._cals, a, self.method)
        cb = np.where(a >= 0.5, qb, 1.0 - qb) if a.ndim == 1 else qb
        c = cb.mean(axis=0)
        acc = float(c.mean())
        var_sampling = float((c * (1.0 - c)).sum()) / (n * n)
        var_cal = float(cb.mean(axis=1).var(ddof=1)) * CALIBRATION_SCALE ** 2
        half = BAND_Z * math.sqrt(var_sampling + var_cal)
        out = {"accuracy": acc, "accuracy_low": max(0.0, acc - half),
               "accuracy_high": min(1.0, acc + half), "records": float(n),
               "accuracy_se_window": math.sqrt(var_sampling),
               "accuracy_se_calibration": math.sqrt(var_cal), **support}
        out.update(self._drop(c, acc))
        if self.binary:
            out.update(_binary_metrics(a, qb.mean(axis=0)))
        return out

    def _support(self, a: np.ndarray, share_test: bool | None = None) -> dict[str, float]:
        """The window against the top of the reference's confidences (:mod:`.support`):
        ``support_pvalue``, ``confidence_above_reference`` and, outside, ``withheld``. Empty
        for an estimator saved before the reference's top was kept."""
        if self.support_top is None:
            return {}
        s = support_check(confidence(a), top=self.support_top, top_rows=self.support_top_rows,
                          reference_rows=self.reference_rows, share_test=share_test)
        out = {"support_pvalue": s["pvalue"], "confidence_above_reference": s["above_share"]}
        if s["outside"]:
            out["withheld"] = 1.0
        return out

    def _drop(self, c: np.ndarray, acc: float) -> dict[str, float]:
        """How far the estimate fell below the baseline, in standard errors of that difference
        (:func:`drop_test`)."""
        z = drop_test(c, self.baseline, self.baseline_sd, self.reference_rows)
        return {"accuracy_drop": self.baseline - acc, "drop_z": z}

    # -- persistence --
    def to_dict(self) -> dict[str, Any]:
        """A small JSON-ready form (rounded), read back by :meth:`from_dict`."""
        if self.method == "blend":
            cals: Any = {m: _dump_calibrators(self._cals[m], m) for m in BLENDED}
        else:
            cals = _dump_calibrators(self._cals, self.method)
        return {
            "version": ESTIMATOR_VERSION, "method": self.method,
            "n_classes": self.n_classes, "classes": self.classes,
            "reference_rows": self.reference_rows,
            "reference_accuracy": self.reference_accuracy,
            "reference_estimate": self.reference_estimate,
            "baseline": self.baseline, "baseline_sd": self.baseline_sd,
            "calibrators": cals,
            **({} if self.support_top is None else {
                "support_top": self.support_top, "support_top_rows": self.support_top_rows}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PerformanceEstimator":
        """The estimator :meth:`to_dict` wrote. Raises :class:`ConfigError` on a bad or
        unsupported dict."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"estimator must be a mapping, got {type(d).__name__}")
        if d.get("version") != ESTIMATOR_VERSION:
            raise ConfigError(f"unsupported estimator version {d.get('version')!r} "
                              f"(this lrwatch reads {ESTIMATOR_VERSION}); refit it")
        try:
            method = str(d["method"])
            k = int(d["n_classes"])
            cals = _load_calibrators(d["calibrators"], method, k)
            est = cls(k, cals, method=method, classes=d.get("classes"))
            est.reference_rows = int(d["reference_rows"])
            for key in ("reference_accuracy", "reference_estimate", "baseline", "baseline_sd"):
                setattr(est, key, float(d[key]))
            if d.get("support_top") is not None:   # (absent: saved before 6 December)
                est.support_top = float(d["support_top"])
                est.support_top_rows = int(d["support_top_rows"])
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"estimator dict is malformed: {type(e).__name__}: {e}") from None
        if not (math.isfinite(est.baseline) and math.isfinite(est.baseline_sd)):
            raise ConfigError("estimator dict has a non-finite baseline")
        if est.support_top is not None and not (
                0.0 <= est.support_top <= 1.0 and 1 <= est.support_top_rows <= est.reference_rows):
            raise ConfigError(f"estimator dict's support_top ({est.support_top}) must be a "
                              f"confidence in [0, 1] reached by 1..reference_rows "
                              f"({est.reference_rows}) rows, got {est.support_top_rows}")
        return est


def drop_test(c: np.ndarray, baseline: float, baseline_sd: float, reference_rows: int, *,
              pooled: bool = True) -> float:
    """``(baseline - mean(c)) / se``: the drop of a window whose rows' estimated correctness is
    ``c`` from the reference's ``baseline`` (mean over ``reference_rows`` rows, spread
    ``baseline_sd``), in standard errors of the difference of the two means.

    ``pooled`` (the default): one spread for both, the rows' pooled variance, so ``se^2 =
    s^2 (1/n + 1/m)``, the two-sample statistic of "window and reference come from one
    population". Unpooled (each mean its own sample's spread: what shipped until the
    seventeenth round), a small reference that happens to be easier than the stream reads its
    own spread on the same lucky rows, too small (60 rows with few hard ones), and unshifted
    windows alarmed (8 of 10 in one generated case; docs/performance-estimation.md). A window of
    fewer than :data:`MIN_SPREAD_ROWS` rows is too small to measure its own spread (one row's
    is 0, and its drop read dozens of standard errors): the reference's stands in for it, the
    spread the window has when nothing moved."""
    m, n = max(int(reference_rows), 1), len(c)
    v_ref = baseline_sd ** 2
    v_win = float(c.var()) if n >= MIN_SPREAD_ROWS else v_ref
    if pooled:
        s2 = (n * v_win + m * v_ref) / (n + m)
        var = s2 / n + s2 / m
    else:
        var = v_win / n + v_ref / m
    return (baseline - float(c.mean())) / math.sqrt(var + 1e-12)


def _withheld(n: int, support: Mapping[str, float]) -> dict[str, float]:
    """The estimate of a window with nothing to say: empty (``records`` 0), or outside the
    reference's confidences (``support`` has ``withheld``): NaN for everything estimated."""
    nan = math.nan
    return {"accuracy": nan, "accuracy_low": nan, "accuracy_high": nan, "records": float(n),
            "accuracy_se_window": nan, "accuracy_se_calibration": nan,
            "accuracy_drop": nan, "drop_z": nan, **support}


def _one_sided(a: np.ndarray, y: np.ndarray) -> str:
    """Why a reference whose calibration target never varies cannot be fitted: binary labels
    of one class (every class-1 prediction read as wrong, for sure), or a multiclass model
    right (or wrong) on every row, which pinned every window's estimate at 100% with a band
    of zero width, whatever its confidences, so the drop rule could never fire."""
    n = len(y)
    if a.ndim == 1:
        return (f"the reference's {n} labels are all {int(y[0])}: the estimator learns how "
                f"often the model is right at each confidence from labelled rows of both "
                f"classes (add labelled rows of class {1 - int(y[0])})")
    right = bool(a[0].argmax() == y[0])
    return (f"the model is {'right' if right else 'wrong'} on every one of the {n} labelled "
            f"reference rows: the estimator learns how its accuracy changes with its "
            f"confidence from rows it gets right and wrong (add labelled rows it gets "
            f"{'wrong' if right else 'right'}: a larger or harder sample)")


def _correct(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """1.0 where the model's prediction (``p >= 0.5`` or the argmax) equals the label."""
    if a.ndim == 1:
        return ((a >= 0.5).astype(np.int64) == y).astype(np.float64)
    return (a.argmax(axis=1) == y).astype(np.float64)


def _dump_calibrators(cals: list[Any], method: str) -> list[Any]:
    if method == "isotonic":
        return [[np.round(kx, 8).tolist(), np.round(ky, 8).tolist()] for kx, ky in cals]
    return [np.round(b, 8).tolist() for b in cals]


def _load_calibrators(raw: Any, method: str, k: int) -> Any:
    """The stored calibrators as arrays, checked (ConfigError naming what is wrong)."""
    if method not in AUTO_CHOICES:
        raise ConfigError(f"unknown calibration method {method!r}; choose one of "
                          f"{AUTO_CHOICES}")
    if k < 2:
        raise ConfigError(f"estimator n_classes must be >= 2, got {k}")
    if method == "blend":
        if not isinstance(raw, dict) or set(raw) != set(BLENDED):
            raise ConfigError(f"blend calibrators must be a mapping with keys {BLENDED}")
        return {m: _load_calibrators(raw[m], m, k) for m in BLENDED}
    if not isinstance(raw, list) or len(raw) < 2:
        raise ConfigError("estimator dict needs a list of at least 2 calibrators")
    if method == "logistic":
        cals = [np.asarray(b, dtype=np.float64) for b in raw]
        width = 2 if k == 2 else 4
        if any(b.shape != (width,) or not np.isfinite(b).all() for b in cals):
            raise ConfigError(f"logistic calibrators must be {width} finite coefficients each")
        return cals
    cals = [(np.asarray(kx, dtype=np.float64), np.asarray(ky, dtype=np.float64))
            for kx, ky in raw]
    _check_calibrators(cals)
    return cals


def _check_calibrators(cals: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Isotonic knots: two flat finite arrays of one length, sorted, values in [0, 1]."""
    for kx, ky in cals:
        if kx.ndim != 1 or kx.shape != ky.shape or len(kx) == 0:
            raise ConfigError("estimator calibrator knots must be two flat arrays of one length")
        if not (np.isfinite(kx).all() and np.isfinite(ky).all()):
            raise ConfigError("estimator calibrator knots contain NaN or infinite values")
        if (np.diff(kx) < 0).any() or ky.min() < 0 or ky.max() > 1:
            raise ConfigError("estimator calibrator knots must be sorted with values in [0, 1]")


def _binary_metrics(p: np.ndarray, q: np.ndarray) -> dict[str, float]:
    """Expected precision, recall, F1 (the expected confusion matrix at threshold 0.5) and the
    expected ROC AUC of the ranking by ``p`` (row ``i`` positive with probability ``q_i``)."""
    pred = p >= 0.5
    tp = float(q[pred].sum())
    fp = float((1.0 - q[pred]).sum())
    fn = float(q[~pred].sum())
    out: dict[str, float] = {}
    if tp + fp > 0:
        out["precision"] = tp / (tp + fp)
    if tp + fn > 0:
        out["recall"] = tp / (tp + fn)
    if 2 * tp + fp + fn > 0:
        out["f1"] = 2 * tp / (2 * tp + fp + fn)
    auc = _expected_auc(p, q)
    if auc is not None:
        out["roc_auc"] = auc
    return out


def _expected_auc(p: np.ndarray, q: np.ndarray) -> float | None:
    """``E[#(pos, neg) pairs ranked right] / E[#(pos, neg) pairs]``, ties counting half."""
    order = np.argsort(p, kind="mergesort")
    ps, qs = p[order], q[order]
    neg = 1.0 - qs
    _, start, counts = np.unique(ps, return_index=True, return_counts=True)
    grp_neg = np.add.reduceat(neg, start)
    below = np.concatenate([[0.0], np.cumsum(grp_neg)[:-1]])  # negatives strictly below
    gid = np.repeat(np.arange(len(start)), counts)
    num = qs * (below[gid] + 0.5 * grp_neg[gid]) - 0.5 * qs * neg  # drop the self pair
    total_q = float(qs.sum())
    den = total_q * (len(qs) - total_q) - float((qs * neg).sum())
    if den <= 1e-9:
        return None
    return float(min(1.0, max(0.0, num.sum() / den)))
