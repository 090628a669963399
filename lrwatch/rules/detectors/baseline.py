"""Return to baseline: a metric back at its untrained level (a collapsed network)."""

from __future__ import annotations

import math
from collections import deque
from typing import ClassVar, Mapping

from ...errors import ConfigError
from .base import Detector, Param, RunLengthTest, sorted_median
from .start_ratio import given_level

__all__ = ["Baseline"]


class Baseline(RunLengthTest, Detector):
    """Fires when a metric that had moved away from its initial level comes back to it.

    The baseline is the median of the first ``warmup`` positive values (the untrained loss,
    e.g. ``ln(10)`` for ten classes). With ``direction: up`` the detector is *armed* once the
    (smoothed) value fell below ``arm * baseline`` (training made progress) and then fires
    while it is at or above ``level * baseline``. ``direction: down`` mirrors this for metrics
    that grow with training (accuracy back at chance).

    Parameters
    ----------
    warmup:
        Initial values whose median is the baseline.
    arm:
        Ratio to the baseline the metric must reach before the detector can fire.
    level:
        Ratio to the baseline that counts as "back at the start".
    direction:
        ``up`` (loss) or ``down`` (accuracy).
    smooth:
        EWMA weight of the newest value (1 = no smoothing).
    median:
        Take the running median of the last ``median`` values before the EWMA (1 = none). A
        collapsed network's loss is at its constant prediction's level on every batch, so a
        median of 5 needs 3 of the last 5 there and ignores one or two hard batches of a run
        with a heavy-tailed batch loss; it also arms only when 3 of 5 reached ``arm``.
    alpha:
        0 (the default): fire on every value at or beyond ``level``. Above 0: fire only once a
        *run* of ``k`` values in a row is at or beyond ``level``, where ``k`` is sized by the
        run's own rate ``p`` of such values since it was armed: the smallest ``k >= 2`` with
        ``p ** k <= alpha`` (``p`` counted over the values before the current run, with one
        exceedance and one non-exceedance added so that a short history asks for a long run).
        A run whose batches never came back to the level fires on the second or third value at
        it (the second once its history is long enough for ``p ** 2 <= alpha``); one whose
        heavy-tailed batches reach it now and then waits for a run that its own rate makes
        unlikely (``alpha`` per value, if values are independent).

    Notes
    -----
    A run that never makes progress is never armed, so it never fires (that is a plateau).
    False alarms: noisy per-batch values can touch ``level`` on their own; smooth them or use
    ``for:``.
    Memory: O(warmup) during warm-up, O(1) after.

    Examples
    --------
    >>> det = Baseline(warmup=3, arm=0.5, level=0.9)
    >>> loss = [2.3, 2.3, 2.2, 1.5, 0.9, 0.6, 0.5, 2.2, 2.3]
    >>> [det.update(x) for x in loss]
    [None, None, None, False, False, False, False, True, True]
    """

    name: ClassVar[str] = "baseline"
    takes_given: ClassVar[bool] = True
    PARAMS: ClassVar[Mapping[str, Param]] = {
        "warmup": Param(int, "initial values whose median is the baseline", min=1, keeps=True),
        "arm": Param(float, "ratio to the baseline that arms the detector", min=0, min_open=True),
        "level": Param(float, "ratio to the baseline that fires", min=0, min_open=True),
        "direction": Param(str, "up (loss) or down (accuracy)", choices=("up", "down")),
        "smooth": Param(float, "EWMA weight of the newest value", min=0, min_open=True, max=1),
        "median": Param(int, "running median over this many values before the EWMA",
                        min=1, keeps=True),
        "alpha": Param(float, "per-value false-alarm probability of the run-length test "
                       "(0: off)", min=0, max=0.5),
    }
    _STATE = ("first", "base", "level_now", "armed", "recent", "seen", "beyond", "run")

    def __init__(self, *, warmup: int = 5, arm: float = 0.5, level: float = 0.9,
                 direction: str = "up", smooth: float = 1.0, median: int = 1,
                 alpha: float = 0.0) -> None:
        self._set_params(warmup=warmup, arm=arm, level=level, direction=direction, smooth=smooth,
                         median=median, alpha=alpha)
        if (self.direction == "up") != (self.arm < self.level):
            raise ConfigError(f"baseline with direction {self.direction!r} needs 'arm' "
                              f"{'<' if self.direction == 'up' else '>'} 'level'")
        self._first: list[float] = []
        self._base: float | None = None
        self._level_now: float | None = None
        self._armed = False
        self._recent: deque[float] = deque(maxlen=self.median)
        self._init_runs()   # the run-length test (alpha > 0), over armed values

    def run_needed(self) -> int:
        """The run length the test asks for now (``alpha`` > 0): the smallest ``k >= 2`` with
        ``p ** k <= alpha``, ``p = (beyond + 1) / (seen + 2)``.

        >>> d = Baseline(alpha=1e-4)
        >>> d.run_needed()                      # nothing seen yet: p = 1/2
        14
        >>> d._seen, d._beyond = 200, 0         # 200 armed values, none at the level
        >>> d.run_needed()
        2
        >>> d._beyond = 6                       # 3.5% of them were
        >>> d.run_needed()
        3
        """
        return super().run_needed()

    @property
    def baseline(self) -> float | None:
        """The initial level (``None`` during warm-up)."""
        return self._base

    @property
    def armed(self) -> bool:
        return self._armed

    @property
    def statistic(self) -> float | None:
        """The smoothed value's ratio to the baseline."""
        if self._base is None or self._level_now is None:
            return None
        return self._level_now / self._base

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """As the base class; a state saved before ``median`` existed has no ``recent``."""
        super().load_state_dict({"recent": [], "seen": 0, "beyond": 0, "run": 0, **state})

    def update(self, x: float, t: float | None = None) -> bool | None:
        if not math.isfinite(x) or x <= 0.0:
            return None
        if self.median > 1:
            self._recent.append(x)
        if self._base is None:
            self._first.append(x)
            if len(self._first) == self.warmup:
                self._base = sorted_median(sorted(self._first))
                self._first = []
                self._level_now = x
            return None
        if self.median > 1:
            x = sorted_median(sorted(self._recent))
        lv = self._level_now if self._level_now is not None else x
        lv += self.smooth * (x - lv)
        self._level_now = lv
        r = lv / self._base
        up = self.direction == "up"
        if (r <= self.arm) if up else (r >= self.arm):
            self._armed = True
        beyond = self._armed and ((r >= self.level) if up else (r <= self.level))
        if self.alpha <= 0.0 or not self._armed:
            return beyond
        return self._run_test(beyond)

    def update_given(self, x: float, given: float | None, t: float | None = None) -> bool | None:
        """As :meth:`update`, with the baseline measured: ``given`` (``given:
        untrained_loss``) replaces the median of the first ``warmup`` values once known."""
        level = given_level(given)
        if level is not None:
            self._base = level
            self._first = []
        return self.update(x, t)
