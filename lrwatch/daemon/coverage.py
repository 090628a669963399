"""Label coverage over a time horizon: of the predictions made between ``2H`` and ``H`` ago,
the share that has received a label.

A per-window ratio (labels joined while a window was open, per record of that window) reads 0
whenever labels come later than a window lasts, which is what delayed labels do.
:class:`LabelCoverage` instead attributes every label to the time of *its prediction*:
predictions and labels are counted in time buckets of ``H / 30`` by prediction time, and the
coverage is read over the predictions that have had at least ``H`` (and at most ``2H``) to get
their label. "Now" is the stream's clock: the newest prediction time seen (record ``time``, or
arrival time), so replayed or back-dated streams read the same as live ones.

Examples
--------
>>> c = LabelCoverage(horizon=60.0)
>>> c.add_predictions([0.0] * 10)           # ten predictions at t=0 ...
>>> for _ in range(4):
...     c.add_label(0.0)                     # ... four of them labelled later
>>> c.ratio() is None                       # now = 0: no prediction is H old yet
True
>>> c.add_predictions([90.0])               # now = 90: predictions of [-30, 30) are read
>>> c.ratio()
0.4
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, Mapping

import numpy as np

from .records import TIME_FUTURE_SLACK

__all__ = ["LabelCoverage", "DEFAULT_HORIZON", "BUCKETS_PER_HORIZON"]

#: Default ``H`` (seconds): labels that come within an hour count.
DEFAULT_HORIZON = 3600.0
#: Resolution of the bookkeeping (the interval read is ``[now - 2H, now - H)`` to within one).
BUCKETS_PER_HORIZON = 30
#: How far past the wall clock a record's time may move the stream clock (seconds): the
#: slack of the records' own check (a later time is refused as ``invalid_time``).
FUTURE_SLACK = TIME_FUTURE_SLACK


class LabelCoverage:
    """Predictions and their labels, counted by prediction time (see the module notes).

    Parameters
    ----------
    horizon:
        ``H`` in seconds (> 0).
    """

    def __init__(self, horizon: float = DEFAULT_HORIZON) -> None:
        if not (isinstance(horizon, (int, float)) and math.isfinite(horizon) and horizon > 0):
            raise ValueError(f"label horizon must be a positive number of seconds, "
                             f"got {horizon!r}")
        self.horizon = float(horizon)
        self.width = self.horizon / BUCKETS_PER_HORIZON
        self.now = -math.inf
        # bucket index -> [predictions, labelled]
        self._buckets: dict[int, list[int]] = {}

    def _bucket(self, t: float) -> int:
        return math.floor(t / self.width)

    def add_count(self, t: float, n: int) -> None:
        """Count ``n`` predictions made at ``t`` (one arrival time for a batch)."""
        if n > 0:
            self._add(self._bucket(t), n)
            self._advance(t)

    def add_predictions(self, times: Iterable[float] | np.ndarray) -> None:
        """Count predictions made at ``times`` (unix seconds)."""
        t = np.asarray(times if isinstance(times, np.ndarray) else list(times),
                       dtype=np.float64)
        if not t.size:
            return
        lo, hi = float(t.min()), float(t.max())
        if lo == hi:  # one time for the whole batch
            self._add(self._bucket(min(max(lo, -1e15), 1e15)), int(t.size))
        else:
            t = np.clip(t, -1e15, 1e15)  # any finite time: int64 bucket indexes stay exact
            idx, counts = np.unique(np.floor(t / self.width).astype(np.int64),
                                    return_counts=True)
            for i, n in zip(idx.tolist(), counts.tolist()):
                self._add(i, n)
        self._advance(hi)

    def _advance(self, t: float) -> None:
        # a record stamped far in the future (a wrong client clock) must not end the counts
        t = min(t, time.time() + FUTURE_SLACK)
        if t > self.now:
            self.now = t
            self._prune()

    def _add(self, i: int, n: int) -> None:
        b = self._buckets.get(i)
        if b is None:
            self._buckets[i] = [n, 0]
        else:
            b[0] += n

    def add_label(self, t_prediction: float) -> None:
        """A label joined the prediction made at ``t_prediction``."""
        b = self._buckets.get(self._bucket(t_prediction))
        if b is not None and b[1] < b[0]:
            b[1] += 1

    def _prune(self) -> None:
        oldest = self._bucket(self.now - 2 * self.horizon) - 1
        if self._buckets and min(self._buckets) < oldest:
            for i in [i for i in self._buckets if i < oldest]:
                del self._buckets[i]

    def ratio(self) -> float | None:
        """Labelled per prediction over ``[now - 2H, now - H)``, or ``None`` when no
        prediction was made then (the stream is younger than ``H``, or had a gap)."""
        if not math.isfinite(self.now):
            return None
        lo, hi = self._bucket(self.now - 2 * self.horizon), self._bucket(self.now - self.horizon)
        preds = labelled = 0
        for i, (p, lab) in self._buckets.items():
            if lo <= i < hi:
                preds += p
                labelled += lab
        return labelled / preds if preds else None

    def state_dict(self) -> dict[str, Any]:
        return {"horizon": self.horizon, "now": self.now if math.isfinite(self.now) else None,
                "buckets": [[i, p, lab] for i, (p, lab) in sorted(self._buckets.items())]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore counts saved with the same horizon (another horizon starts afresh)."""
        if not state or float(state.get("horizon", -1)) != self.horizon:
            return
        now = state.get("now")
        self.now = -math.inf if now is None else float(now)
        self._buckets = {int(i): [int(p), int(lab)] for i, p, lab in state.get("buckets", [])}
