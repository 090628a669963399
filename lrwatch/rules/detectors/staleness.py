"""Staleness: a metric (or any step at all) not seen for too long."""

from __future__ import annotations

import math
from typing import ClassVar, Mapping

from ...errors import ConfigError
from .base import Detector, Param

__all__ = ["Staleness"]


class Staleness(Detector):
    """Fires when a metric has not been seen for ``seconds`` or for ``samples`` samples.

    The engine calls :meth:`update` when a sample carries the metric, :meth:`miss` when a sample
    arrives without it, and :meth:`check` on ``Engine.tick(now)`` (wall clock, for a run that
    stopped sending anything). Watch the pseudo-metric ``step`` for "no step for N seconds".

    Parameters
    ----------
    seconds:
        Age in seconds that fires (needs sample times or ``tick``).
    samples:
        Consecutive samples without the metric that fire (e.g. no evaluation for 5000 steps).

    Notes
    -----
    In a replay, a gap between two samples' times fires when the later sample arrives (the
    engine ticks to the sample's time first) and resolves with that sample. False alarms:
    legitimate pauses (checkpointing, a long evaluation) longer than ``seconds``. Memory: O(1).

    Examples
    --------
    >>> det = Staleness(seconds=60)
    >>> det.update(1.0, t=1000.0), det.check(1030.0), det.check(1100.0), det.update(1.0, t=1101.0)
    (False, False, True, False)
    >>> det = Staleness(samples=2)
    >>> det.update(0.5), det.miss(), det.miss(), det.miss()
    (False, False, True, True)
    """

    name: ClassVar[str] = "staleness"
    PARAMS: ClassVar[Mapping[str, Param]] = {
        "seconds": Param(float, "age in seconds that fires", min=0, min_open=True, optional=True),
        "samples": Param(int, "samples without the metric that fire", min=1, optional=True),
    }
    _STATE = ("last_t", "misses", "age")
    _NO_NAN = ("last_t", "age")
    watches_absence: ClassVar[bool] = True

    def __init__(self, *, seconds: float | None = None, samples: int | None = None) -> None:
        self._set_params(seconds=seconds, samples=samples)
        if seconds is None and samples is None:
            raise ConfigError("staleness needs 'seconds', 'samples' or both")
        self._last_t: float | None = None
        self._misses = 0
        self._age: float | None = None

    @property
    def statistic(self) -> float | None:
        """Seconds since the metric was last seen, at the latest check (``None`` if unknown)."""
        return self._age

    @property
    def misses(self) -> int:
        """Samples since the metric was last seen."""
        return self._misses

    def _stale(self, now: float | None) -> bool | None:
        by_samples = self.samples is not None and self._misses >= self.samples
        if self.seconds is not None and now is not None and self._last_t is not None \
                and math.isfinite(now):
            self._age = now - self._last_t
            return by_samples or self._age > self.seconds
        if self.samples is None:
            return None  # judged by time only, and there is no time to judge by
        return by_samples

    def update(self, x: float, t: float | None = None) -> bool | None:
        self._misses = 0
        if t is not None and math.isfinite(t):
            self._last_t = t
        self._age = 0.0 if self._last_t is not None else None
        return False

    def miss(self, t: float | None = None) -> bool | None:
        self._misses += 1
        return self._stale(t)

    def check(self, now: float) -> bool | None:
        return self._stale(now)
