"""Steps that are not the run's: which Watchers' step hooks watch an optimizer.

A Watcher's own range tests (a rollback's probe, the pre-flight check, the start check's
shadow) set its ``_probing`` flag, and its optimizer hooks skip those steps. A range test run
from outside it -- ``lrwatch.lr_find`` on an optimizer a Watcher already watches -- has no such
flag to set: its steps were recorded as the run's (the step counter ran on, the trace and the
rules got the test's rates and its blow-up). :func:`throwaway_steps` tells every Watcher whose
hooks watch the optimizer that the steps in its block are not the run's.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator

__all__ = ["watch_steps", "throwaway_steps"]

#: optimizer -> the Watchers whose step hooks are registered on it (weakly: neither is kept)
_HOOKED: "weakref.WeakKeyDictionary[Any, weakref.WeakSet[Any]]" = weakref.WeakKeyDictionary()


def watch_steps(optimizer: Any, watcher: Any) -> None:
    """``watcher``'s step hooks are on ``optimizer``."""
    _HOOKED.setdefault(optimizer, weakref.WeakSet()).add(watcher)


@contextlib.contextmanager
def throwaway_steps(optimizer: Any) -> Iterator[None]:
    """Within the block, the Watchers watching ``optimizer`` skip its steps (``_probing``)."""
    watchers = [w for w in list(_HOOKED.get(optimizer, ())) if not getattr(w, "_probing", True)]
    for w in watchers:
        w._probing = True
    try:
        yield
    finally:
        for w in watchers:
            w._probing = False
