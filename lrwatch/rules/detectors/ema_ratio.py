"""Ratio of a value to the exponential moving average of the values before it."""

from __future__ import annotations

import math
from typing import ClassVar, Mapping

from ...errors import ConfigError
from .base import Detector, Param

__all__ = ["EmaRatio"]


class EmaRatio(Detector):
    """Fires when ``x / EMA`` is above ``above`` or below ``below``.

    The EMA starts at the first positive value and is updated *after* the comparison, so the
    ratio compares a value with its own past only.

    Parameters
    ----------
    alpha:
        EMA weight of the newest value (``1 / alpha`` is roughly the memory in values).
    above, below:
        Ratio bounds; at least one must be set.
    warmup:
        Values in the EMA before the first decision.
    clip:
        Optional. A value enters the EMA as at most ``clip`` times the EMA, so one spike can
        raise the average by at most ``alpha * (clip - 1)`` of itself (a single gradient-norm
        spike 10^4x its level no longer makes the ordinary values after it look "vanished");
        a sustained rise is followed at up to ``1 + alpha * (clip - 1)`` per value. Falls are
        followed as without it. The comparison itself uses the raw value.

    Notes
    -----
    Meant for positive metrics (learning rate, gradient norm); while the EMA is ``<= 0`` there is
    no decision. Every finite value enters the EMA, so a sustained level shift fires for roughly
    ``log(ratio) / alpha`` values and then resolves, while a sudden single jump (a learning rate
    multiplied by 10) fires at once. Smooth changes never fire: a linear warm-up ramp gives a
    ratio of about ``t / (t - 1/alpha)``, well under 2 after the first ``2 / alpha`` values.
    False alarms: noise whose ratio to its mean exceeds the bound (pick bounds far outside the
    normal spread, e.g. 4-10x). Memory: O(1).

    Examples
    --------
    >>> det = EmaRatio(alpha=0.3, above=4.0)
    >>> lr = [1e-4 * min(1.0, (i + 1) / 20) for i in range(60)]   # warm-up ramp, then constant
    >>> lr[50] = 1e-2                                             # a 100x bug
    >>> [i for i, x in enumerate(lr) if det.update(x)]
    [50]
    """

    name: ClassVar[str] = "ema_ratio"
    PARAMS: ClassVar[Mapping[str, Param]] = {
        "alpha": Param(float, "EMA weight of the newest value", min=0, min_open=True, max=1),
        "above": Param(float, "fire when x / EMA is greater", min=0, optional=True),
        "below": Param(float, "fire when x / EMA is smaller", min=0, optional=True),
        "warmup": Param(int, "values before the first decision", min=1),
        "clip": Param(float, "a value enters the EMA as at most clip x EMA", min=1,
                      optional=True),
    }
    _STATE = ("ema", "n", "ratio")

    def __init__(self, *, alpha: float = 0.1, above: float | None = None,
                 below: float | None = None, warmup: int = 5,
                 clip: float | None = None) -> None:
        self._set_params(alpha=alpha, above=above, below=below, warmup=warmup, clip=clip)
        if above is None and below is None:
            raise ConfigError("ema_ratio needs 'above', 'below' or both")
        if above is not None and below is not None and below >= above:
            raise ConfigError(f"ema_ratio 'below' ({below}) must be smaller than 'above' ({above})")
        self._ema: float | None = None
        self._n = 0
        self._ratio: float | None = None

    @property
    def ema(self) -> float | None:
        """The moving average (``None`` before the first positive value)."""
        return self._ema

    @property
    def statistic(self) -> float | None:
        """The latest ratio ``x / EMA``."""
        return self._ratio

    def update(self, x: float, t: float | None = None) -> bool | None:
        if not math.isfinite(x):
            return None
        ema = self._ema
        if ema is None:
            if x > 0.0:
                self._ema, self._n = x, 1
            return None
        verdict: bool | None = None
        if ema > 0.0:
            r = x / ema
            self._ratio = r
            if self._n >= self.warmup:
                verdict = (self.above is not None and r > self.above) or (
                    self.below is not None and r < self.below)
        if self.clip is not None and ema > 0.0:
            x = min(x, self.clip * ema)
        self._ema = ema + self.alpha * (x - ema)
        self._n += 1
        return verdict
