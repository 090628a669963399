"""Fewer: fewer values seen than a test needs (evidence that does not exist yet)."""

from __future__ import annotations

import math
from typing import ClassVar, Mapping

from .base import Detector, Param

__all__ = ["Fewer"]


class Fewer(Detector):
    """Fires while fewer than ``count`` finite values have been seen.

    A building block for a veto that must have had its chance: the default pack's
    ``eval_loss_improving`` tests a trend over 6 evaluations, so a run that evaluates every 20
    steps cannot show that it is learning before step 120, while ``never_learned`` judges the
    training loss at step 80. A rule with ``unless: [..., eval_loss_too_few]`` waits until the
    evidence exists. A stream that never carries the metric never fires it (a run without
    evaluations is judged without them). Not in the default pack: on
    ``benchmarks/recovery.py --families`` (evaluations every 20 steps) waiting for 6
    evaluations spared one healthy run a restart but delayed the restarts that heal
    never-learned runs from step 81 to 121, and 4 of 14 healed runs were no longer healed
    (docs/recovery.md).

    Parameters
    ----------
    count:
        Values needed; fires on the first ``count - 1`` values, not from the ``count``-th on.

    Notes
    -----
    The statistic is the number of values seen. Non-finite values are not counted (and get no
    decision). It fires from the first value on: before it, nothing says the metric will come. False alarms: none in the statistical sense (it states a fact); as a veto it
    delays what it vetoes until ``count`` values exist. Memory: O(1).

    Examples
    --------
    >>> det = Fewer(count=3)
    >>> [det.update(x) for x in (0.9, float("nan"), 0.8, 0.7, 0.6)]
    [True, None, True, False, False]
    """

    name: ClassVar[str] = "fewer"
    PARAMS: ClassVar[Mapping[str, Param]] = {
        "count": Param(int, "values needed (fires while fewer have been seen)", min=1),
    }
    _STATE = ("n",)

    def __init__(self, *, count: int = 6) -> None:
        self._set_params(count=count)
        self._n = 0

    @property
    def statistic(self) -> float | None:
        """The number of finite values seen."""
        return float(self._n)

    def update(self, x: float, t: float | None = None) -> bool | None:
        if not math.isfinite(x):
            return None
        self._n += 1
        return self._n < self.count
