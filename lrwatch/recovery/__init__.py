"""Recovery: the pure policy that decides, the learning-rate range test, and their executors.

``curve`` and ``policy`` are torch-free (decisions); ``lr_find`` runs a range test on a model
(side effects, torch). ``lr_find`` is loaded lazily so that importing the pure parts never
imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .curve import LRCurve, RangeTest, geometric_rates, suggest

if TYPE_CHECKING:  # pragma: no cover
    from .lr_find import lr_find

__all__ = ["LRCurve", "RangeTest", "geometric_rates", "suggest", "lr_find"]


def __getattr__(name: str) -> Any:
    if name == "lr_find":
        from .lr_find import lr_find

        return lr_find
    raise AttributeError(f"module 'lrwatch.recovery' has no attribute {name!r}")
