"""A label-free drop signal from the inputs: how often small classifiers fitted on the labelled
reference's inputs disagree with the served model's decisions, against how often they did on
reference rows they never saw.

The confidence-based estimate (:mod:`.estimation`) cannot see an accuracy drop that leaves the
model confident: noisier inputs (a degraded sensor) cost a model 4 points or more while its
confidences barely move. Two classifiers that agree on clean inputs disagree more often on
noisy ones, where their decision boundaries differ (the agreement-based estimation line of
work: Jiang et al. 2022, "Assessing generalization of SGD via disagreement"; Baek et al. 2022,
"Agreement-on-the-line"). The auxiliaries are :data:`BAGS` linear discriminants (a shrunk
pooled covariance on standardised numeric inputs) fitted on Poisson-bootstrap reweightings of
the labelled reference; each keeps its disagreement with the served model on its out-of-bag
rows as its own null level. A window's statistic::

    rise = mean over the bags of (disagreement on the window - out-of-bag disagreement)
    z = rise / sqrt(d0 (1 - d0) / n + var over the bags of the rises)

(``d0``: the out-of-bag disagreement of all bags together, add-one smoothed; floored at the
binomial variance of window and reference, ``d0 (1 - d0) (1/n + 1/m)``), and never above the
exact binomial tail of the window's disagreeing rows at ``d0`` (small windows). The bags' spread is
the reference's own uncertainty: a small reference's null level is off for a stream of other
rows, and the spread says by how much. Measured in ``benchmarks/disagreement_check.py``
(docs/performance-estimation.md, "Input disagreement").

Pure numpy. Missing inputs count as the reference's mean (0 after standardising); an input
missing from half the labelled reference rows or more is not used.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> x = rng.standard_normal((400, 3)); y = (x[:, 0] + 0.3 * rng.standard_normal(400) > 0) * 1
>>> p = 1 / (1 + np.exp(-4 * x[:, 0]))          # the served model: class-1 probability
>>> mon = InputDisagreement.fit(["a", "b", "c"], x, p, y)
>>> clean = rng.standard_normal((500, 3))
>>> round(mon.window(clean, 1 / (1 + np.exp(-4 * clean[:, 0])))["disagreement_z"]) < 3
True
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.special import bdtrc, ndtri

from ..errors import ConfigError
from . import finite_stats

__all__ = ["InputDisagreement", "BAGS", "MIN_ROWS", "AGREEMENT_VERSION"]

#: Bootstrap refits of the auxiliary discriminant.
BAGS = 8
#: Weight of the identity (scaled to the mean variance) in the pooled covariance.
SHRINK = 0.2
#: Labelled reference rows with inputs the fit needs (the estimator's minimum too).
MIN_ROWS = 30
#: An input present in fewer of the labelled reference rows is left out: read as its mean on
#: most rows, it would make a window where it is present look shifted.
MIN_PRESENT = 0.5
AGREEMENT_VERSION = 1
#: Standardised inputs are clipped to this many reference spreads: an input near 1e308 made
#: the discriminants' products overflow (numpy's raw warnings on stderr, and NaN decisions);
#: this far out every discriminant decides by the input's sign alone anyway.
MAX_Z = 1e6
_MAX = float(np.finfo(np.float64).max)


def decisions(proba: np.ndarray) -> np.ndarray:
    """The served model's decision per row: ``p >= 0.5`` (binary) or the arg max."""
    return (proba >= 0.5).astype(np.int64) if proba.ndim == 1 else proba.argmax(axis=1)


def _fit_lda(z: np.ndarray, y: np.ndarray, w: np.ndarray, k: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """A linear discriminant on rows ``z`` weighted by ``w``: ``(d, k)`` weights and ``(k,)``
    offsets. A class with no weight gets the overall mean and the smallest prior."""
    tot = w.sum()
    overall = (w[:, None] * z).sum(0) / tot
    counts = np.bincount(y, weights=w, minlength=k)
    sums = np.zeros((k, z.shape[1]))
    np.add.at(sums, y, w[:, None] * z)
    mus = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1e-12)[:, None], overall)
    r = z - mus[y]
    s = (w[:, None] * r).T @ r / max(tot - k, 1.0)
    s = (1 - SHRINK) * s + SHRINK * max(float(np.trace(s)) / len(s), 1e-6) * np.eye(len(s))
    coef = np.linalg.solve(s, mus.T)
    return coef, -0.5 * np.sum(mus * coef.T, axis=1) + np.log(counts + 1.0)


def _binomial_z(rate: float, n: int, d0: float) -> float:
    """The exact binomial tail of ``rate * n`` (rounded down) disagreeing rows of ``n`` at the
    null level ``d0``, as a standard normal quantile. The normal approximation fails on small
    windows: two records of two that the discriminants decide otherwise read ``z`` 4.3 (at
    ``d0`` 9%; one record of one, 4.4 at ``d0`` 5%), which happens on about 1 unshifted window
    in 100 (in 20); their exact tails are ``d0 ** 2`` (z 2.4) and ``d0`` (z 1.6)."""
    k = math.floor(rate * n + 1e-9)
    if k <= 0:
        return math.inf
    return float(-ndtri(max(float(bdtrc(k - 1, n, d0)), 1e-300)))


def _rounded(a: Any) -> list[Any]:
    """``a`` rounded to 8 decimals for the saved form; a value beyond 1e300 as it is (rounding
    multiplies by 1e8: a mean near 1e308 became infinite)."""
    a = np.asarray(a, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.where(np.abs(a) < 1e300, np.round(a, 8), a).tolist()


class InputDisagreement:
    """Bagged discriminants on the reference's numeric inputs (see the module notes)."""

    def __init__(self, names: Sequence[str], mean: np.ndarray, scale: np.ndarray,
                 coefs: Sequence[np.ndarray], offsets: Sequence[np.ndarray],
                 nulls: Sequence[float], null_pooled: float, reference_rows: int) -> None:
        self.names = list(names)
        self.mean, self.scale = mean, scale
        self.coefs, self.offsets = list(coefs), list(offsets)
        self.nulls = np.asarray(nulls, dtype=np.float64)
        self.null_pooled = float(null_pooled)
        self.reference_rows = int(reference_rows)

    @classmethod
    def fit(cls, names: Sequence[str], x: np.ndarray, proba: np.ndarray, labels: np.ndarray,
            n_classes: int | None = None, seed: int = 0) -> "InputDisagreement":
        """Fit on the labelled reference rows' numeric inputs ``x`` (``(m, d)``, NaN for
        missing), the model's probabilities and the labels (class indices); inputs present
        in under :data:`MIN_PRESENT` of the rows are left out of :attr:`names`. Raises
        :class:`ConfigError` when it cannot (no numeric input, too few rows)."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(labels, dtype=np.int64)
        m = len(y)
        if x.ndim != 2 or x.shape[1] == 0 or x.shape[1] != len(names):
            raise ConfigError("no numeric inputs to fit the input-disagreement signal on")
        if m < MIN_ROWS or x.shape[0] != m:
            raise ConfigError(f"the input-disagreement signal needs {MIN_ROWS} labelled "
                              f"reference rows with inputs, got {m}")
        present = np.isfinite(x).mean(axis=0) >= MIN_PRESENT
        if not present.any():
            raise ConfigError(f"no numeric input is present in {MIN_PRESENT:.0%} of the "
                              f"labelled reference rows")
        names, x = [n for n, keep in zip(names, present) if keep], x[:, present]
        k = int(n_classes or max(int(y.max()) + 1, 2))
        fin = np.isfinite(x)
        mean = np.array([finite_stats.mean(x[fin[:, j], j]) if fin[:, j].any() else 0.0
                         for j in range(x.shape[1])])
        with np.errstate(over="ignore"):  # values near 1e308 of both signs: clipped
            z0 = np.clip(np.where(fin, x - mean, 0.0), -_MAX, _MAX)
        scale = finite_stats.rms(z0, axis=0)  # (a sum of squares near 1e308 overflowed)
        scale = np.where(scale > 1e-12, scale, 1.0)
        z = z0 / scale
        dec = decisions(np.asarray(proba, dtype=np.float64))
        rng = np.random.default_rng(seed)
        coefs, offsets, nulls, wrong, seen = [], [], [], 0.0, 0
        for _ in range(BAGS):
            w = rng.poisson(1.0, m).astype(np.float64)
            coef, off = _fit_lda(z, y, w, k)
            oob = w == 0
            miss = (z[oob] @ coef + off).argmax(axis=1) != dec[oob]
            coefs.append(coef)
            offsets.append(off)
            nulls.append(float(miss.mean()) if oob.any() else 0.0)
            wrong, seen = wrong + float(miss.sum()), seen + int(oob.sum())
        return cls(names, mean, scale, coefs, offsets, nulls, (wrong + 1) / (seen + 2), m)

    def window(self, x: np.ndarray, proba: np.ndarray) -> dict[str, float]:
        """``disagreement`` (the bags' mean share of the window's rows decided otherwise),
        ``disagreement_rise`` (its rise over the out-of-bag level) and ``disagreement_z``.
        ``x`` holds this signal's inputs in :attr:`names` order; an empty window gives NaN."""
        n = len(proba)
        if n == 0:
            return {"disagreement": math.nan, "disagreement_rise": math.nan,
                    "disagreement_z": math.nan}
        with np.errstate(over="ignore", invalid="ignore"):  # inputs near 1e308: clipped
            z = np.clip(np.where(np.isfinite(x), (x - self.mean) / self.scale, 0.0),
                        -MAX_Z, MAX_Z)
        dec = decisions(np.asarray(proba, dtype=np.float64))
        rates = np.array([float(((z @ c + o).argmax(axis=1) != dec).mean())
                          for c, o in zip(self.coefs, self.offsets)])
        rises = rates - self.nulls
        d0 = self.null_pooled
        var = max(d0 * (1 - d0) / n + float(rises.var(ddof=1)),
                  d0 * (1 - d0) * (1 / n + 1 / self.reference_rows))
        rise = float(rises.mean())
        return {"disagreement": float(rates.mean()), "disagreement_rise": rise,
                "disagreement_z": min(rise / math.sqrt(var),
                                      _binomial_z(float(rates.mean()), n, d0))}

    def to_dict(self) -> dict[str, Any]:
        r = _rounded
        return {"version": AGREEMENT_VERSION, "names": self.names, "mean": r(self.mean),
                "scale": r(self.scale), "coefs": [r(c) for c in self.coefs],
                "offsets": [r(o) for o in self.offsets], "nulls": r(self.nulls),
                "null_pooled": self.null_pooled, "reference_rows": self.reference_rows}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "InputDisagreement":
        """What :meth:`to_dict` wrote; :class:`ConfigError` on a bad or other version."""
        if not isinstance(d, Mapping) or d.get("version") != AGREEMENT_VERSION:
            raise ConfigError(f"unsupported input-disagreement version "
                              f"{d.get('version') if isinstance(d, Mapping) else d!r}; "
                              f"rebuild the reference")
        try:
            names = [str(s) for s in d["names"]]
            mon = cls(names, np.array(d["mean"], dtype=np.float64),
                      np.array(d["scale"], dtype=np.float64),
                      [np.array(c, dtype=np.float64) for c in d["coefs"]],
                      [np.array(o, dtype=np.float64) for o in d["offsets"]],
                      d["nulls"], float(d["null_pooled"]), int(d["reference_rows"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"input-disagreement dict is malformed: {e}") from None
        d_in = len(names)
        if mon.mean.shape != (d_in,) or mon.scale.shape != (d_in,) or len(mon.coefs) < 2 \
                or any(c.ndim != 2 or c.shape[0] != d_in for c in mon.coefs) \
                or len(mon.nulls) != len(mon.coefs) or len(mon.offsets) != len(mon.coefs):
            raise ConfigError("input-disagreement dict's shapes do not match its inputs")
        return mon
