"""The daemon's side of label-free performance estimation: each window's probabilities go to
the reference's :class:`~.estimation.PerformanceEstimator`, and the estimate is later compared
with the accuracy its own labels realise.

Delayed labels land in later windows, so a window's estimate is kept (a few numbers, at most
:data:`MAX_TRACKED` windows) and every label is attributed to the window *of its prediction*
(the pending-label store remembers it). A window's estimate is compared once enough of its own
labels came in: at least ``min_labels`` (default 30) **and** either half of its records or
every record older than the label horizon ``H`` (``label_horizon_seconds``), whichever comes
first. Then ``error = estimate - realised accuracy of the window's labelled records``; a window
that never gets ``min_labels`` is dropped uncompared. The comparison is honest when labels are
missing at random; if only some kinds of predictions get labels, the realised accuracy is that
of those.

Examples
--------
>>> class Flat:                     # a stand-in estimator: always 0.8
...     n_classes = 2
...     def estimate(self, proba):
...         return {"accuracy": 0.8, "records": float(len(proba))}
>>> t = EstimateTracker(Flat(), "probability", horizon=60.0, min_labels=2)
>>> proba = window_probabilities([0.9, 0.2, 0.7, 0.6], "probability", None)
>>> t.window(7, 100.0, proba, records=4)["accuracy"]
0.8
>>> t.join(7, 1.0); t.completed
[]
>>> t.join(7, 0.0); t.take_completed()   # two of four labelled: half, and min_labels
[0.30000000000000004]
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import numpy as np

from .estimation import PROBA_SUM_TOLERANCE

__all__ = ["EstimateTracker", "MAX_TRACKED", "window_probabilities"]

_log = logging.getLogger("lrwatch.daemon")

#: Windows whose estimate waits for its labels (the oldest are dropped uncompared).
MAX_TRACKED = 256


def window_probabilities(preds: Sequence[Any], prediction_type: str, width: int | None
                         ) -> np.ndarray | None:
    """The window's predictions as the estimator reads them: ``(n,)`` class-1 probabilities
    (``probability``) or ``(n, k)`` (``probabilities``). Predictions that do not fit (another
    width, a value outside [0, 1], a list that does not sum to 1; validation rejects those once
    the reference is known, and a live reference's later records were validated before it
    was) are left out: the estimator would refuse the whole window for one of them. ``None``
    when nothing is left."""
    return probability_rows(preds, prediction_type, width)[0]


def probability_rows(preds: Sequence[Any], prediction_type: str, width: int | None
                     ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """:func:`window_probabilities` and which rows it kept: a boolean mask over ``preds``, or
    ``None`` when it kept them all (the input-disagreement signal lines its inputs up by
    it)."""
    n = len(preds)
    if prediction_type == "probability":
        try:  # the common case, one C-level conversion
            a = np.array(preds, dtype=np.float64)
        except (TypeError, ValueError):  # a class name or a list among them
            a = np.fromiter((p if type(p) in (int, float) else np.nan for p in preds),
                            dtype=np.float64, count=n)
        if a.ndim != 1:
            return None, None
        keep = (a >= 0.0) & (a <= 1.0)
    else:
        try:
            a = np.array(preds, dtype=np.float64)
            rows = None
        except ValueError:  # rows of different widths
            rows = np.array([type(p) is list and len(p) == width for p in preds], dtype=bool)
            a = np.array([p for p, ok in zip(preds, rows) if ok], dtype=np.float64)
        if a.ndim != 2 or (width is not None and a.shape[1] != width):
            return None, None
        keep = ((a >= 0.0) & (a <= 1.0)).all(axis=1) \
            & (np.abs(a.sum(axis=1) - 1.0) <= PROBA_SUM_TOLERANCE)
        if rows is not None:
            full = np.zeros(n, dtype=bool)
            full[np.flatnonzero(rows)[keep]] = True
            a, keep = a[keep], full
            return (a, None if keep.all() else keep) if len(a) else (None, None)
    a = a[keep]
    if not len(a):
        return None, None
    return a, None if len(a) == n else keep


class EstimateTracker:
    """Per-window estimates and their later comparison with realised accuracy.

    Every comparison that completes (:meth:`window`, :meth:`join`, :meth:`sweep`) appends the
    window's error to :attr:`completed`; :meth:`take_completed` hands them over."""

    def __init__(self, estimator: Any, prediction_type: str, *, horizon: float,
                 width: int | None = None, min_labels: int = 30,
                 reference: float | None = None) -> None:
        self.estimator = estimator
        #: when the reference (with its estimator) was built: a saved state of another
        #: reference's estimates is not restored (:meth:`load_state_dict`)
        self.reference = reference
        self.prediction_type = prediction_type
        self.horizon = float(horizon)
        self.width = width
        self.min_labels = int(min_labels)
        self.completed: list[float] = []
        # window index -> [estimate, records, joined, correct, last prediction time]
        self._open: OrderedDict[int, list[float]] = OrderedDict()

    def window(self, index: int, last_time: float, proba: np.ndarray, records: int,
               joined: float = 0.0, correct: float = 0.0) -> dict[str, float] | None:
        """Estimate one closed window from its probabilities (see :func:`window_probabilities`)
        and keep it until its labels come; ``joined``/``correct``: its own labels that came
        while it was open (inline ones, say). ``None`` when the estimator had nothing to say;
        a window whose estimate was withheld (``withheld``: its confidences lie outside the
        reference's) is returned but not kept: there is no estimate to compare."""
        est = self.estimator.estimate(proba)
        if "accuracy" not in est:
            return None
        if est.get("withheld"):   # no estimate to compare (the window is outside the support)
            return est
        self._open[index] = [float(est["accuracy"]), float(records), float(joined),
                             float(correct), float(last_time)]
        while len(self._open) > MAX_TRACKED:
            self._open.popitem(last=False)
        self._check(index)
        return est

    def join(self, index: int | None, correct: float) -> None:
        """A label of window ``index`` came (``correct``: 1 or 0)."""
        w = self._open.get(index) if index is not None else None  # type: ignore[arg-type]
        if w is not None:
            w[2] += 1.0
            w[3] += correct
            self._check(index)  # type: ignore[arg-type]

    def _check(self, index: int) -> None:
        w = self._open[index]
        if w[2] >= self.min_labels and w[2] >= w[1] / 2:
            self._finish(index)

    def _finish(self, index: int) -> None:
        est, _, joined, correct, _ = self._open.pop(index)
        self.completed.append(est - correct / joined)

    def sweep(self, now: float) -> None:
        """Compare (or drop, with fewer than ``min_labels``) the windows whose records are
        all older than the horizon."""
        for index in [i for i, w in self._open.items() if w[4] < now - self.horizon]:
            if self._open[index][2] >= self.min_labels:
                self._finish(index)
            else:
                del self._open[index]

    def take_completed(self) -> list[float]:
        out, self.completed = self.completed, []
        return out

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"open": [[i, *w] for i, w in self._open.items()]}
        if self.reference is not None:
            state["reference"] = self.reference
        return state

    def load_state_dict(self, state: Mapping[str, Any] | None) -> bool:
        """Resume the estimates waiting for their labels; whether they were restored. Those of
        another reference (one rebuilt between two runs) are not: its estimator made them,
        and their errors would be exported as this one's (``LrwatchEstimationInaccurate``
        kept firing for hours after the rebuild it asks for)."""
        state = state or {}
        saved = state.get("reference")
        if saved is not None and self.reference is not None and float(saved) != self.reference:
            self._open = OrderedDict()
            _log.warning("the estimates waiting for their labels were made with another "
                         "reference's estimator (one rebuilt since): they are not compared")
            return False
        self._open = OrderedDict((int(r[0]), [float(v) for v in r[1:6]])
                                 for r in state.get("open", []))
        return True
