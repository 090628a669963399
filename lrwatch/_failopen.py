"""Fail open: a monitoring failure at run time is counted and logged, never raised into the loop.

:class:`FailOpen` is how the Watcher reports its own failures: each one counts in
``lrwatch_internal_errors_total`` (through the ``count`` it is given) and is logged at most a
line a minute per kind (:class:`~lrwatch._ratelimit.LogLimiter`); a bad value handed to
``log()`` is a warning, once per key.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable

from ._ratelimit import LogLimiter

__all__ = ["FailOpen"]

log = logging.getLogger("lrwatch")


class FailOpen:
    """Counts and reports internal errors; ``count()`` is called once per failure."""

    def __init__(self, count: Callable[[], None]) -> None:
        self.count = count
        self._limit = LogLimiter()   # an internal error repeating at every flush: a line a minute
        self._warned: set[str] = set()

    def guard(self, fn: Callable[..., Any], *args: Any) -> None:
        """Call ``fn(*args)``; an exception is reported as an internal error, not raised."""
        try:
            fn(*args)
        except Exception as exc:
            self.error(f"{getattr(fn, '__qualname__', fn)}: {exc}")

    def error(self, what: str) -> None:
        """Report the exception being handled (``what`` went wrong; its kind is before a ':')."""
        self.count()
        self._limit.warning(log, what.split(":", 1)[0], "lrwatch: internal error while %s "
                            "(training goes on)", what, exc_info=True)

    def warn_once(self, key: str, message: str, stacklevel: int = 3) -> None:
        """Count a bad input; warn about ``key`` the first time only. The default
        ``stacklevel`` points at the line that called the method that called this one."""
        self.count()
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=stacklevel)
