"""The rules engine: rule files, streaming detectors, and the pure engine that evaluates them.

>>> from lrwatch.rules import Engine, load_pack
>>> from lrwatch.samples import Sample
>>> eng = Engine(load_pack("training"))
>>> [e.rule for e in eng.update(Sample(step=1, values={"loss": float("nan")}))]
['nonfinite']

Nothing here imports torch: ``lrwatch replay`` and the daemon use the engine without it.
"""

from __future__ import annotations

from .detectors import DETECTORS, Detector
from .engine import Engine, Firing
from .schema import (ACTIONS, PACKS, SEVERITIES, Rule, RuleSet, Span, load_pack, load_rules,
                     pack_text, parse_rules)

__all__ = [
    "Engine",
    "Firing",
    "Rule",
    "RuleSet",
    "Span",
    "load_rules",
    "load_pack",
    "parse_rules",
    "pack_text",
    "Detector",
    "DETECTORS",
    "PACKS",
    "SEVERITIES",
    "ACTIONS",
]
