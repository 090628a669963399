"""Rate-limited logging of repeated failures: the first of a kind is logged, the repeats within
``interval`` seconds are counted, and the next line says how many were held back.

Fail-open code paths (a snapshot that cannot be taken, an Alertmanager that is down, a hook
that keeps failing) may fail at every flush; one line a minute says as much as a thousand.

>>> import logging, io
>>> buf = io.StringIO(); lg = logging.getLogger("lrwatch.doctest")
>>> lg.addHandler(logging.StreamHandler(buf)); lg.propagate = False
>>> now = [0.0]; lim = LogLimiter(interval=60.0, clock=lambda: now[0])
>>> for t in (0.0, 1.0, 2.0, 61.0):
...     now[0] = t; _ = lim.warning(lg, "disk", "cannot write %s", "x")
>>> print(buf.getvalue(), end="")
cannot write x
cannot write x (2 more like it in the last 61 s)
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

__all__ = ["LogLimiter"]


class LogLimiter:
    """Per-key rate limit for log lines (thread-safe). ``interval`` seconds between lines of a
    key; the lines in between are counted and reported on the next one."""

    def __init__(self, interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = float(interval)
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def log(self, logger: logging.Logger, level: int, key: str, msg: str, *args: Any,
            **kwargs: Any) -> bool:
        """Log ``msg % args`` unless a line of ``key`` was logged less than ``interval``
        seconds ago; returns whether it was logged."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            held = self._held.pop(key, 0)
            self._last[key] = now
        if held:
            msg = f"{msg} ({held} more like it in the last {now - last:.0f} s)"
        logger.log(level, msg, *args, **kwargs)
        return True

    def warning(self, logger: logging.Logger, key: str, msg: str, *args: Any,
                **kwargs: Any) -> bool:
        return self.log(logger, logging.WARNING, key, msg, *args, **kwargs)
