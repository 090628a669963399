"""Shared by the default-pack tests: the critical firings of the training pack on samples."""

from __future__ import annotations

from typing import Iterable

from lrwatch.rules import Engine, RuleSet, load_pack
from lrwatch.samples import Sample


def critical(samples: Iterable[Sample], rules: RuleSet | None = None) -> list[tuple[str, int]]:
    """``(rule, step)`` of every critical firing of ``rules`` (default: the training pack)."""
    eng = Engine(load_pack("training") if rules is None else rules)
    return [(e.rule, e.step) for s in samples for e in eng.update(s)
            if e.kind == "firing" and e.severity == "critical"]
