"""Above its recent minimum: a value raised well above where it was lately (a learning rate
that a schedule, a warm restart or a bug turned up)."""

from __future__ import annotations

import math
from collections import deque
from typing import ClassVar, Mapping

from .base import Detector, Param

__all__ = ["AboveMin"]


class AboveMin(Detector):
    """Fires while the value is at least ``factor`` times the smallest of the last ``window``
    values (the current one included).

    Made for the learning rate: a cyclical schedule, a warm restart or a warm-up raises it, and
    for a while after the rise the held-out metrics may get worse *because of it*. The default
    pack uses it as a veto (``unless``) of the silent-regression rules: an evaluation that got
    worse while the rate was raised is explained by the schedule. It fires for as long as the
    rise is within the window, so the veto outlasts the rise by up to ``window`` values.

    Parameters
    ----------
    window:
        Values the minimum is taken over.
    factor:
        Ratio to that minimum that fires (> 1).

    Notes
    -----
    The statistic is ``x / min``. Only positive finite values count (others get no decision).
    Memory: O(window) at worst; the minimum is kept by a monotonic queue (O(1) amortized).

    False alarms: none in the statistical sense (it states a fact about the recent values);
    as a veto it costs detection time: on a cyclical schedule that swings the rate more than
    ``factor``-fold the veto holds for all but the steps near the troughs.

    Examples
    --------
    >>> det = AboveMin(window=4, factor=1.5)
    >>> [det.update(x) for x in (1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 1.0)]
    [False, False, True, True, True, False, False, False]
    """

    name: ClassVar[str] = "above_min"
    PARAMS: ClassVar[Mapping[str, Param]] = {
        "window": Param(int, "values the minimum is taken over", min=1, keeps=True),
        "factor": Param(float, "ratio to the minimum that fires", min=1, min_open=True),
    }
    _STATE = ("n", "q", "ratio")

    def __init__(self, *, window: int = 100, factor: float = 1.5) -> None:
        self._set_params(window=window, factor=factor)
        self._n = 0
        # [index, value] pairs with increasing values: the front is the window's minimum
        self._q: deque[list[float]] = deque()
        self._ratio: float | None = None

    @property
    def statistic(self) -> float | None:
        """The latest value over the window's minimum."""
        return self._ratio

    def update(self, x: float, t: float | None = None) -> bool | None:
        if not (math.isfinite(x) and x > 0.0):
            return None
        self._n += 1
        q = self._q
        while q and q[-1][1] >= x:
            q.pop()
        q.append([self._n, x])
        while q[0][0] <= self._n - self.window:
            q.popleft()
        self._ratio = x / q[0][1]
        return self._ratio >= self.factor
