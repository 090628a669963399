"""Windows of live records, by count or by time, and their conversion to test columns.

A :class:`Window` only appends (features dict and prediction per record, label counts); when it
closes, :func:`columns` turns it into the ``(n, Fn)`` float matrix and category codes that
:mod:`.stats` reads, once per window: one ``operator.itemgetter`` per record and one
``np.array`` call (a few times faster than one list per feature).
"""

from __future__ import annotations

import math
from itertools import repeat
from operator import itemgetter
from typing import Any, Mapping

import numpy as np

from ..samples import decode_number, encode_number
from .reference import PREDICTION
from .stats import Profile

__all__ = ["Window", "columns", "prediction_value"]


def prediction_value(p: Any) -> Any:
    """The value a prediction is profiled by: the class index for a probability list."""
    if type(p) is list:
        return max(range(len(p)), key=p.__getitem__) if p else None
    return p


class Window:
    """The records of one open window.

    Records arrive as dicts (:meth:`extend`) or as column slices of a
    :class:`~.columnar.ColumnBatch` (:meth:`extend_batch`); ``feats`` turns the latter into
    dicts only when asked (a snapshot of the open window), never on the ingest path.
    """

    __slots__ = ("index", "start", "end", "_parts", "_n", "preds", "rejected", "joined",
                 "score_sum", "delay_sum", "first_time", "last_time", "cols", "own_joined",
                 "own_correct", "clock_time", "clock_arrival", "last_arrival", "error_mean",
                 "proba_rows")
    #: what a snapshot holds (``cols`` is rebuilt from ``feats``)
    STATE = ("index", "start", "end", "feats", "preds", "rejected", "joined", "score_sum",
             "delay_sum", "first_time", "last_time", "own_joined", "own_correct",
             "clock_time", "clock_arrival", "last_arrival", "error_mean")

    def __init__(self, index: int, start: float | None = None, end: float | None = None) -> None:
        self.index = index
        self.start = start  # time windows: [start, end)
        self.end = end
        # the records' features in order: lists of dicts and ColumnBatch slices
        self._parts: list[Any] = []
        self._n = 0
        self.preds: list[Any] = []
        self.rejected = 0  # records rejected while this window was open
        self.joined = 0  # labels joined while open
        self.score_sum = 0.0  # correct count (classification) or absolute-error sum
        self.delay_sum = 0.0
        # the mean absolute error (regression) kept as a running mean: a sum of finite errors
        # near the float range overflows (100 errors of 2e307) while their mean does not
        self.error_mean = 0.0
        # labels of this window's own predictions that came while it was open (inline ones):
        # the start of its estimate's comparison (see estimate_tracking)
        self.own_joined = 0
        self.own_correct = 0.0
        self.first_time: float | None = None
        self.last_time: float | None = None
        # the newest record time in the window and when it arrived (wall clock): the
        # window's own clock, extrapolated by the wall clock between records (see time_due)
        self.clock_time: float | None = None
        self.clock_arrival: float | None = None
        # when its last record arrived (wall clock): the time of its sample for the rules,
        # whose staleness check (no_traffic) compares it with the wall clock
        self.last_arrival: float | None = None
        # columns extracted per appended slice, while the parsed dicts are still in the cache
        self.cols: list[tuple[np.ndarray, list[np.ndarray]]] = []
        # once closed: which records' probabilities the estimation read (None: all of them)
        self.proba_rows: np.ndarray | None = None

    def __len__(self) -> int:
        return self._n

    @property
    def feats(self) -> list[dict[str, Any]]:
        """Every record's features dict (column slices are turned into dicts here)."""
        parts = self._parts
        if len(parts) != 1 or type(parts[0]) is not list:
            out: list[dict[str, Any]] = []
            for p in parts:
                out.extend(p if type(p) is list else p.feats)
            self._parts = parts = [out]
        return parts[0]

    @feats.setter
    def feats(self, value: list[dict[str, Any]]) -> None:
        self._parts = [list(value)]
        self._n = len(value)

    def extend(self, prof: Profile | None, feats: list[dict[str, Any]], preds: list[Any]) -> None:
        """Append records; with a profile, also extract their columns now (see :func:`columns`)."""
        self._parts.append(list(feats))
        self._n += len(feats)
        self.preds.extend(preds)
        if prof is not None and feats:
            self.cols.append(columns(prof, feats, preds))

    def extend_batch(self, prof: Profile | None, b: Any, lo: int, hi: int) -> None:
        """Append records ``lo:hi`` of a :class:`~.records.Batch`; a column batch decoded for
        this very profile is appended as columns, without dicts."""
        if hi <= lo:
            return
        if prof is not None and getattr(b, "profile", None) is prof:
            part = b.slice(lo, hi)
            self._parts.append(part)
            self._n += hi - lo
            self.preds.extend(part.preds)
            self.cols.append(columns(prof, None, part.preds, block=part.num,
                                     cat_values=part.cats))
            return
        self.extend(prof, b.feats[lo:hi], b.preds[lo:hi])

    def matrix(self, prof: Profile) -> tuple[np.ndarray, list[np.ndarray]]:
        """The window's columns: the extracted slices joined, or extracted now (a window
        restored from a snapshot, or filled before the profile was known)."""
        n = self._n
        if self.cols and sum(len(c[0]) for c in self.cols) == n:
            if len(self.cols) == 1:
                return self.cols[0]
            x = np.concatenate([c[0] for c in self.cols])
            cats = [np.concatenate([c[1][j] for c in self.cols]) for j in range(len(prof.cat))]
            return x, cats
        return columns(prof, self.feats, self.preds)

    def advance_clock(self, newest: float, arrival: float) -> None:
        """Records up to ``newest`` (record time) arrived at ``arrival`` (wall clock)."""
        if self.clock_time is None or newest > self.clock_time:
            self.clock_time = newest
            self.clock_arrival = arrival

    def time_due(self, now: float, seconds: float) -> bool:
        """Whether a time window is over at wall-clock time ``now``: its end plus a tenth
        of its length has passed on the records' clock. That clock is the newest record
        time, moved on by the wall time since that record arrived, so a stream whose
        times run behind (or ahead of) this host's clock still gets windows ``seconds``
        long; reading the wall clock alone, records a minute old closed a 10 s window
        every second."""
        if self.end is None or not self._n:
            return False
        lag = 0.0 if self.clock_time is None or self.clock_arrival is None \
            else self.clock_arrival - self.clock_time
        return now - lag >= self.end + 0.1 * seconds

    #: sums that can overflow to infinity (absolute errors of a regression near the float
    #: range: 1e308 against -1e308): saved as ``"inf"`` (trace format v1), since JSON has
    #: no infinity (orjson writes ``null``, and a snapshot with ``null`` there was no state)
    SUMS = ("score_sum", "delay_sum", "own_correct", "error_mean")

    def state_dict(self) -> dict[str, Any]:
        state = {k: getattr(self, k) for k in self.STATE}
        for k in self.SUMS:
            state[k] = encode_number(state[k])
        return state

    @classmethod
    def from_state(cls, d: Mapping[str, Any]) -> "Window":
        w = cls(int(d["index"]))
        for k in cls.STATE:
            if k in d:
                setattr(w, k, decode_number(d[k]) if k in cls.SUMS else d[k])
        if "error_mean" not in d and w.joined:  # a snapshot of before the sixteenth round
            w.error_mean = w.score_sum / w.joined
        return w

    def add_error(self, err: float) -> None:
        """Fold one joined label's absolute error (>= 0) into ``error_mean`` (``joined``
        already counts it). An infinite error makes the mean infinite for good."""
        m = self.error_mean
        if math.isinf(err) or math.isinf(m):
            self.error_mean = math.inf
        else:
            self.error_mean = m + (err - m) / self.joined

    def mean_error(self) -> float:
        """The window's mean absolute error: the sum's, unless the sum overflowed."""
        mean = self.score_sum / self.joined
        return mean if math.isfinite(mean) else self.error_mean


def _to_float(v: Any) -> float:
    t = type(v)
    if t is float or t is int or t is bool:
        return float(v)
    return math.nan  # missing, or a string where a number was profiled: counted as missing


_NUMERIC_OR_NONE = frozenset({float, int, bool, type(None)})


def _numeric_block(names: list[str], feats: list[dict[str, Any]]) -> np.ndarray:
    """``(n, len(names))`` float64, NaN for missing values and for strings.

    The fast path is one ``itemgetter`` per record and one ``np.array`` call. Without a dtype,
    numpy tells from the result's kind whether any string is present (it would silently parse
    ``"1.5"`` as a number if asked for float64), and ``None`` makes an object array that is
    converted only after its value types were checked.
    """
    n = len(feats)
    try:
        rows = list(map(itemgetter(*names), feats))
        if len(names) == 1:
            rows = [(v,) for v in rows]
        block = np.array(rows)
        kind = block.dtype.kind
        if block.shape == (n, len(names)):
            if kind in "fiub":
                return block.astype(np.float64, copy=False)
            if kind == "O" and _NUMERIC_OR_NONE.issuperset(map(type, block.ravel())):
                return block.astype(np.float64)
    except (KeyError, ValueError, TypeError, OverflowError):
        pass
    return np.array([[_to_float(d.get(nm)) for nm in names] for d in feats],
                    dtype=np.float64).reshape(n, len(names))


def columns(prof: Profile, feats: list[dict[str, Any]] | None, preds: list[Any], *,
            block: np.ndarray | None = None, cat_values: list[list[Any]] | None = None
            ) -> tuple[np.ndarray, list[np.ndarray]]:
    """The window matrix ``(n, Fn)`` (NaN for missing) and category codes per categorical.

    ``block`` and ``cat_values`` are the same data already in columns (what the chunk decoder
    of :mod:`.columnar` produces): ``block`` is :func:`_numeric_block` of the numeric features
    other than the prediction, ``cat_values`` the raw values of each categorical feature other
    than the prediction, in the profile's order. Then ``feats`` is not read.
    """
    n = len(preds)
    names = [nm for nm in prof.num_names if nm != PREDICTION]
    fn = len(prof.num_names)
    if block is None and names:
        block = _numeric_block(names, feats) if n else np.empty((0, len(names)))  # type: ignore
    if names and len(names) == fn:
        x = block.astype(np.float64, copy=False)  # type: ignore[union-attr]
    else:
        x = np.empty((n, fn), dtype=np.float64)
        if names:
            cols = [i for i, nm in enumerate(prof.num_names) if nm != PREDICTION]
            if cols == list(range(len(cols))):  # the prediction is profiled last
                x[:, :len(cols)] = block  # a slice copy; fancy indexing is ~10x slower
            else:
                x[:, cols] = block
    if PREDICTION in prof.num_names:
        j = prof.num_names.index(PREDICTION)
        if set(map(type, preds)) <= {float, int}:
            x[:, j] = preds
        else:
            x[:, j] = [_to_float(prediction_value(p)) for p in preds]
    # the parsers never give a non-finite number (records.NonFinite); this keeps any other
    # caller's infinities out of the statistics too (counted as missing, as NaN is)
    inf = np.isinf(x)
    if inf.any():
        x = np.where(inf, np.nan, x)
    cats = []
    k = 0
    for j, nm in enumerate(prof.cat_names):
        if nm == PREDICTION:
            vals = [prediction_value(p) for p in preds]
        elif cat_values is not None:
            vals = cat_values[k]
            k += 1
        else:
            vals = list(map(dict.get, feats, repeat(nm)))  # type: ignore[arg-type]
        cats.append(prof.encode(j, vals))
    return x, cats
