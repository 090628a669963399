"""Drop: a metric fell below its best by more than its own noise, and stays there."""

from __future__ import annotations

import math
from collections import deque
from typing import ClassVar, Mapping

from .base import Detector, Param, sorted_median

__all__ = ["Drop"]

_D2_TO_SD = 1.6522      # median |x_t - 2 x_{t-1} + x_{t-2}| of iid N(0, s^2) noise = 1.6522 s


class Drop(Detector):
    """Fires when the last ``count`` values are all worse than the best earlier value by more
    than ``z`` noise standard deviations.

    Made for evaluation metrics and silent regressions: the held-out accuracy falls while the
    training loss looks fine. The noise is the metric's own evaluation-to-evaluation jitter,
    measured from the median absolute *second* difference of the ``window`` values before the
    current run of bad values (a linear trend, such as steady learning, cancels; the bad values
    themselves never inflate it), and at least half the smallest non-zero change seen (an
    accuracy over a small evaluation set moves in steps of 1/n). Compared with the best raw
    value so far, a drop of ``z`` sigmas must repeat ``count`` times, so one unlucky
    evaluation does not fire.

    Parameters
    ----------
    mode:
        ``max`` (higher is better: accuracy) or ``min`` (lower is better: a loss).
    z:
        Drop below the best, in noise standard deviations.
    count:
        Consecutive values that must be that far below.
    window:
        Values the noise is measured on (the most recent ones before the drop).
    warmup:
        Values before the first decision (the noise needs a few).
    log:
        Compare ``log(x)`` (for positive metrics whose noise scales with the level, a loss).

    Notes
    -----
    The statistic is the latest value's distance below the best, in noise units. Memory:
    O(window). False alarms: a metric that really gets worse (over-fitting beyond its noise)
    fires, which is the point; a run whose evaluation noise grows suddenly (a learning-rate
    increase) can fire. On the family suite of ``benchmarks/detection.py`` the thresholds are
    chosen leave-one-family-out; docs/detection.md gives the measured rates.

    Examples
    --------
    >>> det = Drop(mode="max", z=5.0, count=2, warmup=6)
    >>> acc = [0.80, 0.90, 0.94, 0.95, 0.955, 0.952, 0.956, 0.954, 0.957, 0.955]
    >>> acc += [0.94, 0.92, 0.90, 0.88]                    # loses 2 points per evaluation
    >>> [i for i, x in enumerate(acc) if det.update(x)]
    [12, 13]
    """

    name: ClassVar[str] = "drop"
    PARAMS: ClassVar[Mapping[str, Param]] = {
        "mode": Param(str, "which direction is better", choices=("min", "max")),
        "z": Param(float, "drop below the best in noise standard deviations", min=0,
                   min_open=True),
        "count": Param(int, "consecutive values that far below", min=1),
        "window": Param(int, "values the noise is measured on", min=3),
        "warmup": Param(int, "values before the first decision", min=3),
        "log": Param(bool, "compare log(x)"),
    }
    _STATE = ("vals", "best", "quantum", "below", "stat", "n")

    def __init__(self, *, mode: str = "max", z: float = 5.0, count: int = 2, window: int = 16,
                 warmup: int = 10, log: bool = False) -> None:
        self._set_params(mode=mode, z=z, count=count, window=window, warmup=warmup, log=log)
        # kept: the noise window plus the current run of bad values (which never enter it)
        self._vals: deque[float] = deque(maxlen=window + count + 2)
        self._best: float | None = None          # in "larger is worse" units
        self._quantum: float | None = None
        self._below = 0
        self._stat: float | None = None
        self._n = 0

    @property
    def statistic(self) -> float | None:
        """How far the latest value is below the best, in noise standard deviations."""
        return self._stat

    def _sigma(self) -> float | None:
        ref = list(self._vals)[:len(self._vals) - self._below][-self.window:]
        d2 = sorted(abs(ref[j] - 2.0 * ref[j - 1] + ref[j - 2]) for j in range(2, len(ref)))
        if len(d2) < 3:
            return None
        sd = sorted_median(d2) / _D2_TO_SD * math.sqrt(1.0 + 4.0 / len(d2))  # few: inflate
        return max(sd, 0.5 * (self._quantum or 0.0), 1e-12)

    def update(self, x: float, t: float | None = None) -> bool | None:
        if not math.isfinite(x) or (self.log and x <= 0.0):
            return None
        y = math.log(x) if self.log else x
        y = -y if self.mode == "max" else y       # from here on, larger is worse
        if self._vals:
            d = abs(y - self._vals[-1])
            if d > 0.0 and (self._quantum is None or d < self._quantum):
                self._quantum = d
        self._n += 1
        best = self._best
        self._vals.append(y)
        if best is None or self._n <= self.warmup:
            self._best = y if best is None else min(best, y)
            return None
        sigma = self._sigma()
        if sigma is None:
            self._best = min(best, y)
            return None
        self._stat = (y - best) / sigma
        if self._stat > self.z:
            self._below = min(self._below + 1, self.count + 1)
        else:
            self._below = 0
            self._best = min(best, y)
        return self._below >= self.count
