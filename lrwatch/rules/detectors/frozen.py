"""Frozen: a metric that stopped changing, as a constant prediction's evaluation does."""

from __future__ import annotations

import math
from collections import deque
from typing import ClassVar, Mapping

from .base import Detector, Param

__all__ = ["Frozen"]


class Frozen(Detector):
    """Fires when the last ``count`` values lie within ``rtol`` of each other (relative range).

    A network that died and predicts a constant gives *the same* held-out accuracy at every
    evaluation, bit for bit, and an evaluation loss that barely moves; a network that learns, or
    merely trains on noisy batches, changes its held-out predictions between evaluations. With
    ``rtol: 0`` the values must be identical.

    Parameters
    ----------
    count:
        Values in the window (at least 2).
    rtol:
        Largest allowed ``(max - min) / max(|max|, |min|)`` over the window.

    Notes
    -----
    The statistic is the window's relative range. Memory: O(count). Non-finite values get no
    decision and break the window.

    False alarms: a converged run on a small evaluation set (its accuracy can repeat exactly,
    at a high level), and a run whose learning rate decayed to zero. Combine it with a level
    test (the loss still near its untrained value: ``untrained``) in a ``when`` rule; that is
    how the default pack uses it.

    Examples
    --------
    >>> det = Frozen(count=3)
    >>> [det.update(x) for x in (0.31, 0.30, 0.3096, 0.3096, 0.3096, 0.32)]
    [None, None, False, False, True, False]
    """

    name: ClassVar[str] = "frozen"
    PARAMS: ClassVar[Mapping[str, Param]] = {
        "count": Param(int, "values in the window", min=2, keeps=True),
        "rtol": Param(float, "largest relative range that counts as frozen", min=0),
    }
    _STATE = ("buf", "range")

    def __init__(self, *, count: int = 3, rtol: float = 0.0) -> None:
        self._set_params(count=count, rtol=rtol)
        self._buf: deque[float] = deque(maxlen=self.count)
        self._range: float | None = None

    @property
    def statistic(self) -> float | None:
        """The window's relative range."""
        return self._range

    def update(self, x: float, t: float | None = None) -> bool | None:
        if not math.isfinite(x):
            self._buf.clear()
            return None
        self._buf.append(x)
        if len(self._buf) < self.count:
            return None
        hi, lo = max(self._buf), min(self._buf)
        scale = max(abs(hi), abs(lo))
        self._range = 0.0 if hi == lo else (hi - lo) / scale
        return self._range <= self.rtol
