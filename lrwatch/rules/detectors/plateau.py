"""Plateau: no improvement of the (smoothed) best value for ``patience`` values."""

from __future__ import annotations

import math
from typing import ClassVar, Mapping

from .base import Detector, Param

__all__ = ["Plateau"]


class Plateau(Detector):
    """Fires once ``patience`` values in a row failed to improve the best level.

    An improvement must beat the best by more than ``max(min_delta, rel_delta * |best|)``
    (the rule of ``ReduceLROnPlateau``). The level is an EWMA of the values with weight
    ``smooth``, so per-batch noise does not count as progress.

    Parameters
    ----------
    mode:
        ``min`` (lower is better) or ``max``.
    patience:
        Values without improvement that fire.
    min_delta:
        Absolute improvement that counts.
    rel_delta:
        Relative improvement that counts.
    smooth:
        EWMA weight of the newest value (1 = no smoothing).

    Notes
    -----
    It keeps firing while the plateau lasts and resolves at the next improvement. False alarms:
    slow but real progress below ``rel_delta`` per ``patience`` values counts as a plateau; with
    raw noisy values a lucky low sets a best that later values rarely beat, so smooth them.
    Memory: O(1).

    Examples
    --------
    >>> det = Plateau(mode="min", patience=5, rel_delta=0.01)
    >>> xs = [1.0, 0.8, 0.6, 0.5] + [0.5] * 6 + [0.3]
    >>> [det.update(x) for x in xs]
    [None, False, False, False, False, False, False, False, True, True, False]
    """

    name: ClassVar[str] = "plateau"
    PARAMS: ClassVar[Mapping[str, Param]] = {
        "mode": Param(str, "which direction is better", choices=("min", "max")),
        "patience": Param(int, "values without improvement that fire", min=1),
        "min_delta": Param(float, "absolute improvement that counts", min=0),
        "rel_delta": Param(float, "relative improvement that counts", min=0),
        "smooth": Param(float, "EWMA weight of the newest value", min=0, min_open=True, max=1),
    }
    _STATE = ("level", "best", "since")

    def __init__(self, *, mode: str = "min", patience: int = 100, min_delta: float = 0.0,
                 rel_delta: float = 1e-3, smooth: float = 1.0) -> None:
        self._set_params(mode=mode, patience=patience, min_delta=min_delta,
                         rel_delta=rel_delta, smooth=smooth)
        self._level: float | None = None
        self._best: float | None = None
        self._since = 0

    @property
    def since_best(self) -> int:
        """Values since the last improvement."""
        return self._since

    @property
    def statistic(self) -> float:
        return float(self._since)

    def update(self, x: float, t: float | None = None) -> bool | None:
        if not math.isfinite(x):
            return None
        y = x if self.mode == "min" else -x
        if self._level is None:
            self._level = self._best = y
            return None
        self._level += self.smooth * (y - self._level)
        assert self._best is not None
        if self._best - self._level > max(self.min_delta, self.rel_delta * abs(self._best)):
            self._best = self._level
            self._since = 0
        else:
            self._since += 1
        return self._since >= self.patience
