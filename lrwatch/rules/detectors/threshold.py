"""Fixed thresholds: a value above ``above`` or below ``below``."""

from __future__ import annotations

from typing import ClassVar, Mapping

from ...errors import ConfigError
from .base import Detector, Param

__all__ = ["Threshold"]


class Threshold(Detector):
    """Fires while the value is above ``above`` or below ``below``.

    Parameters
    ----------
    above, below:
        The bounds; at least one must be set. Equal to the bound is normal.

    Notes
    -----
    ``nan`` gets no decision (watch it with ``nonfinite``); ``±inf`` is compared like any number.
    False alarms: exactly those values beyond the bound; the detector has no memory (O(1)), so pair
    it with ``for:`` in the rule when single noisy values should not fire.

    Examples
    --------
    >>> det = Threshold(above=0.5)
    >>> [det.update(x) for x in (0.0, 1.0, float("nan"), 0.5)]
    [False, True, None, False]
    """

    name: ClassVar[str] = "threshold"
    PARAMS: ClassVar[Mapping[str, Param]] = {
        "above": Param(float, "fire when the value is greater", optional=True),
        "below": Param(float, "fire when the value is smaller", optional=True),
    }
    _STATE = ("last",)
    _NO_NAN = ("last",)

    def __init__(self, *, above: float | None = None, below: float | None = None) -> None:
        self._set_params(above=above, below=below)
        if above is None and below is None:
            raise ConfigError("threshold needs 'above', 'below' or both")
        if above is not None and below is not None and below > above:
            raise ConfigError(f"threshold 'below' ({below}) must not exceed 'above' ({above})")
        self._last: float | None = None

    @property
    def statistic(self) -> float | None:
        return self._last

    def update(self, x: float, t: float | None = None) -> bool | None:
        if x != x:
            return None
        self._last = x
        return (self.above is not None and x > self.above) or (
            self.below is not None and x < self.below)
