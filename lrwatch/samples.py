"""The unit of data that flows from the front ends (training, serving) into the engine."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["Sample"]


@dataclass(frozen=True)
class Sample:
    """One optimizer step (training) or one window (serving).

    Parameters
    ----------
    step:
        The global step (training) or window index (serving); increasing.
    time:
        Unix seconds when the step finished, or ``None`` when unknown.
    values:
        Metric name to float. Non-finite values are kept as ``nan``/``inf``. ``lr`` holds the
        learning rate of the first parameter group; ``lr_groups`` holds all of them.
    lr_groups:
        The learning rate of every parameter group, or ``None`` when not measured.
    events:
        Things that happened at this step (rollbacks, firings), as JSON-ready dicts.

    Examples
    --------
    >>> s = Sample(step=3, time=None, values={"loss": 2.5, "lr": 0.1}, lr_groups=(0.1, 0.01))
    >>> s.get("loss"), s.get("accuracy")
    (2.5, None)
    """

    step: int
    time: float | None = None
    values: Mapping[str, float] = field(default_factory=dict)
    lr_groups: tuple[float, ...] | None = None
    events: tuple[Mapping[str, Any], ...] = ()

    def get(self, name: str) -> float | None:
        """The value of metric ``name`` at this step, or ``None`` when it was not measured."""
        return self.values.get(name)

    def is_finite(self, name: str) -> bool:
        v = self.values.get(name)
        return v is not None and math.isfinite(v)
