"""Sorted copies of parts of a sliding window, kept in step one value at a time.

A detector that takes medians over parts of its window (the newer half, the older half) and
over the step-to-step differences of its newest values sorted each of them again on every
value: O(n log n) per value, the hot path of a replay. :class:`SortedSpans` keeps them sorted
as the window slides (a deletion and an insertion each), and gives the same medians: each
sorted copy holds exactly the values sorting that part of the window gives.

>>> from collections import deque
>>> buf = deque([5.0, 1.0, 4.0, 2.0], maxlen=4)
>>> spans = SortedSpans(((0, 2), (2, 4)), diffs=4)
>>> spans.build(buf)
>>> spans.median(0), spans.median(1), spans.diff_median()
(3.0, 3.0, 3.0)
>>> spans.slide(buf, 8.0); buf.append(8.0)
>>> spans.median(0), spans.median(1), spans.diff_median()
(5.0, 2.5, 3.0)
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import deque
from operator import sub
from typing import Sequence

from .base import sorted_median

__all__ = ["SortedSpans"]


class SortedSpans:
    """Sorted copies of parts of a window and of its newest values' differences.

    Parameters
    ----------
    spans:
        Parts of the window by age, ``(a, b)`` for the values ``a`` to ``b - 1`` steps old
        (0: the newest value): ``(0, h)`` the newest ``h`` values, ``(h, 2 * h)`` the ``h``
        before them.
    diffs:
        The differences ``|x[i + 1] - x[i]|`` of the newest ``diffs`` values (at least 2).

    Notes
    -----
    Values must be finite (NaN sorts nowhere; the detectors keep only finite values). Call
    :meth:`build` on a window that holds every part (at least ``diffs`` and every ``b``
    values), then :meth:`slide` before each value is appended to the full window.
    """

    __slots__ = ("spans", "diffs", "_lists", "_diffs")

    def __init__(self, spans: Sequence[tuple[int, int]], diffs: int) -> None:
        self.spans = tuple(spans)
        self.diffs = diffs
        self._lists: list[list[float]] = []
        self._diffs: list[float] = []

    def build(self, buf: deque[float]) -> None:
        """Sort every part of the window ``buf`` (oldest value first) afresh."""
        vals = list(buf)
        n = len(vals)
        self._lists = [sorted(vals[n - b:n - a]) for a, b in self.spans]
        tail = vals[n - self.diffs:]
        self._diffs = sorted(map(abs, map(sub, tail[1:], tail[:-1])))

    def slide(self, buf: deque[float], x: float) -> None:
        """Follow the full window ``buf`` as ``x`` is appended to it (call before appending):
        each part loses its oldest value and gains the one that moves in."""
        for (a, b), lst in zip(self.spans, self._lists):
            del lst[bisect_left(lst, buf[-b])]
            insort(lst, buf[-a] if a else x)
        m, d = self.diffs, self._diffs
        del d[bisect_left(d, abs(buf[1 - m] - buf[-m]))]
        insort(d, abs(x - buf[-1]))

    def median(self, i: int) -> float:
        """The median of part ``i`` (in the order of ``spans``)."""
        return sorted_median(self._lists[i])

    def diff_median(self) -> float:
        """The median of the differences."""
        return sorted_median(self._diffs)
