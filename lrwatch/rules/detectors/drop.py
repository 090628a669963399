"""Drop: a metric fell below its best by more than its own noise, and stays there."""

from __future__ import annotations

import bisect
import math
from collections import deque
from typing import Any, ClassVar, Mapping

from .base import Detector, Param, sorted_median

__all__ = ["Drop"]

_D2_TO_SD = 1.6522      # median |x_t - 2 x_{t-1} + x_{t-2}| of iid N(0, s^2) noise = 1.6522 s
#: Levels of the ``given`` metric are kept to 1/16 of an octave (4.4%), so the references stay
#: bounded however long the run: at most 16 per halving of the given metric's range.
_LEVELS_PER_OCTAVE = 16
_ANY = math.inf          # the level of a value whose given metric was unknown: a reference for all


def _level(g: float | None) -> float:
    """The reference level of a given value: ``floor(16 log2 g)``; unknown (``None``, non-finite,
    negative) is ``+inf`` (compared with everything), zero is ``-inf``."""
    if g is None or not math.isfinite(g) or g < 0.0:
        return _ANY
    if g == 0.0:
        return -math.inf
    return float(math.floor(math.log2(g) * _LEVELS_PER_OCTAVE))


class Drop(Detector):
    """Fires when the last ``count`` values are all worse than the best earlier value by more
    than ``z`` noise standard deviations; with a ``given`` metric, the best earlier value *made
    at a comparable level of it* (the learning rate: the same phase of the schedule).

    Made for evaluation metrics and silent regressions: the held-out accuracy falls while the
    training loss looks fine. The noise is the metric's own evaluation-to-evaluation jitter,
    measured from the median absolute *second* difference of the ``window`` values before the
    current run of bad values (a linear trend, such as steady learning, cancels; the bad values
    themselves never inflate it), and at least half the smallest non-zero change seen (an
    accuracy over a small evaluation set moves in steps of 1/n). Compared with the best raw
    value so far, a drop of ``z`` sigmas must repeat ``count`` times, so one unlucky
    evaluation does not fire.

    With the rule key ``given: lr`` the engine passes the latest learning rate with every value
    (:meth:`update_given`), and a value is compared with the best earlier value whose rate was
    at least ``1 / given_factor`` of the current one. A high-rate phase of a cyclical schedule,
    a warm restart or a warm-up is judged against earlier high-rate phases, not against the
    troughs where held-out metrics are at their best; a decaying rate is judged against
    everything before it, as without ``given``. A value with no earlier one at a comparable
    rate (the first evaluation at a new, higher rate) is normal and becomes the reference of
    its level. Rates are kept to 1/16 of an octave. A value whose given metric is unknown (not
    in the stream yet) is judged against every earlier value and is a reference for every
    later one: without the given metric the detector behaves as without ``given``.

    Parameters
    ----------
    mode:
        ``max`` (higher is better: accuracy) or ``min`` (lower is better: a loss).
    z:
        Drop below the best, in noise standard deviations.
    count:
        Consecutive values that must be that far below.
    window:
        Values the noise is measured on (the most recent ones before the drop).
    warmup:
        Values before the first decision (the noise needs a few).
    log:
        Compare ``log(x)`` (for positive metrics whose noise scales with the level, a loss).
    given_factor:
        With the rule's ``given``: earlier values whose given metric was at least the current
        one divided by this are the references (> 1; ignored without ``given``).
    min_drop:
        The smallest drop that counts, in the compared units (log units with ``log``: 0.22 is
        a loss 25% above its best), however many noise sigmas it is. On a fixed evaluation set
        a smooth model's evaluations barely jitter, so a slight, steady over-fit (0.4% in 20
        evaluations) is many sigmas; this keeps a drop that no user would act on quiet. 0: off.

    Notes
    -----
    The statistic is the latest value's distance below the best, in noise units. Memory:
    O(window), plus with ``given`` one reference per level of the given metric on the Pareto
    front (a lower rate with a better value), at most 16 per octave of the rate's range.
    False alarms: a metric that really gets worse (over-fitting beyond its noise) fires, which
    is the point; a run whose evaluation noise grows suddenly (a learning-rate increase) can
    fire, unless ``given`` compares it with earlier values at that rate. On the family suite of
    ``benchmarks/detection.py`` the thresholds are chosen leave-one-family-out;
    docs/detection.md gives the measured rates.

    Examples
    --------
    >>> det = Drop(mode="max", z=5.0, count=2, warmup=6)
    >>> acc = [0.80, 0.90, 0.94, 0.95, 0.955, 0.952, 0.956, 0.954, 0.957, 0.955]
    >>> acc += [0.94, 0.92, 0.90, 0.88]                    # loses 2 points per evaluation
    >>> [i for i, x in enumerate(acc) if det.update(x)]
    [12, 13]

    A cyclical schedule: the accuracy is 3 points lower at each peak of the rate. Against the
    best at any rate the peaks fire; against the best at a comparable rate they do not.

    >>> lr = [0.1, 0.2, 0.4, 0.8, 0.8, 0.4, 0.2, 0.1] * 4
    >>> acc = [0.95 - 0.01 * math.log2(r / 0.1) + 0.001 * (i % 2) for i, r in enumerate(lr)]
    >>> plain, phase = Drop(z=5.0, warmup=6), Drop(z=5.0, warmup=6)
    >>> [i for i, x in enumerate(acc) if plain.update(x)][:4]
    [11, 12, 13, 14]
    >>> [i for i, (x, r) in enumerate(zip(acc, lr)) if phase.update_given(x, r)]
    []
    """

    name: ClassVar[str] = "drop"
    takes_given: ClassVar[bool] = True
    GIVEN_PARAMS: ClassVar[tuple[str, ...]] = ("given_factor",)
    PARAMS: ClassVar[Mapping[str, Param]] = {
        "mode": Param(str, "which direction is better", choices=("min", "max")),
        "z": Param(float, "drop below the best in noise standard deviations", min=0,
                   min_open=True),
        "count": Param(int, "consecutive values that far below", min=1, keeps=True),
        "window": Param(int, "values the noise is measured on", min=3, keeps=True),
        "warmup": Param(int, "values before the first decision", min=3),
        "log": Param(bool, "compare log(x)"),
        "given_factor": Param(float, "with 'given': references are earlier values whose given "
                                     "metric was >= the current one / this", min=1,
                              min_open=True),
        "min_drop": Param(float, "smallest drop that counts, in the compared units (log units "
                                 "with log)", min=0),
    }
    _STATE = ("vals", "refs", "quantum", "below", "stat", "n")

    def __init__(self, *, mode: str = "max", z: float = 5.0, count: int = 2, window: int = 16,
                 warmup: int = 10, log: bool = False, given_factor: float = 1.5,
                 min_drop: float = 0.0) -> None:
        self._set_params(mode=mode, z=z, count=count, window=window, warmup=warmup, log=log,
                         given_factor=given_factor, min_drop=min_drop)
        # kept: the noise window plus the current run of bad values (which never enter it)
        self._vals: deque[float] = deque(maxlen=window + count + 2)
        # the references: [level of the given metric, best value at that level or above], in
        # "larger is worse" units; the Pareto front, so levels and values both increase
        self._refs: list[list[float]] = []
        self._quantum: float | None = None
        self._below = 0
        self._stat: float | None = None
        self._n = 0

    @property
    def statistic(self) -> float | None:
        """How far the latest value is below the best, in noise standard deviations."""
        return self._stat

    def _sigma(self) -> float | None:
        ref = list(self._vals)[:len(self._vals) - self._below][-self.window:]
        d2 = sorted(abs(ref[j] - 2.0 * ref[j - 1] + ref[j - 2]) for j in range(2, len(ref)))
        if len(d2) < 3:
            return None
        sd = sorted_median(d2) / _D2_TO_SD * math.sqrt(1.0 + 4.0 / len(d2))  # few: inflate
        return max(sd, 0.5 * (self._quantum or 0.0), 1e-12)

    def _best(self, g: float | None) -> float | None:
        """The best earlier value at a level of the given metric >= ``g / given_factor``."""
        lo = -math.inf if _level(g) == _ANY else _level(g / self.given_factor)
        i = bisect.bisect_left([r[0] for r in self._refs], lo)
        return self._refs[i][1] if i < len(self._refs) else None

    def _keep(self, y: float, g: float | None) -> None:
        """Make ``y`` (at given value ``g``) a reference, dropping those it makes redundant."""
        lv = _level(g)
        refs = self._refs
        i = bisect.bisect_left([r[0] for r in refs], lv)
        if i < len(refs) and refs[i][1] <= y:
            return  # a reference at this level or above is at least as good
        j = i
        while j > 0 and refs[j - 1][1] >= y:
            j -= 1  # lower levels with worse values: this one is the better reference for them
        end = i + 1 if i < len(refs) and refs[i][0] == lv else i   # a worse one at this level
        refs[j:end] = [[lv, y]]

    def update(self, x: float, t: float | None = None) -> bool | None:
        return self.update_given(x, None, t)

    def update_given(self, x: float, given: float | None, t: float | None = None) -> bool | None:
        if not math.isfinite(x) or (self.log and x <= 0.0):
            return None
        y = math.log(x) if self.log else x
        y = -y if self.mode == "max" else y       # from here on, larger is worse
        if self._vals:
            d = abs(y - self._vals[-1])
            if d > 0.0 and (self._quantum is None or d < self._quantum):
                self._quantum = d
        self._n += 1
        best = self._best(given)
        self._vals.append(y)
        sigma = self._sigma() if best is not None and self._n > self.warmup else None
        if sigma is None or best is None:
            if best is None:  # nothing comparable: nothing to fall from
                self._below, self._stat = 0, None
            self._keep(y, given)
            return None if best is not None or self._n <= self.warmup else False
        self._stat = (y - best) / sigma
        if self._stat > self.z and y - best > self.min_drop:
            self._below = min(self._below + 1, self.count + 1)
        else:
            self._below = 0
            self._keep(y, given)
        return self._below >= self.count

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a state saved before ``given`` existed (one best value)
        loads as a single reference for every level."""
        if "refs" not in state and "best" in state:
            best = state["best"]
            state = {**state, "refs": [] if best is None else [[_ANY, best]]}
        super().load_state_dict(state)
