"""Regression versus the best value so far: a sequential probability ratio test (SPRT)."""

from __future__ import annotations

import math
from collections import deque
from typing import ClassVar, Mapping

from .base import Detector, Param

__all__ = ["Regression"]

_DIFFS = 16  # second differences kept for the noise estimate


class Regression(Detector):
    """Fires when an evaluation metric is, with confidence, worse than its best so far.

    Each value's *gap* to the best level so far (worse is positive; the best is tracked on an
    EWMA of the values so a single lucky evaluation does not set an unreachable bar) feeds a
    cumulative log-likelihood ratio (Wald's SPRT, restarted at zero whenever it would go
    negative, i.e. in CUSUM form)::

        H0: gap = tol          (within noise of the best)    tol = tolerance * sigma + min_delta
        H1: gap = tol + effect                                effect = max(sigma, min_delta)
        llr = max(0, llr + effect / sigma^2 * (gap - tol - effect / 2))

    It fires when ``llr > log(1 / (1 - confidence))``. The noise ``sigma`` comes from the
    median absolute *second* difference of the last 16 values (a linear trend, such as a slow
    regression, cancels out, and the median ignores a few jumps), inflated when there are few, and a value is judged
    before it enters the estimate. A new best restarts the test. Unlike a fixed patience, a large
    regression fires after one or two evaluations and a small one after as many as the evidence
    needs.

    Parameters
    ----------
    mode:
        ``min`` (lower is better, e.g. ``eval_loss``) or ``max`` (e.g. ``eval_accuracy``).
    confidence:
        Confidence that the metric regressed before firing.
    tolerance:
        Allowed gap to the best, in noise standard deviations.
    min_delta:
        Allowed gap in the metric's units (for metrics with almost no noise).
    smooth:
        EWMA weight used to track the best level (1 = the raw best value).
    warmup:
        Values before the first decision.

    Notes
    -----
    False alarms: on a long noisy plateau the best level drifts about ``sqrt(2 log n)`` smoothed
    standard deviations below the mean, so the chance of one false alarm grows with the number
    of evaluations: in simulation (Gaussian plateaus, ``confidence=0.99``, ``tolerance=3``)
    about 9% of 100-evaluation runs fire once and half of 1000-evaluation runs; raise
    ``tolerance`` or ``min_delta`` for very long runs. A metric that genuinely gets worse
    (over-fitting) fires, which is the point.
    With very few evaluations ``sigma`` is poorly known; ``warmup`` guards the first ones.
    Memory: O(1) (16 differences).

    Examples
    --------
    >>> import random
    >>> rng = random.Random(4)
    >>> det = Regression(mode="min", confidence=0.99)
    >>> evals = [2.0 / (1 + 0.3 * i) + rng.gauss(0, 0.01) for i in range(20)]   # improving
    >>> evals += [evals[-1] + 0.03 * i + rng.gauss(0, 0.01) for i in range(1, 11)]  # regressing
    >>> [i for i, x in enumerate(evals) if det.update(x)]
    [24, 25, 26, 27, 28, 29]
    """

    name: ClassVar[str] = "regression"
    PARAMS: ClassVar[Mapping[str, Param]] = {
        "mode": Param(str, "which direction is better", choices=("min", "max")),
        "confidence": Param(float, "confidence before firing", min=0.5, min_open=True,
                            max=0.999999),
        "tolerance": Param(float, "allowed gap in noise standard deviations", min=0),
        "min_delta": Param(float, "allowed gap in the metric's units", min=0),
        "smooth": Param(float, "EWMA weight for the best level", min=0, min_open=True, max=1),
        "warmup": Param(int, "values before the first decision", min=2),
    }
    _STATE = ("n", "prev", "prev2", "level", "best", "diffs", "llr", "sigma")
    _NO_NAN = ("prev", "prev2", "best", "diffs", "llr", "sigma")  # level: inf - inf

    def __init__(self, *, mode: str = "min", confidence: float = 0.95, tolerance: float = 3.0,
                 min_delta: float = 0.0, smooth: float = 0.3, warmup: int = 3) -> None:
        self._set_params(mode=mode, confidence=confidence, tolerance=tolerance,
                         min_delta=min_delta, smooth=smooth, warmup=warmup)
        self._bound = math.log(1.0 / (1.0 - self.confidence))
        self._n = 0
        self._prev = self._prev2 = self._level = self._best = 0.0
        self._diffs: deque[float] = deque(maxlen=_DIFFS)
        self._llr = 0.0
        self._sigma: float | None = None

    @property
    def best(self) -> float | None:
        """The best (smoothed) level so far, in the metric's units."""
        if self._n == 0:
            return None
        return self._best if self.mode == "min" else -self._best

    @property
    def sigma(self) -> float | None:
        """The noise estimate used for the latest decision."""
        return self._sigma

    @property
    def statistic(self) -> float:
        """The log-likelihood ratio of "regressed" against "within noise of the best"."""
        return self._llr

    @property
    def bound(self) -> float:
        """The log-likelihood ratio that fires."""
        return self._bound

    def update(self, x: float, t: float | None = None) -> bool | None:
        if not math.isfinite(x):
            return None
        y = x if self.mode == "min" else -x  # from here on, larger is worse
        self._n += 1
        if self._n == 1:
            self._prev = self._prev2 = self._level = self._best = y
            return None
        diffs = self._diffs
        self._level += self.smooth * (y - self._level)
        verdict: bool | None = None
        if self._level < self._best:
            self._best = self._level
            self._llr = 0.0
            verdict = False
        elif diffs:
            # median |x_t - 2 x_{t-1} + x_{t-2}| of iid noise is 0.6745 * sqrt(6) * sigma, and a
            # linear trend (a slow regression) cancels out; few differences give a noisy
            # estimate, so inflate it (as a t quantile would)
            s = sorted(diffs)
            k = len(s)
            med = s[k // 2] if k % 2 else 0.5 * (s[k // 2 - 1] + s[k // 2])
            sigma = max(med / 1.6522 * math.sqrt(1.0 + 4.0 / k), self.min_delta * 0.5,
                        1e-12 * max(abs(self._best), 1.0))
            self._sigma = sigma
            tol = self.tolerance * sigma + self.min_delta
            effect = max(sigma, self.min_delta)
            llr = self._llr + effect / (sigma * sigma) * (y - self._best - tol - 0.5 * effect)
            self._llr = min(max(0.0, llr), 1e12)  # capped: a huge gap must not overflow to inf
            verdict = self._llr > self._bound
        if self._n >= 3:
            diffs.append(abs(y - 2.0 * self._prev + self._prev2))
        self._prev2, self._prev = self._prev, y
        return verdict if self._n >= self.warmup else None
