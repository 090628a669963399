"""Ratio of a value to its level at the start of the stream (the untrained loss)."""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque
from typing import Any, ClassVar, Mapping

from ...errors import ConfigError
from .base import Detector, Param, sorted_median

__all__ = ["StartRatio", "take_start", "given_level"]

_INF = math.inf


def given_level(given: float | None) -> float | None:
    """A measured start level handed over with ``given`` (e.g. ``given: untrained_loss``, the
    untrained loss the Watcher measures on several batches before the first step), or ``None``
    when there is none to use: not measured (yet), non-finite, or not positive. Without one the
    detectors take their start level from their first ``warmup`` values."""
    if given is None or not math.isfinite(given) or given <= 0.0:
        return None
    return given


def take_start(first: list[float], x: float, warmup: int) -> float | None:
    """Collect ``x`` into ``first``; once it holds ``warmup`` values, return their median (the
    start level, e.g. the untrained loss) and empty it. Shared by the detectors that compare
    with where a run started."""
    first.append(x)
    if len(first) < warmup:
        return None
    level = sorted_median(sorted(first))
    first.clear()
    return level


class StartRatio(Detector):
    """Fires when ``x / start`` is above ``above`` or below ``below``.

    ``start`` is the median of the first ``warmup`` positive finite values: for a loss, the loss
    of the untrained network (``ln(10)`` for ten balanced classes). A healthy run's loss stays
    below that level, give or take noise; a run whose loss is an order of magnitude above it
    has blown up, however fast or slowly it got there and whatever its recent history. That is
    what the relative detectors cannot see: a blow-up at the second step (no history to compare
    with, and the spike becomes the history), or a steady geometric climb (a steady ratio to its
    own recent past).

    Parameters
    ----------
    warmup:
        Values whose median is the start level. Keep it small (1 to 3): the level must be set
        before the fault it is meant to catch. With the rule key ``given`` (``given:
        untrained_loss``) a measured level replaces these values once it is known.
    above, below:
        Ratio bounds; at least one must be set.
    window:
        Compare the median of the last ``window`` values with the start level (1: each value
        alone). A median over a few steps keeps one lucky or unlucky batch from resetting a
        rule's ``for`` count.
    given_only:
        With ``given``: judge only against the measured level; until it is known (never, when
        it was not measured) give no decision instead of taking the first values. For rules
        that mean something only against the measured level, such as a veto against the
        constant-prediction loss (``given: constant_loss``), which the first loss does not
        stand in for.

    Notes
    -----
    Meant for positive metrics; negative and non-finite values get no decision (watch those
    with ``nonfinite``), and zeros do not set the start level; a zero after it is a ratio of 0
    (a loss that fits its batches to the last bit). The start level is kept in the state, so a run resumed with its
    Watcher state compares with the loss of its real start. False alarms: a run that *starts*
    far below its typical level, for instance one resumed from a checkpoint without the
    Watcher's state (its first loss is an already trained one), or a mix of tasks whose losses
    differ by 10x. On 221 healthy runs of ``benchmarks/detection.py`` the largest loss was 5x the
    first one. Memory: O(warmup).

    Examples
    --------
    >>> det = StartRatio(above=10.0)
    >>> loss = [2.3, 31.0, 14.0, 2.1, 1.9]       # blew up at the second step
    >>> [det.update(x) for x in loss]
    [None, True, False, False, False]
    >>> round(det.statistic, 3)
    0.826
    """

    name: ClassVar[str] = "start_ratio"
    takes_given: ClassVar[bool] = True
    GIVEN_PARAMS: ClassVar[tuple[str, ...]] = ("given_only",)
    PARAMS: ClassVar[Mapping[str, Param]] = {
        "warmup": Param(int, "first values whose median is the start level", min=1, keeps=True),
        "above": Param(float, "fire when x / start is greater", min=0, min_open=True,
                       optional=True),
        "below": Param(float, "fire when x / start is smaller", min=0, optional=True),
        "window": Param(int, "median of the last N values is compared (1: each value)",
                        min=1, keeps=True),
        "given_only": Param(bool, "with 'given': no decision until the given level is known "
                                  "(no fallback to the first values)"),
    }
    _STATE = ("first", "start", "ratio", "buf")

    def __init__(self, *, warmup: int = 1, above: float | None = None,
                 below: float | None = None, window: int = 1, given_only: bool = False) -> None:
        self._set_params(warmup=warmup, above=above, below=below, window=window,
                         given_only=given_only)
        if above is None and below is None:
            raise ConfigError("start_ratio needs 'above', 'below' or both")
        if above is not None and below is not None and below >= above:
            raise ConfigError(f"start_ratio 'below' ({below}) must be smaller than "
                              f"'above' ({above})")
        self._first: list[float] = []
        self._start: float | None = None
        self._ratio: float | None = None
        self._buf: deque[float] = deque(maxlen=self.window)
        self._sorted: list[float] = []   # the window's values, sorted (rebuilt on a load)

    @property
    def start(self) -> float | None:
        """The start level (``None`` until ``warmup`` values were seen)."""
        return self._start

    @property
    def statistic(self) -> float | None:
        """The latest ratio ``x / start``."""
        return self._ratio

    def update(self, x: float, t: float | None = None) -> bool | None:
        start = self._start
        if not 0.0 < x < _INF:   # (one test for the common case: positive and finite)
            if x != 0.0 or start is None:
                return None  # a zero after the start is a ratio of 0 (a loss that underflowed)
        if start is None:
            self._start = take_start(self._first, x, self.warmup)
            return None
        if self.window > 1:
            buf, srt = self._buf, self._sorted
            if len(buf) == self.window:
                # the oldest value is the first of its equals in the sorted copy, which thus
                # stays element for element what sorting the window would give
                del srt[bisect_left(srt, buf[0])]
            buf.append(x)
            insort(srt, x)
            if len(buf) < self.window:
                return None
            x = sorted_median(srt)
        r = x / start
        self._ratio = r
        return (self.above is not None and r > self.above) or (
            self.below is not None and r < self.below)

    def update_given(self, x: float, given: float | None, t: float | None = None) -> bool | None:
        """As :meth:`update`, with the start level measured: ``given`` (see
        :func:`given_level`) replaces the first ``warmup`` values as the start level."""
        if given is not None and 0.0 < given < _INF:   # given_level(given) is given
            self._start = given
            if self._first:
                self._first.clear()
        elif self.given_only and self._start is None:
            return None   # only a measured level will do: silent until it is known
        return self.update(x, t)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # states saved before `window` existed have no buffer: start it empty
        super().load_state_dict({"buf": [], **state})
        self._sorted = sorted(self._buf)
