"""Label-free performance estimation: what a classifier's accuracy is, before its labels arrive.

A confidence-based estimator in the spirit of NannyML's CBPE. On a labelled reference it learns
how often the model is right at each level of confidence; on an unlabelled window it averages
that over the window's predictions. Under covariate shift (the inputs move, ``P(y | x)`` does
not) the expected accuracy of the window follows from its confidences alone.

* **Binary** (``proba`` is the probability of class 1): a monotone (isotonic) calibration
  ``q = P(y=1 | p)``; the model predicts 1 when ``p >= 0.5``. The expected confusion matrix
  gives accuracy, precision, recall and F1; ROC AUC is the expected AUC of the ranking by ``p``
  when row ``i`` is positive with probability ``q_i``.
* **Multiclass** (``proba`` is ``(n, k)``): a monotone calibration of correctness against the
  top-class probability, ``P(argmax is right | max p)``.

Each calibration is bagged: ``B`` isotonic fits on bootstrap resamples of the reference. The
estimate is their mean; their spread is the calibration's own uncertainty, which goes into the
band together with the window's sampling noise. ``reference_estimate`` is cross-fitted (every
reference row is scored by calibrators that never saw it), so it is an honest read of the
estimator's error on the reference.

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

__all__ = ["PerformanceEstimator", "MIN_REFERENCE_ROWS", "ESTIMATOR_VERSION"]

#: Fewer labelled reference rows than this cannot calibrate anything.
MIN_REFERENCE_ROWS = 30
ESTIMATOR_VERSION = 1
#: Bootstrap calibrators per estimator (their spread is the calibration uncertainty).
N_BAGS = 16
#: Knots kept per stored calibrator (a monotone piecewise-linear function).
MAX_KNOTS = 48
#: Pseudo-weight of the model's own probability per reference row (a prior that keeps a small
#: reference from reading 0% or 100% in empty corners).
PRIOR_WEIGHT = 0.05
CROSS_FOLDS = 5
Z95 = 1.959963984540054


# --- isotonic regression -----------------------------------------------------------------------
def _pav(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted isotonic (non-decreasing) regression of ``y`` on ``x``: the knots
    ``(x, value)`` of the fitted blocks, ``x`` being each block's weighted mean position."""
    order = np.argsort(x, kind="mergesort")
    x, y, w = x[order], y[order], w[order]
    ux, inv = np.unique(x, return_inverse=True)
    ws = np.bincount(inv, weights=w)
    ys = np.bincount(inv, weights=w * y) / ws
    xs = ux * ws
    vals: list[float] = []
    wts: list[float] = []
    xsum: list[float] = []
    for v, wt, xx in zip(ys.tolist(), ws.tolist(), xs.tolist()):
        vals.append(v)
        wts.append(wt)
        xsum.append(xx)
        while len(vals) > 1 and vals[-2] >= vals[-1]:
            v2, w2, x2 = vals.pop(), wts.pop(), xsum.pop()
            tot = wts[-1] + w2
            vals[-1] = (vals[-1] * wts[-1] + v2 * w2) / tot
            wts[-1] = tot
            xsum[-1] += x2
    wa = np.asarray(wts)
    return np.asarray(xsum) / wa, np.asarray(vals)


def _thin(kx: np.ndarray, ky: np.ndarray, max_knots: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_knots`` knots of the same monotone piecewise-linear function (resampled
    at evenly spaced knot ranks; the ends are kept)."""
    if len(kx) <= max_knots:
        return kx, ky
    pick = np.unique(np.round(np.linspace(0, len(kx) - 1, max_knots)).astype(int))
    return kx[pick], ky[pick]


def _fit_calibrator(x: np.ndarray, y: np.ndarray, prior: np.ndarray,
                    w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One monotone calibrator of ``y`` (0/1) on ``x``, shrunk towards ``prior`` (the model's
    own probability) with :data:`PRIOR_WEIGHT` pseudo-counts per row."""
    if w is None:
        w = np.ones_like(x)
    target = (y + PRIOR_WEIGHT * prior) / (1.0 + PRIOR_WEIGHT)
    kx, ky = _pav(x, target, w)
    return _thin(kx, ky, MAX_KNOTS)


def _bag(x: np.ndarray, y: np.ndarray, prior: np.ndarray, rng: np.random.Generator,
         n_bags: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_bags`` calibrators fitted on Poisson-bootstrap weights of the rows."""
    out = []
    for _ in range(n_bags):
        w = rng.poisson(1.0, len(x)).astype(np.float64)
        keep = w > 0
        out.append(_fit_calibrator(x[keep], y[keep], prior[keep], w[keep]))
    return out


def _apply(cals: Sequence[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    """``(len(cals), n)``: every calibrator evaluated at ``x`` (flat outside the knots)."""
    return np.stack([np.interp(x, kx, ky) for kx, ky in cals])


# --- input checks -------------------------------------------------------------------------------
def _as_proba(proba: Any, n_classes: int | None, *, exc: type[Exception]) -> np.ndarray:
    """``proba`` as float64: ``(n,)`` for binary, ``(n, k)`` for multiclass. A binary ``(n, 2)``
    array becomes its class-1 column. Raises ``exc`` on NaN, a wrong width or out-of-range
    values."""
    try:
        a = np.asarray(proba, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise exc(f"proba must be an array of numbers: {e}") from None
    if a.ndim == 2 and a.shape[1] == 2 and n_classes in (None, 2):
        a = a[:, 1]
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim not in (1, 2):
        raise exc(f"proba must be (n,) or (n, k), got shape {a.shape}")
    k = 2 if a.ndim == 1 else a.shape[1]
    if n_classes is not None and k != n_classes:
        raise exc(f"proba has {k} classes, the estimator was fitted on {n_classes}")
    if a.size and not np.isfinite(a).all():
        raise exc(f"proba has {int((~np.isfinite(a)).sum())} NaN or infinite values")
    if a.size and (a.min() < -1e-9 or a.max() > 1 + 1e-9):
        raise exc(f"proba must lie in [0, 1], got values in [{a.min():.4g}, {a.max():.4g}]")
    return np.clip(a, 0.0, 1.0)


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

    def __init__(self, n_classes: int, cals: list[tuple[np.ndarray, np.ndarray]],
                 reference_accuracy: float, reference_estimate: float, baseline: float,
                 baseline_sd: float, classes: list[Any] | None = None) -> None:
        self.n_classes = int(n_classes)
        self._cals = cals
        self.reference_accuracy = float(reference_accuracy)
        self.reference_estimate = float(reference_estimate)
        #: the estimate on the reference rows themselves (what an unshifted window reads on
        #: average): the level an estimated drop is measured from.
        self.baseline = float(baseline)
        #: standard deviation of one row's estimated correctness on the reference
        self.baseline_sd = float(baseline_sd)
        self.reference_rows = 0
        self.classes = classes

    @property
    def binary(self) -> bool:
        return self.n_classes == 2

    # -- fitting --
    @classmethod
    def fit(cls, proba: Any, labels: Any, *, classes: Sequence[Any] | None = None,
            seed: int = 0) -> "PerformanceEstimator":
        """Calibrate on a labelled reference. ``proba``: ``(n,)`` probabilities of class 1
        (binary) or ``(n, k)`` class probabilities; ``labels``: ``(n,)`` class indices (or names
        from ``classes``). Raises :class:`~lrwatch.errors.ConfigError` on too few rows, NaNs,
        labels outside the classes or a shape mismatch."""
        k_hint = len(classes) if classes is not None else None
        a = _as_proba(proba, k_hint, exc=ConfigError)
        k = 2 if a.ndim == 1 else a.shape[1]
        n = len(a)
        if n < MIN_REFERENCE_ROWS:
            raise ConfigError(f"performance estimation needs at least {MIN_REFERENCE_ROWS} "
                              f"labelled reference rows, got {n}")
        y = _as_labels(labels, n, k, classes)
        x, target, prior = cls._calibration_data(a, y)
        rng = np.random.default_rng(seed)
        cals = _bag(x, target, prior, rng, N_BAGS)
        est = cls(k, cals, reference_accuracy=0.0, reference_estimate=0.0, baseline=0.0,
                  baseline_sd=0.0, classes=list(classes) if classes is not None else None)
        correct = cls._correct(a, y)
        c_ref = est._row_correctness(a).mean(axis=0)
        est.reference_accuracy = float(correct.mean())
        est.baseline = float(c_ref.mean())
        est.baseline_sd = float(c_ref.std())
        est.reference_rows = n
        est.reference_estimate = cls._cross_fit(a, y, x, target, prior, rng)
        return est

    @staticmethod
    def _calibration_data(a: np.ndarray, y: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What the calibrator regresses: binary ``y`` on ``p``; multiclass correctness on the
        top-class probability. Returns ``(x, target, prior)``."""
        if a.ndim == 1:
            return a, y.astype(np.float64), a
        top = a.max(axis=1)
        return top, (a.argmax(axis=1) == y).astype(np.float64), top

    @staticmethod
    def _correct(a: np.ndarray, y: np.ndarray) -> np.ndarray:
        if a.ndim == 1:
            return ((a >= 0.5).astype(np.int64) == y).astype(np.float64)
        return (a.argmax(axis=1) == y).astype(np.float64)

    @classmethod
    def _cross_fit(cls, a, y, x, target, prior, rng) -> float:
        """Mean estimated correctness of the reference rows, each scored by calibrators fitted
        on the other folds."""
        n = len(y)
        fold = rng.permutation(n) % CROSS_FOLDS
        c = np.empty(n)
        for f in range(CROSS_FOLDS):
            tr, te = fold != f, fold == f
            cals = _bag(x[tr], target[tr], prior[tr], rng, max(2, N_BAGS // 4))
            tmp = cls(2 if a.ndim == 1 else a.shape[1], cals, 0, 0, 0, 0)
            c[te] = tmp._row_correctness(a[te]).mean(axis=0)
        return float(c.mean())

    # -- estimating --
    def _row_correctness(self, a: np.ndarray) -> np.ndarray:
        """``(B, n)``: per calibrator, each row's probability that the model is right."""
        if a.ndim == 1:
            q = _apply(self._cals, a)
            return np.where(a >= 0.5, q, 1.0 - q)
        return _apply(self._cals, a.max(axis=1))

    def estimate(self, proba: Any) -> dict[str, float]:
        """Estimated performance of one window of predictions (no labels). Keys: ``accuracy``,
        ``accuracy_low``/``accuracy_high`` (a ~95% band for the window's realised accuracy),
        ``records``, ``accuracy_drop`` (baseline minus estimate) and ``drop_z`` (that drop in
        standard errors); binary adds ``precision``, ``recall``, ``f1``, ``roc_auc`` where they
        are defined. Raises ``ValueError`` on a malformed array."""
        a = _as_proba(proba, self.n_classes, exc=ValueError)
        n = len(a)
        if n == 0:
            return {"records": 0.0}
        cb = self._row_correctness(a)
        c = cb.mean(axis=0)
        acc = float(c.mean())
        var_sampling = float((c * (1.0 - c)).sum()) / (n * n)
        var_cal = float(cb.mean(axis=1).var(ddof=1)) if len(cb) > 1 else 0.0
        half = Z95 * math.sqrt(var_sampling + var_cal)
        out = {"accuracy": acc, "accuracy_low": max(0.0, acc - half),
               "accuracy_high": min(1.0, acc + half), "records": float(n)}
        out.update(self._drop(c, acc))
        if self.binary:
            q = _apply(self._cals, a).mean(axis=0)
            out.update(_binary_metrics(a, q))
        return out

    def _drop(self, c: np.ndarray, acc: float) -> dict[str, float]:
        """How far the estimate fell below the baseline, in its own standard errors (the
        window's spread of estimated correctness and the reference's)."""
        n = len(c)
        m = max(self.reference_rows, 1)
        se = math.sqrt(float(c.var()) / n + self.baseline_sd ** 2 / m + 1e-12)
        drop = self.baseline - acc
        return {"accuracy_drop": drop, "drop_z": drop / se}

    # -- persistence --
    def to_dict(self) -> dict[str, Any]:
        """A small JSON-ready form (rounded knots), read back by :meth:`from_dict`."""
        return {
            "version": ESTIMATOR_VERSION, "kind": "confidence_isotonic_bagged",
            "n_classes": self.n_classes, "classes": self.classes,
            "reference_rows": self.reference_rows,
            "reference_accuracy": self.reference_accuracy,
            "reference_estimate": self.reference_estimate,
            "baseline": self.baseline, "baseline_sd": self.baseline_sd,
            "calibrators": [[np.round(kx, 6).tolist(), np.round(ky, 6).tolist()]
                            for kx, ky in self._cals],
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
            cals = [(np.asarray(kx, dtype=np.float64), np.asarray(ky, dtype=np.float64))
                    for kx, ky in d["calibrators"]]
            est = cls(int(d["n_classes"]), cals, float(d["reference_accuracy"]),
                      float(d["reference_estimate"]), float(d["baseline"]),
                      float(d["baseline_sd"]), d.get("classes"))
            est.reference_rows = int(d["reference_rows"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"estimator dict is malformed: {type(e).__name__}: {e}") from None
        _check_calibrators(cals, est.n_classes)
        return est


def _check_calibrators(cals: list[tuple[np.ndarray, np.ndarray]], k: int) -> None:
    if k < 2:
        raise ConfigError(f"estimator n_classes must be >= 2, got {k}")
    if not cals:
        raise ConfigError("estimator dict has no calibrators")
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
