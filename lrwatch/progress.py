"""Progress lines for long command-line work, on stderr (stdout stays for results and JSON).

One line at the start of each stage, then at most one every ``interval`` seconds, and one when a
stage completes: readable in a terminal and in a CI log alike (no carriage returns).

>>> import io
>>> clock = iter([0.0, 0.5, 3.0, 4.0]).__next__
>>> out = io.StringIO()
>>> p = Progress("calibrating", interval=2.0, stream=out, clock=clock)
>>> for k in (0, 100, 200, 300):
...     p.update(k, 300, "resamples")
>>> print(out.getvalue(), end="")
calibrating: 0/300 resamples
calibrating: 200/300 resamples (3.0 s, about 1.5 s left)
calibrating: 300/300 resamples (4.0 s)
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, TextIO, Union

__all__ = ["Progress", "DEFAULT_INTERVAL"]

#: Seconds between two progress lines of one stage (``LRWATCH_PROGRESS_INTERVAL`` overrides).
DEFAULT_INTERVAL = 3.0

#: A detail for the line, or a function that makes it (called only when a line is printed).
Detail = Union[str, Callable[[], str]]


def _interval_from_env() -> float:
    raw = os.environ.get("LRWATCH_PROGRESS_INTERVAL")
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_INTERVAL
    except ValueError:
        return DEFAULT_INTERVAL


def _secs(x: float) -> str:
    return f"{x:.1f} s" if x < 10 else f"{x:.0f} s"


class Progress:
    """``update(done, total, unit)`` as work goes on; it decides when a line is worth printing.

    ``stream`` is ``sys.stderr`` at the time of each write by default (so that click's test
    runner, which swaps it, captures the lines); ``enabled=False`` prints nothing.
    """

    def __init__(self, label: str, *, interval: float | None = None,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                 enabled: bool = True) -> None:
        self.label = label
        self.interval = _interval_from_env() if interval is None else float(interval)
        self._stream = stream
        self._clock = clock
        self.enabled = enabled
        self._unit: str | None = None
        self._start = 0.0
        self._last = 0.0
        self.lines = 0

    def update(self, done: int, total: int, unit: str = "", detail: Detail = "") -> None:
        """Report ``done`` of ``total`` ``unit`` (a new ``unit`` starts a new stage).

        ``detail`` may be a function, called only when a line is printed (for values that
        cost something to read, like a loss on the GPU)."""
        if not self.enabled:
            return
        now = self._clock()
        if unit != self._unit:
            self._unit, self._start, self._last = unit, now, now
            self._write(done, total, unit, detail, None)
            return
        if done >= total or now - self._last >= self.interval:
            self._last = now
            self._write(done, total, unit, detail, now - self._start)

    def message(self, text: str) -> None:
        """A line of its own (what is about to happen, or what came of it)."""
        if self.enabled:
            self._emit(f"{self.label}: {text}")

    def _write(self, done: int, total: int, unit: str, detail: Detail,
               elapsed: float | None) -> None:
        line = f"{self.label}: {done}/{total}" + (f" {unit}" if unit else "")
        if callable(detail):
            detail = detail()
        if detail:
            line += f", {detail}"
        if elapsed is not None:
            left = ""
            if 0 < done < total:
                left = f", about {_secs(elapsed / done * (total - done))} left"
            line += f" ({_secs(elapsed)}{left})"
        self._emit(line)

    def _emit(self, line: str) -> None:
        stream = self._stream if self._stream is not None else sys.stderr
        stream.write(line + "\n")
        stream.flush()
        self.lines += 1
