"""Rate: how fast a metric (a counter, or the step number) grows per second."""

from __future__ import annotations

import math
from typing import ClassVar, Mapping

from ...errors import ConfigError
from .base import Detector, Param

__all__ = ["Rate"]


class Rate(Detector):
    """Fires when the per-second rate of change is above ``above`` or below ``below``.

    The rate between consecutive values uses their sample times and is smoothed by an EWMA.
    With ``counter: true`` a decrease is a counter reset (as in Prometheus ``rate()``): the new
    value itself is the increase. Watching the pseudo-metric ``step`` gives steps per second.

    Parameters
    ----------
    above, below:
        Rate bounds per second; at least one must be set.
    alpha:
        EWMA weight of the newest rate (1 = no smoothing).
    counter:
        Treat decreases as counter resets.
    warmup:
        Rates (pairs of values) before the first decision.

    Notes
    -----
    Needs sample times; values without a time, or with a time that does not advance, get no
    decision. False alarms: bursty arrival (a checkpoint pause between steps) drops the rate of
    a single interval; smooth with ``alpha`` and use ``for:``. Memory: O(1).

    Examples
    --------
    >>> det = Rate(below=5.0, alpha=1.0)
    >>> [det.update(step, t) for step, t in [(0, 0.0), (10, 1.0), (20, 2.0), (21, 3.0)]]
    [None, False, False, True]
    >>> det.statistic
    1.0
    """

    name: ClassVar[str] = "rate"
    PARAMS: ClassVar[Mapping[str, Param]] = {
        "above": Param(float, "fire when the rate per second is greater", optional=True),
        "below": Param(float, "fire when the rate per second is smaller", optional=True),
        "alpha": Param(float, "EWMA weight of the newest rate", min=0, min_open=True, max=1),
        "counter": Param(bool, "treat decreases as counter resets"),
        "warmup": Param(int, "rates before the first decision", min=1),
    }
    _STATE = ("last_x", "last_t", "rate", "n")

    def __init__(self, *, above: float | None = None, below: float | None = None,
                 alpha: float = 0.3, counter: bool = False, warmup: int = 1) -> None:
        self._set_params(above=above, below=below, alpha=alpha, counter=counter, warmup=warmup)
        if above is None and below is None:
            raise ConfigError("rate needs 'above', 'below' or both")
        self._last_x: float | None = None
        self._last_t: float | None = None
        self._rate: float | None = None
        self._n = 0

    @property
    def statistic(self) -> float | None:
        """The smoothed rate per second."""
        return self._rate

    def update(self, x: float, t: float | None = None) -> bool | None:
        if not math.isfinite(x) or t is None or not math.isfinite(t):
            return None
        lx, lt = self._last_x, self._last_t
        if lx is None or lt is None:
            self._last_x, self._last_t = x, t
            return None
        if t <= lt:
            return None
        inc = x - lx
        if self.counter and inc < 0:
            inc = x
        r = inc / (t - lt)
        self._last_x, self._last_t = x, t
        self._rate = r if self._rate is None else self._rate + self.alpha * (r - self._rate)
        self._n += 1
        if self._n < self.warmup:
            return None
        rate = self._rate
        return (self.above is not None and rate > self.above) or (
            self.below is not None and rate < self.below)
