"""Windows of live records, by count or by time, and their conversion to test columns.

A :class:`Window` only appends (features dict and prediction per record, label counts); when it
closes, :func:`columns` turns it into the ``(n, Fn)`` float matrix and category codes that
:mod:`.stats` reads. Building the matrix with ``operator.itemgetter`` rows is about twice as
fast as one list per feature.
"""

from __future__ import annotations

import math
from operator import itemgetter
from typing import Any, Mapping

import numpy as np

from .reference import PREDICTION
from .stats import Profile

__all__ = ["Window", "columns", "prediction_value"]


def prediction_value(p: Any) -> Any:
    """The value a prediction is profiled by: the class index for a probability list."""
    if type(p) is list:
        return max(range(len(p)), key=p.__getitem__) if p else None
    return p


class Window:
    """The records of one open window."""

    __slots__ = ("index", "start", "end", "feats", "preds", "rejected", "joined", "score_sum",
                 "delay_sum", "first_time", "last_time")

    def __init__(self, index: int, start: float | None = None, end: float | None = None) -> None:
        self.index = index
        self.start = start  # time windows: [start, end)
        self.end = end
        self.feats: list[dict[str, Any]] = []
        self.preds: list[Any] = []
        self.rejected = 0  # records rejected while this window was open
        self.joined = 0  # labels joined while open
        self.score_sum = 0.0  # correct count (classification) or absolute-error sum
        self.delay_sum = 0.0
        self.first_time: float | None = None
        self.last_time: float | None = None

    def __len__(self) -> int:
        return len(self.feats)

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}

    @classmethod
    def from_state(cls, d: Mapping[str, Any]) -> "Window":
        w = cls(int(d["index"]))
        for k in cls.__slots__:
            if k in d:
                setattr(w, k, d[k])
        return w


def _to_float(v: Any) -> float:
    t = type(v)
    if t is float or t is int or t is bool:
        return float(v)
    return math.nan  # missing, or a string where a number was profiled: counted as missing


def columns(prof: Profile, feats: list[dict[str, Any]],
            preds: list[Any]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The window matrix ``(n, Fn)`` (NaN for missing) and category codes per categorical."""
    n = len(feats)
    names = [nm for nm in prof.num_names if nm != PREDICTION]
    x = np.empty((n, len(prof.num_names)), dtype=np.float64)
    if names:
        block = None
        try:
            get = itemgetter(*names)
            rows = [get(d) for d in feats]
            block = np.array(rows, dtype=np.float64).reshape(n, len(names))
            if any(type(v) is str for v in (rows[0] if len(names) > 1 else rows[:1])):
                block = None  # numpy parses numeric strings; keep the typed path
        except (KeyError, ValueError, TypeError):
            block = None
        if block is None:
            block = np.array([[_to_float(d.get(nm)) for nm in names] for d in feats],
                             dtype=np.float64).reshape(n, len(names))
        j = 0
        for i, nm in enumerate(prof.num_names):
            if nm != PREDICTION:
                x[:, i] = block[:, j]
                j += 1
    if PREDICTION in prof.num_names:
        x[:, prof.num_names.index(PREDICTION)] = [_to_float(prediction_value(p)) for p in preds]
    cats = []
    for j, nm in enumerate(prof.cat_names):
        if nm == PREDICTION:
            vals = [prediction_value(p) for p in preds]
        else:
            vals = [d.get(nm) for d in feats]
        cats.append(prof.encode(j, vals))
    return x, cats
