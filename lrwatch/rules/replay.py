"""Back-testing: run a rule set over recorded traces, each with a fresh engine.

This is the logic behind ``lrwatch replay``; the command only formats what it returns. It never
imports torch.

Examples
--------
>>> import io
>>> from lrwatch.rules import load_pack
>>> trace = io.StringIO('{"step": 1, "loss": 2.0}\\n{"step": 2, "loss": "nan"}\\n')
>>> res = replay_trace(trace, load_pack("training"), name="t.jsonl")
>>> [(e.rule, e.step) for e in res.events], res.samples
([('nonfinite', 2)], 2)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator

from ..errors import TraceFormatError
from ..trace import TraceReader
from .engine import Engine, Firing
from .schema import Rule, RuleSet

__all__ = ["TraceResult", "replay_trace", "expand_traces"]


@dataclass
class TraceResult:
    """What replaying one trace produced.

    ``events`` holds firings and resolutions in order; ``skipped`` counts malformed lines that
    were skipped (lenient mode) and ``bad_lines`` describes the first of them; ``error`` is set
    when the trace could not be replayed to its end (strict mode: the first malformed line).
    """

    path: str
    events: list[Firing] = field(default_factory=list)
    samples: int = 0
    skipped: int = 0
    bad_lines: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def firings(self) -> list[Firing]:
        return [e for e in self.events if e.kind == "firing"]


def replay_trace(source: str | os.PathLike[str] | IO[str], rules: RuleSet | Iterable[Rule], *,
                 strict: bool = True, name: str | None = None) -> TraceResult:
    """Replay one trace with a fresh :class:`Engine` over ``rules``.

    Malformed lines raise nothing: with ``strict`` the replay stops at the first one and
    ``error`` names file and line; otherwise they are skipped and counted.
    """
    label = name or (os.fspath(source) if isinstance(source, (str, os.PathLike))
                     else getattr(source, "name", "<stream>"))
    res = TraceResult(path=label)
    reader = TraceReader(source, strict=strict)
    engine = Engine(rules)
    update = engine.update
    events = res.events
    n = 0
    try:
        for sample in reader:
            n += 1
            if sample.events:
                _follow_start_check(engine, sample.events)
            ev = update(sample)
            if ev:
                events.extend(ev)
            if sample.events:
                _follow_actions(engine, sample.events)
    except TraceFormatError as exc:
        res.error = str(exc) if name is None else f"{label}:{exc.line}: " + \
            str(exc).split(": ", 2)[-1]
    except OSError as exc:
        res.error = f"{label}: cannot read: {exc.strerror or exc}"
    res.samples = n
    res.skipped = reader.skipped
    res.bad_lines = list(reader.errors)
    return res


def _follow_actions(engine: Engine, recorded: Iterable[object]) -> None:
    """Apply the recorded rollbacks to the engine, as the live Watcher did.

    A rollback (or skip) restores the detectors' state of the snapshot it went back to; the
    Watcher writes that state into the event, so replay stays exactly equal to live.
    """
    for ev in recorded:
        if isinstance(ev, dict) and ev.get("type") in ("rollback", "skip") and isinstance(
                ev.get("engine_state"), dict):
            engine.load_state_dict(ev["engine_state"])


def _follow_start_check(engine: Engine, recorded: Iterable[object]) -> None:
    """Apply an adopted start check to the engine, as the live Watcher did: the run goes on
    from a shadow restarted at the start, and the detectors start afresh from the state the
    event carries. The event rides on the first step after the adoption, which the live
    engine judged with that state: so it is applied before that step, not after."""
    for ev in recorded:
        if isinstance(ev, dict) and ev.get("type") == "start_check" and isinstance(
                ev.get("engine_state"), dict):
            engine.load_state_dict(ev["engine_state"])


def expand_traces(paths: Iterable[str | os.PathLike[str]]) -> Iterator[str]:
    """Each path, with directories replaced by the ``*.jsonl`` files under them (sorted)."""
    for p in paths:
        path = Path(p)
        if path.is_dir():
            yield from (str(f) for f in sorted(path.rglob("*.jsonl")) if f.is_file())
        else:
            yield str(path)
