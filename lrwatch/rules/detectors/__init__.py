"""Streaming detectors, one per module. ``DETECTORS`` maps the rule-file name to the class.

Every detector takes one value per :meth:`~Detector.update` and answers ``True`` (anomalous),
``False`` (normal) or ``None`` (no decision), keeps O(1) or ``O(window)`` memory however long the
stream, and saves its state with :meth:`~Detector.state_dict`.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from ...errors import ConfigError
from .above_min import AboveMin
from .base import Detector, Param
from .baseline import Baseline
from .below_max import BelowMax
from .cusum import Cusum
from .drop import Drop
from .ema_ratio import EmaRatio
from .fewer import Fewer
from .frozen import Frozen
from .nonfinite import NonFinite
from .page_hinkley import PageHinkley
from .plateau import Plateau
from .rate import Rate
from .regression import Regression
from .spike import Spike
from .stall import Stall
from .staleness import Staleness
from .start_ratio import StartRatio
from .threshold import Threshold
from .trend import Trend
from .untrained import Untrained

__all__ = [
    "DETECTORS", "Detector", "Param", "make_detector",
    "AboveMin", "Baseline", "BelowMax", "Cusum", "Drop", "EmaRatio", "Fewer", "Frozen", "NonFinite", "PageHinkley", "Plateau", "Rate",
    "Regression", "Spike", "Stall", "Staleness", "StartRatio", "Threshold", "Trend", "Untrained",
]

#: Rule-file name -> detector class (read-only).
DETECTORS: Mapping[str, type[Detector]] = MappingProxyType({
    cls.name: cls for cls in (NonFinite, Threshold, Spike, EmaRatio, Cusum, PageHinkley, Trend,
                              Regression, Plateau, Baseline, StartRatio, Rate, Staleness,
                              Untrained, Frozen, Drop, AboveMin, BelowMax, Fewer, Stall)
})


def make_detector(name: str, **params: object) -> Detector:
    """Build the detector called ``name`` (raises :class:`ConfigError` listing valid choices).

    >>> make_detector("threshold", above=1.0).update(2.0)
    True
    """
    cls = DETECTORS.get(name)
    if cls is None:
        raise ConfigError(f"unknown detector {name!r} (valid choices: {', '.join(DETECTORS)})")
    unknown = [k for k in params if k not in cls.PARAMS]
    if unknown:
        raise ConfigError(f"{name}: unknown parameter {unknown[0]!r} "
                          f"(valid choices: {', '.join(cls.PARAMS) or 'none'})")
    return cls(**params)  # type: ignore[arg-type]
