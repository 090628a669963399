"""Non-finite values: ``nan`` or ``±inf`` in a metric."""

from __future__ import annotations

import math
from typing import ClassVar, Mapping

from .base import Detector, Param

__all__ = ["NonFinite"]


class NonFinite(Detector):
    """Fires on every ``nan`` or infinite value.

    Parameters
    ----------
    which:
        ``any`` (``nan`` or ``±inf``), ``nan`` or ``inf`` (either sign).

    Notes
    -----
    False alarms: none by construction; a non-finite loss or gradient is always a fault (with
    mixed precision the *loss scaler* skips the steps whose scaled gradients overflow: the
    Watcher records those as ``skipped``, without their gradient norm, so they are not seen
    here).
    Memory: O(1), a single counter.

    Examples
    --------
    >>> det = NonFinite()
    >>> [det.update(x) for x in (1.0, float("nan"), float("inf"), 2.0)]
    [False, True, True, False]
    >>> det.count
    2
    """

    name: ClassVar[str] = "nonfinite"
    PARAMS: ClassVar[Mapping[str, Param]] = {
        "which": Param(str, "which values count", choices=("any", "nan", "inf")),
    }
    _STATE = ("count",)

    def __init__(self, *, which: str = "any") -> None:
        self._set_params(which=which)
        self._count = 0

    @property
    def count(self) -> int:
        """How many non-finite values were seen."""
        return self._count

    def update(self, x: float, t: float | None = None) -> bool | None:
        if self.which == "any":
            bad = not math.isfinite(x)
        elif self.which == "nan":
            bad = x != x
        else:
            bad = math.isinf(x)
        self._count += bad
        return bad
