"""Robust spikes: distance from the rolling median in units of the rolling MAD."""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque
from typing import Any, ClassVar, Mapping

from .base import DIRECTIONS, Detector, Param, RunLengthTest, sorted_median

__all__ = ["Spike"]

_MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation


def _mad(a: list[float], m: float) -> float:
    """Median absolute deviation of sorted ``a`` around ``m``: the deviations grow to the left
    and to the right of ``m`` (two sorted runs), and the middle ones of their merge are found
    by bisection (O(log n), no allocation; the merge itself, walked, was a replay's hot path).
    """
    n = len(a)
    j = bisect_left(a, m)
    k_lo, k_hi = (n - 1) // 2, n // 2
    hi = _kth_deviation(a, m, j, k_hi)
    lo = hi if k_lo == k_hi else _kth_deviation(a, m, j, k_lo)
    return 0.5 * (lo + hi)


def _kth_deviation(a: list[float], m: float, j: int, k: int) -> float:
    """The ``k``-th smallest (from 0) of the deviations ``m - a[i]`` (``i < j``, growing as
    ``i`` falls) and ``a[i] - m`` (``i >= j``, growing as ``i`` rises) of sorted ``a`` split
    at ``j``: the bisection picks how many of the ``k + 1`` smallest lie to the left."""
    left, right = j, len(a) - j
    lo, hi = max(0, k + 1 - right), min(k + 1, left)
    while lo < hi:   # the fewest taken from the left such that its next one is not smaller
        x = (lo + hi) // 2
        if m - a[j - 1 - x] < a[j + k - x] - m:
            lo = x + 1
        else:
            hi = x
    d_left = m - a[j - lo] if lo else -1.0           # the largest taken from each side
    d_right = a[j + k - lo] - m if lo <= k else -1.0
    return d_left if d_left > d_right else d_right


class Spike(RunLengthTest, Detector):
    """Fires when a value is far from the rolling median, measured in rolling MADs.

    The score is ``z = (y - median) / max(1.4826 * MAD, min_scale)`` over the last ``window``
    values, where ``y = log(x)`` when ``log`` is true (losses and norms are positive and their
    noise is multiplicative). A spike also has to move the raw value by more than ``floor``, so a
    near-zero loss that goes from 1e-4 to 1e-3 does not fire.

    Parameters
    ----------
    window:
        Number of recent values that define "normal".
    threshold:
        Robust z-score that fires (6 is about one false alarm in 10^8 values of Gaussian noise).
    warmup:
        Values needed before the first decision.
    direction:
        ``up`` (only increases fire), ``down`` or ``both``.
    log:
        Work on ``log(x)``; values ``<= 0`` then get no decision and are not stored.
    floor:
        Smallest absolute change ``|x - median|`` (in the metric's own units) that may fire.
    min_scale:
        Lower bound of the scale (in the working space, i.e. in log units when ``log``), so a
        perfectly flat series does not turn rounding noise into infinite scores.
    alpha:
        0 (default): every value beyond the threshold is anomalous. Above 0: a run-length test
        sized by the stream's own tail (:class:`~lrwatch.rules.detectors.base.RunLengthTest`
        with the observed rate, no pseudo-counts): the detector is anomalous from the k-th
        value in a row beyond the threshold, k the smallest number >= 2 with ``p ** k <=
        alpha``, ``p`` the share of its earlier decisions that were beyond. A stream that never
        crossed fires on its second crossing in a row (a rule's ``for: 2`` without it); a
        heavy-tailed one whose single batches cross now and then waits for a run its own rate
        makes unlikely (``alpha`` per value, if values are independent).

    Notes
    -----
    Outliers enter the window clipped to the edge of the band (``median +- threshold *
    scale``): a single spike barely moves the statistics, a value that keeps growing (a blow-up)
    keeps firing, and a sustained level shift fires for about ``window / 2`` to ``window`` values
    before the widened band accepts it as the new normal. False alarms: heavy-tailed but healthy
    noise (tiny batches) exceeds 6 robust sigmas more often than Gaussian noise; raise
    ``threshold`` or require ``for: 2`` in the rule. A falling series (a loss that is still
    improving) never fires ``up``. Memory: ``O(window)``, independent of the stream length; each
    update costs ``O(window)`` in the worst case and a few microseconds for windows of ~100.

    Examples
    --------
    >>> import random
    >>> rng = random.Random(0)
    >>> det = Spike(window=50, threshold=6.0, warmup=20, log=True)
    >>> loss = [2.0 * math.exp(rng.gauss(0, 0.05)) for _ in range(100)] + [20.0]
    >>> [i for i, x in enumerate(loss) if det.update(x)]
    [100]
    >>> round(det.statistic, 1) > 6
    True
    """

    name: ClassVar[str] = "spike"
    PARAMS: ClassVar[Mapping[str, Param]] = {
        "window": Param(int, "values that define normal", min=3, keeps=True),
        "threshold": Param(float, "robust z-score that fires", min=0, min_open=True),
        "warmup": Param(int, "values before the first decision", min=3),
        "direction": Param(str, "which side fires", choices=DIRECTIONS),
        "log": Param(bool, "work on log(x)"),
        "floor": Param(float, "smallest absolute change that fires", min=0),
        "min_scale": Param(float, "lower bound of the scale", min=0, min_open=True),
        "alpha": Param(float, "per-value false-alarm probability of the run-length test "
                              "(0: off)", min=0, max=1),
    }
    _STATE = ("buf", "sorted", "z", "scale", "seen", "beyond", "run")
    _prior = 0.0

    def __init__(self, *, window: int = 50, threshold: float = 6.0, warmup: int = 20,
                 direction: str = "up", log: bool = False, floor: float = 0.0,
                 min_scale: float = 1e-6, alpha: float = 0.0) -> None:
        self._set_params(window=window, threshold=threshold, warmup=warmup, direction=direction,
                         log=log, floor=floor, min_scale=min_scale, alpha=alpha)
        self._init_runs()
        self.warmup = min(self.warmup, self.window)
        self._buf: deque[float] = deque(maxlen=self.window)
        self._sorted: list[float] = []
        self._z: float | None = None
        self._scale: float = self.min_scale      # the last MAD-based scale

    def _skip(self, y: float, m: float) -> bool:
        """Whether ``y`` cannot fire whatever the scale (it lies on the quiet side of ``m``)."""
        if self.direction == "up":
            return y <= m
        if self.direction == "down":
            return y >= m
        return False

    @property
    def median(self) -> float | None:
        """Rolling median, in the metric's own units (``None`` while empty)."""
        if not self._sorted:
            return None
        m = sorted_median(self._sorted)
        return math.exp(m) if self.log else m

    @property
    def statistic(self) -> float | None:
        """The latest robust z-score."""
        return self._z

    def update(self, x: float, t: float | None = None) -> bool | None:
        if not math.isfinite(x) or (self.log and x <= 0.0):
            return None
        y = math.log(x) if self.log else x
        a = self._sorted
        verdict: bool | None = None
        if len(a) >= self.warmup:
            m = sorted_median(a)
            if self._skip(y, m):
                # on the quiet side of the median this value cannot fire: its z-score, needed
                # for a message only, uses the last scale instead of a fresh MAD (the hot path)
                scale = self._scale
            else:
                scale = self._scale = max(_MAD_TO_SIGMA * _mad(a, m), self.min_scale)
            z = (y - m) / scale
            self._z = z
            if self.direction == "up":
                out = z > self.threshold
            elif self.direction == "down":
                out = z < -self.threshold
            else:
                out = abs(z) > self.threshold
            verdict = out and abs(x - (math.exp(m) if self.log else m)) > self.floor
            if self.alpha > 0.0:
                verdict = self._run_test(verdict)
            if out:  # store the outlier clipped to the band, so a blow-up cannot redefine normal
                y = m + math.copysign(self.threshold * scale, z)
        if len(self._buf) == self.window:
            del a[bisect_left(a, self._buf[0])]
        self._buf.append(y)
        insort(a, y)
        return verdict

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # states saved before the cached scale (or the run-length test) existed
        super().load_state_dict({"scale": self.min_scale, "seen": 0, "beyond": 0, "run": 0,
                                 **state})
        if len(self._sorted) != len(self._buf):
            # a state of a longer window (replay with the rule's window edited, adopt_state):
            # the deque kept its last values; the sorted copy must hold those alone, or the
            # values beyond the window stay in the median and scale for good
            self._sorted = sorted(self._buf)
