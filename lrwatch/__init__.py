"""lrwatch: watches models while they train and serve, and acts when something goes wrong.

The training side (:class:`Watcher`) needs torch; everything else (the rules engine, ``lrwatch
replay``, the daemon) imports and runs without it, so ``Watcher`` is loaded lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import ConfigError, ExporterError, LrwatchError, RuleError, TraceFormatError
from .samples import Sample

if TYPE_CHECKING:  # pragma: no cover
    from .recovery.lr_find import lr_find
    from .watch import Watcher

__all__ = [
    "__version__",
    "Watcher",
    "lr_find",
    "Sample",
    "LrwatchError",
    "ConfigError",
    "TraceFormatError",
    "RuleError",
    "ExporterError",
]


def __getattr__(name: str) -> Any:
    if name == "Watcher":
        from .watch import Watcher

        return Watcher
    if name == "lr_find":   # the learning-rate range test (torch)
        from .recovery.lr_find import lr_find

        return lr_find
    raise AttributeError(f"module 'lrwatch' has no attribute {name!r}")
