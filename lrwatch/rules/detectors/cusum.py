"""CUSUM: cumulative sums of standardised deviations from a slowly moving reference."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping

from .base import DIRECTIONS, Detector, Param

__all__ = ["Cusum"]


class Cusum(Detector):
    """Tabular CUSUM (Page 1954) on ``z = (y - mean) / sd``.

    The reference mean and variance are learnt from the first ``warmup`` values and then follow
    the stream slowly (EWMA with weight ``alpha``), so a training loss that keeps improving is not
    a change. ``S+ = max(0, S+ + z - k)`` and ``S- = max(0, S- - z - k)``; the detector fires when
    the sum of the watched ``direction`` exceeds ``h`` and then restarts that sum at zero, so a
    change is reported once and a persisting shift only fires again after it accumulates anew.

    Parameters
    ----------
    k:
        Slack in standard deviations (half the shift it is tuned to detect fastest).
    h:
        Decision threshold in standard deviations.
    warmup:
        Values used to learn the reference before the first decision.
    alpha:
        EWMA weight with which the reference keeps following the stream (0 freezes it).
    direction:
        ``up``, ``down`` or ``both``.
    log:
        Work on ``log(x)`` (values ``<= 0`` get no decision).
    min_scale:
        Lower bound of the standard deviation, for flat series.
    scale:
        How the standard deviation is measured. ``level``: the spread of the values themselves
        (Welford over the warm-up, then the EWMA). ``diff``: the run's own step-to-step noise,
        ``E[(y_t - y_{t-1})^2] / 2`` (von Neumann), over the warm-up and then by the same EWMA.
        A trend -- a training loss that falls by orders of magnitude in its first steps --
        inflates the spread of the values but hardly their differences, so ``level`` on such a
        stream is blind to a shift of several noise units that ``diff`` sees.
    restart:
        ``true``: a sum that crosses ``h`` fires once and starts over at zero (a persisting
        shift fires again after it accumulates anew). ``false``: the sum is kept (capped at
        ``2 h``) and the detector stays anomalous while it is above ``h``, so a rule on it stays
        firing for as long as the shift lasts, and a rule on that rule can ask for persistence
        (``for``); the cap bounds how long it takes to come back below ``h`` once the shift is
        over (at least ``h / k`` values).

    Notes
    -----
    False alarms: the average run length between false alarms of Gaussian noise is about 465
    values for ``k=0.5, h=5`` (and grows quickly with ``h``: ~2e4 for ``h=8``). Autocorrelated
    metrics (a smoothed loss) alarm more often; difference them or raise ``h``. Memory: O(1).

    Examples
    --------
    >>> import random
    >>> rng = random.Random(1)
    >>> det = Cusum(k=0.5, h=8.0, warmup=50)
    >>> xs = [rng.gauss(0, 1) for _ in range(200)] + [rng.gauss(2, 1) for _ in range(50)]
    >>> hits = [i for i, x in enumerate(xs) if det.update(x)]
    >>> hits[0] >= 200, hits[0] < 210
    (True, True)
    """

    name: ClassVar[str] = "cusum"
    PARAMS: ClassVar[Mapping[str, Param]] = {
        "k": Param(float, "slack in standard deviations", min=0),
        "h": Param(float, "threshold in standard deviations", min=0, min_open=True),
        "warmup": Param(int, "values that learn the reference", min=2),
        "alpha": Param(float, "EWMA weight of the reference after warm-up", min=0, max=1),
        "direction": Param(str, "which side fires", choices=DIRECTIONS),
        "log": Param(bool, "work on log(x)"),
        "min_scale": Param(float, "lower bound of the standard deviation", min=0, min_open=True),
        "scale": Param(str, "the standard deviation of the values (level) or of their "
                            "step-to-step differences / sqrt 2 (diff)", choices=("level", "diff")),
        "restart": Param(bool, "start the sum over at zero when it fires (false: stay "
                               "anomalous while it is above h)"),
    }
    _STATE = ("n", "mean", "var", "hi", "lo", "prev")

    def __init__(self, *, k: float = 0.5, h: float = 5.0, warmup: int = 30, alpha: float = 0.01,
                 direction: str = "both", log: bool = False, min_scale: float = 1e-9,
                 scale: str = "level", restart: bool = True) -> None:
        self._set_params(k=k, h=h, warmup=warmup, alpha=alpha, direction=direction, log=log,
                         min_scale=min_scale, scale=scale, restart=restart)
        self._n = 0
        self._mean = 0.0
        self._var = 0.0  # Welford's M2 during warm-up, the variance afterwards
        self._hi = 0.0
        self._lo = 0.0
        self._prev: float | None = None  # the previous value (scale="diff")
        # the sum that crossed h on the latest update (the sums restart at 0 when they fire,
        # so without it an alarm would report 0); not state: it describes one update only
        self._crossed: float | None = None

    @property
    def mean(self) -> float:
        return self._mean

    @property
    def statistic(self) -> float:
        """The larger of the watched cumulative sums (on an alarm: the sum that crossed ``h``)."""
        if self._crossed is not None:
            return self._crossed
        if self.direction == "up":
            return self._hi
        if self.direction == "down":
            return self._lo
        return max(self._hi, self._lo)

    def update(self, x: float, t: float | None = None) -> bool | None:
        self._crossed = None
        if not math.isfinite(x) or (self.log and x <= 0.0):
            return None
        y = math.log(x) if self.log else x
        if self.scale == "diff":
            return self._update_diff(y)
        self._n += 1
        if self._n <= self.warmup:  # Welford: learn mean and variance exactly
            d = y - self._mean
            self._mean += d / self._n
            self._var += d * (y - self._mean)
            if self._n == self.warmup:
                self._var /= self.warmup - 1
            return None
        fired = self._decide(y)
        a = self.alpha
        d = y - self._mean
        self._mean += a * d
        self._var = (1.0 - a) * (self._var + a * d * d)
        return fired

    def _update_diff(self, y: float) -> bool | None:
        prev, self._prev = self._prev, y
        if prev is not None:
            d = y - prev
            half_sq = 0.5 * d * d   # a product: past the float range inf, not OverflowError
            if not math.isfinite(half_sq):
                # A step past the square root of the float range (|d| > ~1e154) says nothing
                # about the run's noise and would make the reference infinite for good: the
                # value goes unjudged, as a non-finite one does, and the next step is measured
                # from it, so a run that stays at the new level is judged from its next value.
                return None
        self._n += 1
        if prev is None:  # the first value: nothing to difference yet
            self._mean = y
            return None
        if self._n <= self.warmup:  # running means of the values and of the half squares
            self._mean += (y - self._mean) / self._n
            self._var += (half_sq - self._var) / (self._n - 1)
            return None
        fired = self._decide(y)
        a = self.alpha
        self._mean += a * (y - self._mean)
        self._var += a * (half_sq - self._var)
        return fired

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a state saved before ``scale`` existed has no ``prev``."""
        super().load_state_dict({"prev": None, **state})

    def _decide(self, y: float) -> bool:
        sd = max(math.sqrt(self._var), self.min_scale)
        z = (y - self._mean) / sd
        self._hi = max(0.0, self._hi + z - self.k)
        self._lo = max(0.0, self._lo - z - self.k)
        if not self.restart:
            self._hi, self._lo = min(self._hi, 2.0 * self.h), min(self._lo, 2.0 * self.h)
        up = self.direction != "down" and self._hi > self.h
        down = self.direction != "up" and self._lo > self.h
        if up or down:
            self._crossed = max(self._hi if up else 0.0, self._lo if down else 0.0)
        if not self.restart:
            return up or down
        if up:
            self._hi = 0.0
        if down:
            self._lo = 0.0
        return up or down
