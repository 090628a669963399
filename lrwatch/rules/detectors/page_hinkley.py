"""Page-Hinkley test for a change in the mean."""

from __future__ import annotations

import math
from typing import ClassVar, Mapping

from .base import DIRECTIONS, Detector, Param

__all__ = ["PageHinkley"]


class PageHinkley(Detector):
    """Page-Hinkley change detection (as in river's ``PageHinkley``).

    It accumulates ``m_t = alpha * m_{t-1} + (x_t - mean_t - delta)``, the deviations from the
    running mean minus a tolerance ``delta``, and fires when ``m_t`` has risen more than
    ``threshold`` above its minimum (``up``) or fallen below its maximum (``down``). After firing
    it restarts, so each change is reported once.

    Parameters
    ----------
    delta:
        Tolerated deviation per value, in the metric's units.
    threshold:
        Accumulated deviation that fires (lambda), in the metric's units.
    alpha:
        Forgetting factor of the cumulative sum (1 = no forgetting).
    min_instances:
        Values before the first decision.
    direction:
        ``up``, ``down`` or ``both``.

    Notes
    -----
    Unlike CUSUM the thresholds are in the metric's units, not standard deviations: scale
    ``delta`` and ``threshold`` to the metric. False alarms: a slow, healthy drift of more than
    ``delta`` per value adds up and fires; a value far larger than ``threshold`` fires at once.
    Memory: O(1).

    Examples
    --------
    >>> import random
    >>> rng = random.Random(2)
    >>> det = PageHinkley(delta=0.05, threshold=5.0, min_instances=30)
    >>> xs = [rng.gauss(1, 0.1) for _ in range(300)] + [rng.gauss(1.5, 0.1) for _ in range(50)]
    >>> hits = [i for i, x in enumerate(xs) if det.update(x)]
    >>> 300 <= hits[0] < 320
    True
    """

    name: ClassVar[str] = "page_hinkley"
    PARAMS: ClassVar[Mapping[str, Param]] = {
        "delta": Param(float, "tolerated deviation per value", min=0),
        "threshold": Param(float, "accumulated deviation that fires", min=0, min_open=True),
        "alpha": Param(float, "forgetting factor", min=0, min_open=True, max=1),
        "min_instances": Param(int, "values before the first decision", min=1),
        "direction": Param(str, "which side fires", choices=DIRECTIONS),
    }
    _STATE = ("n", "mean", "up", "up_min", "down", "down_max")

    def __init__(self, *, delta: float = 0.005, threshold: float = 50.0, alpha: float = 0.9999,
                 min_instances: int = 30, direction: str = "up") -> None:
        self._set_params(delta=delta, threshold=threshold, alpha=alpha,
                         min_instances=min_instances, direction=direction)
        self._reset()

    def _reset(self) -> None:
        self._n = 0
        self._mean = 0.0
        self._up = self._up_min = 0.0
        self._down = self._down_max = 0.0

    @property
    def statistic(self) -> float:
        """The larger of the watched Page-Hinkley statistics."""
        up, down = self._up - self._up_min, self._down_max - self._down
        return up if self.direction == "up" else down if self.direction == "down" else max(up, down)

    def update(self, x: float, t: float | None = None) -> bool | None:
        if not math.isfinite(x):
            return None
        self._n += 1
        self._mean += (x - self._mean) / self._n
        dev = x - self._mean
        self._up = self.alpha * self._up + dev - self.delta
        self._down = self.alpha * self._down + dev + self.delta
        self._up_min = min(self._up_min, self._up)
        self._down_max = max(self._down_max, self._down)
        if self._n < self.min_instances:
            return None
        up = self.direction != "down" and self._up - self._up_min > self.threshold
        down = self.direction != "up" and self._down_max - self._down > self.threshold
        if up or down:
            self._reset()
            return True
        return False
