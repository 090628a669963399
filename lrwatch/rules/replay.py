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
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Mapping

from ..errors import LrwatchError, TraceFormatError
from ..samples import Sample
from ..trace import TraceReader
from .engine import Engine, Firing
from .schema import Rule, RuleSet

__all__ = ["TraceResult", "replay_trace", "adopt_state", "expand_traces"]


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
                 strict: bool = True, name: str | None = None,
                 on_progress: Callable[[int], object] | None = None,
                 progress_every: int = 50_000) -> TraceResult:
    """Replay one trace with a fresh :class:`Engine` over ``rules``.

    Malformed lines raise nothing: with ``strict`` the replay stops at the first one and
    ``error`` names file and line; otherwise they are skipped and counted. A trace without a
    single sample (empty, blank, or every line skipped) is an error too. An engine state in
    the recorded events that cannot be read counts as a malformed line. Nothing else raises
    either: an exception out of the engine (a bug, or a detector that cannot cope with a
    value) ends that trace with ``error`` set, so one trace never takes a batch down.
    ``on_progress``, if given, is called with the samples replayed so far every
    ``progress_every`` samples (a long trace takes minutes).
    """
    label = name or (os.fspath(source) if isinstance(source, (str, os.PathLike))
                     else getattr(source, "name", "<stream>"))
    res = TraceResult(path=label)
    reader = TraceReader(source, strict=strict)
    engine = Engine(rules)
    n = 0
    try:
        for sample in reader:
            n += 1
            _judge(engine, reader, sample, res.events)
            if on_progress is not None and n % progress_every == 0:
                on_progress(n)
    except TraceFormatError as exc:
        res.error = str(exc) if name is None else f"{label}:{exc.line}: " + \
            str(exc).split(": ", 2)[-1]
    except OSError as exc:
        res.error = f"{label}: cannot read: {exc.strerror or exc}"
    except Exception as exc:  # noqa: BLE001 - one trace's failure is reported, not raised
        res.error = (f"{label}:{reader.lineno}: the rules failed on this line "
                     f"({type(exc).__name__}: {reprlib.repr(str(exc))[1:-1]})")
    res.samples = n
    res.skipped = reader.skipped
    res.bad_lines = list(reader.errors)
    if res.error is None and n == 0:   # a CI job must not pass on a trace that holds nothing
        res.error = f"{label}: no samples in the trace" + (
            f" ({res.skipped} malformed line(s) skipped)" if res.skipped else "")
    return res


def _judge(engine: Engine, reader: TraceReader, sample: Sample, events: list[Firing]) -> None:
    """Add one sample's events to ``events``, with the engine states its recorded events carry applied as the
    live Watcher applied them: an adopted start check's, or a resumed run's (the state its
    checkpoint held), before the step (the event rides on the first step after the adoption
    or the resume, which the live engine judged with that state), a rollback's (or skip's)
    after it. A rollback restores the detectors' state of the snapshot
    it went back to; the Watcher writes that state into the event, so replay stays exactly
    equal to live. The events are added before a rollback's state is, so that a strict replay
    stopped by a corrupt state still reports what the step fired."""
    if not sample.events:
        events.extend(engine.update(sample))
        return
    _follow(engine, reader, sample.events, ("start_check", "resume"))
    events.extend(engine.update(sample))
    _follow(engine, reader, sample.events, ("rollback", "skip"))


def _follow(engine: Engine, reader: TraceReader, recorded: Iterable[object],
            types: tuple[str, ...]) -> None:
    """Apply the ``engine_state`` of each recorded event of one of ``types``; one that cannot
    be read is rejected (named ``events[i].engine_state``) and not applied."""
    for i, ev in enumerate(recorded):
        if isinstance(ev, dict) and ev.get("type") in types and "engine_state" in ev:
            try:
                adopt_state(engine, ev["engine_state"])
            except ValueError as exc:
                reader.reject(f"key 'events[{i}].engine_state': {exc}")


def adopt_state(engine: Engine, state: Any) -> None:
    """Load a recorded engine state into ``engine``, rule by rule.

    Back-testing replays a trace with rules other than the live run's (``--rules``, another
    pack): the state then holds rules the engine lacks and lacks rules it holds. Each rule of
    the engine takes its saved state when the state has one for the same name and the same
    detectors (metric for metric); any other rule goes on from where the replay had it, as if
    the rollback had not touched it. The run's own position (last step and time, the latest
    ``given`` values) is taken as saved.

    Raises ``ValueError`` (the engine unchanged) for a state that is not one: not an object,
    another version, a rule entry that is not an object with ``detectors``, or one that does
    not load.
    """
    if not isinstance(state, dict):
        raise ValueError(f"expected an object, got {type(state).__name__}")
    if state.get("version") != 1:
        raise ValueError(f"unsupported engine state version {reprlib.repr(state.get('version'))}")
    saved = state.get("rules")
    if not isinstance(saved, dict):
        raise ValueError("key 'rules': expected an object")
    current = engine.state_dict()
    merged = dict(current["rules"])
    for rule, entry in saved.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("detectors"), dict):
            raise ValueError(f"rule {reprlib.repr(rule)}: expected an object with 'detectors'")
        mine = merged.get(rule)
        if mine is not None and _same_detectors(mine["detectors"], entry["detectors"]):
            merged[rule] = entry
    position = {k: state[k] for k in ("last_step", "last_time", "given") if k in state}
    for key, kinds in (("last_step", (int,)), ("last_time", (int, float))):
        v = position.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, kinds)):
            raise ValueError(f"key {key!r}: expected a number, got {reprlib.repr(v)}")
    try:
        engine.load_state_dict({**current, **position, "rules": merged})
    except (LrwatchError, LookupError, TypeError, ValueError, AttributeError) as exc:
        engine.load_state_dict(current)   # all or nothing: a half-loaded engine judges wrongly
        raise ValueError(f"cannot be loaded: {reprlib.repr(str(exc))[1:-1]}") from None


def _same_detectors(mine: Mapping[str, Any], saved: Mapping[str, Any]) -> bool:
    """Whether a saved rule state is for a rule like the engine's: the same metrics, each
    with the same detector (the engine's own state tells which)."""
    return set(mine) == set(saved) and all(
        isinstance(saved[m], dict) and saved[m].get("detector") == mine[m].get("detector")
        for m in mine)


def expand_traces(paths: Iterable[str | os.PathLike[str]]) -> Iterator[str]:
    """Each path, with directories replaced by the ``*.jsonl`` and ``*.jsonl.gz`` files under
    them (sorted); a compressed copy beside its ``.jsonl`` is left out (one run, read once).

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> for name in ("a.jsonl", "a.jsonl.gz", "b.jsonl.gz", "notes.txt"):
    ...     _ = (d / name).write_text("")
    >>> [Path(p).name for p in expand_traces([d])]
    ['a.jsonl', 'b.jsonl.gz']
    """
    for p in paths:
        path = Path(p)
        if path.is_dir():
            plain = {f for f in path.rglob("*.jsonl") if f.is_file()}
            packed = {f for f in path.rglob("*.jsonl.gz")
                      if f.is_file() and f.with_suffix("") not in plain}
            yield from (str(f) for f in sorted(plain | packed))
        else:
            yield str(path)
