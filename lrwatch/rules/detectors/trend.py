"""Trend: a t-test on the least-squares slope over a sliding window."""

from __future__ import annotations

import math
from collections import deque
from functools import lru_cache
from statistics import NormalDist
from typing import Any, ClassVar, Mapping

from .base import Detector, Param

__all__ = ["Trend", "t_quantile"]


def _t_two_sided(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3-4, exact)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:  # odd
        if df == 1:
            return 2.0 * theta / math.pi
        term = acc = math.cos(theta)
        for k in range(3, df - 1, 2):
            term *= c2 * (k - 1) / k
            acc += term
        return 2.0 / math.pi * (theta + math.sin(theta) * acc)
    term = acc = 1.0
    for k in range(2, df - 1, 2):
        term *= c2 * (k - 1) / k
        acc += term
    return math.sin(theta) * acc


@lru_cache(maxsize=256)
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (``p > 0.5``) of Student's t with ``df`` degrees of freedom.

    Exact to 1e-9 (bisection on the closed-form CDF), stdlib only, computed once per
    confidence and window (a replay builds every detector afresh for each trace).

    >>> round(t_quantile(0.975, 30), 3), round(t_quantile(0.99, 5), 3)
    (2.042, 3.365)
    """
    if df > 200:  # Cornish-Fisher: error far below 1e-4 here, and no O(df) series
        z = NormalDist().inv_cdf(p)
        z2 = z * z
        return z + z * (z2 + 1) / (4 * df) + z * (5 * z2 * z2 + 16 * z2 + 3) / (96 * df * df)
    target = 2.0 * p - 1.0
    lo, hi = 0.0, max(1.0, NormalDist().inv_cdf(p))
    while _t_two_sided(hi, df) < target:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_two_sided(mid, df) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-10:
            break
    return 0.5 * (lo + hi)


_INF = math.inf
#: Values beyond this magnitude are skipped: the running sums hold squares and products with
#: indices, which would overflow to infinity (or make math.fsum raise) past about 1e154.
_MAX_ABS = 1e150

class Trend(Detector):
    """Fires when the slope over the last ``window`` values is significantly up (or down).

    The statistic is the ordinary least-squares slope of the values against their index, divided
    by its standard error: Student-t with ``window - 2`` degrees of freedom under "no trend".
    Sums are updated incrementally (O(1) per value) and recomputed exactly every ``window``
    values so rounding errors cannot build up.

    Parameters
    ----------
    window:
        Number of values the slope is fitted to (decisions start when it is full).
    confidence:
        One-sided confidence level of the test.
    direction:
        ``up`` (increasing fires) or ``down``.
    min_change:
        Smallest relative change over the window that may fire: ``|slope| * (window - 1) /
        |mean|``; keeps tiny but significant drifts of a very smooth series quiet. With
        ``log``, the change of ``log(x)`` over the window itself (``|slope| * (window - 1)``:
        0.01 is about 1%, 0.5 a fall to 0.61x).
    log:
        Fit ``log(x)`` (values ``<= 0`` get no decision).

    Notes
    -----
    False alarms: about ``1 - confidence`` per decision for independent noise, but decisions on
    overlapping windows are correlated, and autocorrelated metrics (a loss that oscillates
    slowly) violate the test's assumption and alarm more; use ``min_change`` and ``for:``.
    Memory: ``O(window)``.

    Examples
    --------
    >>> import random
    >>> rng = random.Random(3)
    >>> det = Trend(window=30, confidence=0.999, min_change=0.1)
    >>> xs = [1 + rng.gauss(0, 0.05) for _ in range(100)]
    >>> xs += [1 + 0.02 * i + rng.gauss(0, 0.05) for i in range(40)]
    >>> hits = [i for i, x in enumerate(xs) if det.update(x)]
    >>> 100 < hits[0] < 125
    True
    """

    name: ClassVar[str] = "trend"
    PARAMS: ClassVar[Mapping[str, Param]] = {
        "window": Param(int, "values the slope is fitted to", min=5, keeps=True),
        "confidence": Param(float, "one-sided confidence level", min=0.5, min_open=True,
                            max=0.999999),
        "direction": Param(str, "which slope fires", choices=("up", "down")),
        "min_change": Param(float, "smallest relative change over the window", min=0),
        "log": Param(bool, "fit log(x)"),
    }
    _STATE = ("buf", "sy", "syy", "sty", "since", "t")

    def __init__(self, *, window: int = 50, confidence: float = 0.99, direction: str = "up",
                 min_change: float = 0.0, log: bool = False) -> None:
        self._set_params(window=window, confidence=confidence, direction=direction,
                         min_change=min_change, log=log)
        self._crit = t_quantile(self.confidence, self.window - 2)
        self._buf: deque[float] = deque(maxlen=self.window)
        self._sy = self._syy = self._sty = 0.0  # sums of y, y^2, index*y (index 0 = oldest)
        self._since = 0
        self._t: float | None = None

    @property
    def critical_value(self) -> float:
        """The t value that fires."""
        return self._crit

    @property
    def statistic(self) -> float | None:
        """The latest t statistic of the slope."""
        return self._t

    @property
    def slope(self) -> float | None:
        """Least-squares slope per value over the window (``None`` until it is full)."""
        n = len(self._buf)
        if n < self.window:
            return None
        return (self._sty - 0.5 * (n - 1) * self._sy) / (n * (n * n - 1) / 12.0)

    def _recompute(self) -> None:
        self._sy = math.fsum(self._buf)
        self._syy = math.fsum(y * y for y in self._buf)
        self._sty = math.fsum(i * y for i, y in enumerate(self._buf))
        self._since = 0

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if len(state["buf"]) > self.window:
            # a state of a longer window (replay with the rule's window edited): the deque
            # kept its last values; the sums were of them all
            self._recompute()

    def update(self, x: float, t: float | None = None) -> bool | None:
        if self.log:
            if not 0.0 < x < _INF:   # not finite, or not positive
                return None
            y = math.log(x)
        elif not math.isfinite(x):
            return None
        else:
            y = x
        if abs(y) > _MAX_ABS:   # its square would overflow the sums: skipped like a NaN
            return None
        buf, window = self._buf, self.window
        sy, syy, sty = self._sy, self._syy, self._sty   # (locals: the replay's hot path)
        if len(buf) == window:  # drop the oldest (index 0), every index shifts down by one
            old = buf.popleft()
            sy -= old
            syy -= old * old
            sty -= sy
        sty += len(buf) * y
        sy += y
        syy += y * y
        buf.append(y)
        self._since += 1
        if self._since >= window:
            self._recompute()
            sy, syy, sty = self._sy, self._syy, self._sty
        else:
            self._sy, self._syy, self._sty = sy, syy, sty
        n = len(buf)
        if n < window:
            return None
        sxx = n * (n * n - 1) / 12.0
        sxy = sty - 0.5 * (n - 1) * sy
        syy = syy - sy * sy / n
        b = sxy / sxx
        rss = max(syy - b * sxy, 0.0)
        se = math.sqrt(rss / (n - 2) / sxx)
        if se > 1e-12 * (abs(sy) / n + 1e-300):
            tt = b / se
        else:
            tt = 0.0 if b == 0 else math.copysign(1e12, b)  # exact line: significant if sloped
        self._t = tt
        if self.direction == "down":
            tt = -tt
        if tt <= self._crit:
            return False
        change = abs(b) * (n - 1)
        mean = abs(sy / n)
        if self.log:
            return change > self.min_change
        return change > self.min_change * mean
