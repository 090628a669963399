"""Not learning: the value sits at (or above) its untrained level and is not coming down."""

from __future__ import annotations

import math
from collections import deque
from typing import Any, ClassVar, Mapping

from ...errors import ConfigError
from .base import Detector, Param
from .sliding import SortedSpans
from .start_ratio import take_start

__all__ = ["Untrained"]

_INF = math.inf
_MAD_TO_SD = 1.4826        # MAD -> standard deviation for Gaussian noise
_MEDIAN_SE = 1.2533        # standard error of a median = 1.2533 sd / sqrt(n)


class Untrained(Detector):
    """Fires when a loss is at ``above`` times its untrained level or higher *and* not falling.

    The untrained level is the median of the first ``warmup`` positive values (the loss of the
    untrained network). Over the last ``window`` values the detector compares the median of the
    older half with the median of the newer half. The run is *learning* if the newer half is
    lower by more than ``z`` standard errors of that difference, the noise measured from the
    window's own step-to-step differences (median absolute deviation, so one spike does not
    inflate it). It is anomalous when the newer half's median is at least ``above`` times the
    untrained level and the run is not learning: a dead network that predicts a constant, a run
    that never learned after an early blow-up, or one stuck above its untrained loss. A slow
    start that is coming down, or a transient spike that is recovering, is *learning* and stays
    quiet.

    Parameters
    ----------
    warmup:
        Values whose median is the untrained level (1: the very first loss).
    window:
        Values in the trend window (even, at least 8).
    above:
        Level, as a multiple of the untrained level, at or above which a flat loss is anomalous.
    z:
        One-sided test: the newer half must be this many standard errors lower to count as
        learning (3: a false "not learning" on a steadily falling loss about 1 time in 700).
    trend:
        Judge the fall over only the newest ``trend`` values (even, at least 8, at most
        ``window``; default: the whole window): their older half against their newer half, the
        noise from their own step-to-step differences. The level is still the newer half of
        the whole window. With ``trend`` half the window, a fall that ended inside the window
        (a loss that came down from an early blow-up, or relearned its output bias, and then
        settled) no longer counts as learning: what counts is whether the loss is falling now.

    Notes
    -----
    The statistic is the newer half's level over the untrained level. Memory: O(window).
    Positive finite values only; others get no decision.

    False alarms: a healthy run whose loss is still at its untrained level and flat after
    ``window`` steps, such as a warm-up that keeps the learning rate near zero for longer than
    the window, or a task whose best possible loss is close to a constant prediction's. On
    the family suite of ``benchmarks/detection.py`` see docs/detection.md for the measured rate.

    Examples
    --------
    >>> det = Untrained(window=10, above=0.9)
    >>> dead = [2.3] + [2.2 - 0.1 * i for i in range(5)] + [2.3, 2.29, 2.31, 2.3] * 4
    >>> [i for i, x in enumerate(dead) if det.update(x)][:3]
    [10, 11, 12]
    >>> det = Untrained(window=10, above=0.9)
    >>> slow = [2.3 - 0.01 * i for i in range(30)]              # slow, but learning
    >>> any(det.update(x) for x in slow)
    False
    """

    name: ClassVar[str] = "untrained"
    takes_given: ClassVar[bool] = True
    PARAMS: ClassVar[Mapping[str, Param]] = {
        "warmup": Param(int, "first values whose median is the untrained level", min=1, keeps=True),
        "window": Param(int, "values in the trend window", min=8, keeps=True),
        "above": Param(float, "level (x untrained) at or above which a flat loss fires",
                       min=0, min_open=True),
        "z": Param(float, "standard errors of fall that count as learning", min=0),
        "trend": Param(int, "newest values the fall is judged over (default: the whole window)",
                       min=8, keeps=True, optional=True),
    }
    _STATE = ("first", "start", "buf", "level")

    def __init__(self, *, warmup: int = 1, window: int = 40, above: float = 0.9,
                 z: float = 3.0, trend: int | None = None) -> None:
        self._set_params(warmup=warmup, window=window - window % 2, above=above, z=z,
                         trend=None if trend is None else trend - trend % 2)
        if self.trend is not None and self.trend > self.window:
            raise ConfigError(f"untrained 'trend' ({trend}) must be at most 'window' "
                              f"({window}): the fall is judged over the newest values of the "
                              "window")
        self._first: list[float] = []
        self._start: float | None = None
        self._buf: deque[float] = deque(maxlen=self.window)
        self._level: float | None = None
        self._cnt: int | None = 0
        self._spans: SortedSpans | None = None   # sorted parts of the full window, or None

    @property
    def statistic(self) -> float | None:
        """The newer half's median over the untrained level."""
        return self._level

    def update(self, x: float, t: float | None = None) -> bool | None:
        if not 0.0 < x < _INF:   # not finite, or not positive
            return None
        if self._start is None:
            self._start = take_start(self._first, x, self.warmup)
            return None
        h = self.window // 2
        thr = self.above * self._start
        if self._cnt is None:                 # values >= thr in the newer half (after a load)
            self._cnt = sum(1 for v in list(self._buf)[-h:] if v >= thr)
        buf = self._buf
        if len(buf) >= h:                     # the value that leaves the newer half
            self._cnt -= buf[-h] >= thr
            if self._spans is not None and len(buf) == self.window:
                self._spans.slide(buf, x)
        buf.append(x)
        self._cnt += x >= thr
        if len(buf) < self.window:
            return None
        if 2 * self._cnt < h:                 # the newer half's median is below thr: no sort
            self._spans = None                # (sorted afresh when next needed)
            return False
        spans = self._spans
        if spans is None:
            spans = self._spans = self._new_spans()
            spans.build(buf)
        self._level = spans.median(0) / self._start
        if self._level < self.above:       # the common case: well below the untrained level
            return False
        if self.trend is not None and self.trend < self.window:
            h = self.trend // 2               # the fall is judged on the newest values only
            new, old = spans.median(1), spans.median(2)
        else:
            new, old = spans.median(0), spans.median(1)
        sd = _MAD_TO_SD * spans.diff_median() / math.sqrt(2.0)
        se = _MEDIAN_SE * sd * math.sqrt(2.0 / h)
        return not old - new > self.z * se      # not learning

    def _new_spans(self) -> SortedSpans:
        """The sorted parts of the window the test reads: the newer half (the level), and the
        halves and differences of the values the fall is judged over."""
        h = self.window // 2
        if self.trend is not None and self.trend < self.window:
            t = self.trend
            return SortedSpans(((0, h), (0, t // 2), (t // 2, t)), diffs=t)
        return SortedSpans(((0, h), (h, self.window)), diffs=self.window)

    def update_given(self, x: float, given: float | None, t: float | None = None) -> bool | None:
        """As :meth:`update`, with the untrained level measured: ``given`` (``given:
        untrained_loss``) replaces the median of the first ``warmup`` values once known."""
        if given is not None and 0.0 < given < _INF and given != self._start:
            self._start = given               # given_level(given) is given, and new
            self._first.clear()
            self._cnt = None                  # the threshold moved: recount the newer half
        return self.update(x, t)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._cnt = None                      # recounted from the buffer at the next update
        self._spans = None                    # sorted afresh when next needed
