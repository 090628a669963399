"""Below its maximum: a value that has come down to a small share of the largest it has been
(a learning rate that a schedule has annealed towards zero)."""

from __future__ import annotations

import math
from collections import deque
from typing import ClassVar, Mapping

from .base import Detector, Param

__all__ = ["BelowMax"]


class BelowMax(Detector):
    """Fires while the value is at most ``factor`` times the largest level it has held: the
    largest, over the run, of the smallest of ``hold`` consecutive values.

    Made for the learning rate: a cosine, linear or exponential schedule that anneals the rate
    towards zero. The parameters then barely move, so evaluations on a fixed evaluation set
    stop changing, which is also what a dead network's evaluations do. The default pack uses
    it as a veto (``unless``) of ``dead_network``: frozen evaluations at an annealed rate are
    explained by the schedule.

    Parameters
    ----------
    factor:
        Share of the maximum at or below which it fires (between 0 and 1).
    hold:
        Consecutive values a level must last to count as a maximum (1: the largest value), so
        that a rate which jumped for a step or two by mistake does not set it.

    Notes
    -----
    The statistic is ``x / max``. Only positive finite values set the maximum; a value of 0 is
    judged (at or below any share), negative and non-finite ones get no decision (and break a
    held level). No decision before a level has lasted ``hold`` values. Memory: O(hold).

    False alarms: none in the statistical sense (it states a fact about the values seen); as a
    veto it hides what it vetoes for as long as the rate stays annealed.

    Examples
    --------
    >>> det = BelowMax(factor=0.1)
    >>> [det.update(x) for x in (0.01, 0.1, 0.05, 0.011, 0.01, 0.0)]
    [False, False, False, False, True, True]
    >>> held = BelowMax(factor=0.1, hold=3)            # a one-step jump is not a level
    >>> [held.update(x) for x in (0.01, 0.01, 0.01, 1.0, 0.01, 0.01, 0.005, 0.001)]
    [None, None, False, False, False, False, False, True]
    """

    name: ClassVar[str] = "below_max"
    PARAMS: ClassVar[Mapping[str, Param]] = {
        "factor": Param(float, "share of the maximum at or below which it fires", min=0,
                        max=1, min_open=True),
        "hold": Param(int, "consecutive values a level must last to count as a maximum",
                      min=1, keeps=True),
    }
    _STATE = ("last", "max", "ratio")

    def __init__(self, *, factor: float = 0.1, hold: int = 1) -> None:
        self._set_params(factor=factor, hold=hold)
        self._last: deque[float] = deque(maxlen=hold)
        self._max: float | None = None
        self._ratio: float | None = None

    @property
    def statistic(self) -> float | None:
        """The latest value over the largest one seen."""
        return self._ratio

    def update(self, x: float, t: float | None = None) -> bool | None:
        if not math.isfinite(x) or x < 0.0:
            self._last.clear()
            return None
        self._last.append(x)
        level = min(self._last) if len(self._last) == self.hold else 0.0
        if level > 0.0 and (self._max is None or level > self._max):
            self._max = level
        if self._max is None:
            return None
        self._ratio = x / self._max
        return self._ratio <= self.factor
