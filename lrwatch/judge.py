"""The rules engine over one flush: each sample judged in step order.

:class:`Judge` feeds the Watcher's flushed samples to the :class:`~lrwatch.rules.Engine`,
sets each rule's state in the exporter, records the events in the sample (the trace's
``events``, which ``lrwatch replay`` compares with its own) and tells the snapshot bookkeeping
that a step was judged. What to do about the events is the recovery policy's and the
executor's (``PlanExecutor._act``); an engine that raises is counted, never raised (fail open).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable

from .samples import Sample

__all__ = ["Judge", "event_record"]


def event_record(e: Any) -> dict[str, Any]:
    """A rule event as it goes into the trace's ``events``."""
    rec: dict[str, Any] = {"type": e.kind, "rule": e.rule, "severity": e.severity,
                           "step": e.step}
    if e.kind == "firing":
        v = e.value
        rec["value"] = v if v is None or math.isfinite(v) else str(v)
        rec["actions"] = list(e.actions)
        rec["message"] = e.message
    return rec


class Judge:
    """Runs ``engine`` over flushed samples.

    Parameters
    ----------
    engine:
        The rules engine (``update(sample) -> events``).
    set_rule_state:
        ``set_rule_state(rule, severity, firing)`` for every event (the exporter's rule gauge).
    on_judged:
        Called with each step once the engine has judged it (snapshot bookkeeping), or ``None``.
    on_error:
        Reports an internal error (``on_error(what)``, inside the ``except`` block).
    """

    def __init__(self, engine: Any, *, set_rule_state: Callable[[str, str, bool], None],
                 on_judged: Callable[[int], None] | None,
                 on_error: Callable[[str], None]) -> None:
        self.engine = engine
        self.set_rule_state = set_rule_state
        self.on_judged = on_judged
        self.on_error = on_error

    def __call__(self, samples: list[Sample]) -> tuple[list[Sample], list[Any]]:
        """The samples with their events recorded, and all the events in order."""
        out: list[Sample] = []
        events_all: list[Any] = []
        for s in samples:
            try:
                events = self.engine.update(s)
            except Exception:
                self.on_error(f"evaluating rules at step {s.step}")
                events = []
            for e in events:
                self.set_rule_state(e.rule, e.severity, e.kind == "firing")
            events_all.extend(events)
            if self.on_judged is not None:
                self.on_judged(s.step)
            if events:
                s = replace(s, events=s.events + tuple(event_record(e) for e in events))
            out.append(s)
        return out, events_all
