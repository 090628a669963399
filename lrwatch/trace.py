"""Trace format v1, the codec: JSON Lines records to and from :class:`~lrwatch.samples.Sample`.

The format is a contract (see docs/design.md)::

    {"step": 120, "time": 1764300000.5, "lr": 0.001, "loss": 2.31, "grad_norm": 1.2}

``step`` is required and strictly increasing; ``time`` is optional; ``lr`` is a number or a list
with one number per parameter group; every other key is a metric with a number. Non-finite numbers
are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"``; readers also accept bare
``NaN``/``Infinity``. A line may carry ``"events": [...]``. An object holds each key once (a
line with a key twice is a bad line). A trace file kept gzip-compressed is
read as the trace it holds, and a byte-order mark before its first line is ignored.

This module is pure (no side effects but reading the file it is given) and torch-free: the
engine side (``lrwatch replay``, ``lrwatch report``) reads traces through it; the writer that
the Watcher uses is :class:`lrwatch.exporters.trace.TraceWriter`.

Examples
--------
>>> import io, json
>>> rec = encode_sample(Sample(step=1, values={"lr": 0.1, "loss": float("nan")}, lr_groups=(0.1,)))
>>> json.dumps(rec)
'{"step": 1, "lr": 0.1, "loss": "nan"}'
>>> [s.values["loss"] for s in iter_trace(io.StringIO(json.dumps(rec) + "\\n"))]
[nan]
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
import os
import reprlib
import zlib
from dataclasses import dataclass
from typing import IO, Any, Iterator, Mapping

from .errors import TraceFormatError
from .samples import Sample, encode_number, first_rate

__all__ = ["TraceReader", "iter_trace", "read_trace", "encode_sample", "parse_record"]

_NONFINITE_IN = {"nan": math.nan, "inf": math.inf, "+inf": math.inf, "-inf": -math.inf,
                 "infinity": math.inf, "-infinity": -math.inf}
_RESERVED = ("step", "time", "lr", "events")
_RESERVED_SET = frozenset(_RESERVED)   # (a set: the test made for every key of every line)
# what a message echoes of a line, cut short: a 200,000-character value made a 200 kB message
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 80
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = 8
_SHORT.maxlevel = 2


def _short(value: Any) -> str:
    """``repr(value)`` cut to a readable length, for messages that echo a trace line.

    >>> len(_short("x" * 10_000)), _short([0] * 100)
    (80, '[0, 0, 0, 0, 0, 0, 0, 0, ...]')
    """
    return _SHORT.repr(value)


def encode_sample(sample: Sample) -> dict[str, Any]:
    """The JSON-ready trace record of ``sample`` (non-finite numbers as strings)."""
    rec: dict[str, Any] = {"step": int(sample.step)}
    if sample.time is not None:
        # unrounded: repr round-trips, so replay sees the times live judged on (rounded to
        # microseconds, a 'for: 1s' rule fired in replay on a gap live saw as 0.9999997 s)
        rec["time"] = float(sample.time)
    if sample.lr_groups is not None:
        lrs = [encode_number(float(x)) for x in sample.lr_groups]
        rec["lr"] = lrs[0] if len(lrs) == 1 else lrs
    elif "lr" in sample.values:
        rec["lr"] = encode_number(float(sample.values["lr"]))
    for k, v in sample.values.items():
        if k in _RESERVED:
            continue
        rec[k] = encode_number(float(v))
    if sample.events:
        rec["events"] = [dict(e) for e in sample.events]
    return rec


def _to_float(v: Any, key: str) -> float:
    if isinstance(v, bool):
        raise ValueError(f"key {_short(key)}: expected a number, got a boolean")
    if isinstance(v, (int, float)):
        try:
            return float(v)
        except OverflowError:
            raise ValueError(f"key {_short(key)}: an integer beyond the float range") from None
    if isinstance(v, str):
        f = _NONFINITE_IN.get(v.strip().lower())
        if f is not None:
            return f
        raise ValueError(f"key {_short(key)}: expected a number or \"nan\"/\"inf\"/\"-inf\", "
                         f"got {_short(v)}")
    raise ValueError(f"key {_short(key)}: expected a number, got {type(v).__name__}")


def parse_record(rec: Any) -> Sample:
    """Validate one decoded trace record and turn it into a :class:`Sample`.

    Raises ``ValueError`` with a message naming the offending key.
    """
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    step = rec.get("step")
    if step is None:
        raise ValueError("missing required key 'step'")
    if isinstance(step, bool) or not isinstance(step, int):
        if isinstance(step, float) and step.is_integer():
            step = int(step)
        else:
            raise ValueError(f"key 'step': expected an integer, got {_short(step)}")
    t = rec.get("time")
    # a float is taken as it is (what _to_float returns for one), without the call
    time_ = t if type(t) is float or t is None else _to_float(t, "time")
    values: dict[str, float] = {}
    lr_groups: tuple[float, ...] | None = None
    lr = rec.get("lr")
    if type(lr) is float:   # one group: first_rate((lr,)) is lr, NaN or not
        lr_groups = (lr,)
        values["lr"] = lr
    elif lr is not None:
        if isinstance(lr, list):
            if not lr:
                raise ValueError("key 'lr': empty list")
            lr_groups = tuple(_to_float(x, "lr") for x in lr)
        else:
            lr_groups = (_to_float(lr, "lr"),)
        values["lr"] = first_rate(lr_groups)
    reserved = _RESERVED_SET
    for k, v in rec.items():
        if type(v) is float:   # the common case, as _to_float takes it
            if k not in reserved:
                values[k] = v
        elif k not in reserved and v is not None:
            values[k] = _to_float(v, k)
    ev = rec.get("events")
    events: tuple[Mapping[str, Any], ...] = ()
    if ev is not None:
        if not isinstance(ev, list) or not all(isinstance(e, dict) for e in ev):
            raise ValueError("key 'events': expected a list of objects")
        events = tuple(ev)
    return _sample(step, time_, values, lr_groups, events)


_new = object.__new__


def _sample(step: int, time: float | None, values: dict[str, float],
            lr_groups: tuple[float, ...] | None, events: tuple[Mapping[str, Any], ...]) -> Sample:
    """``Sample(step=step, time=time, ...)`` of checked fields, built without the frozen
    dataclass's ``__init__`` (a field at a time through ``object.__setattr__``: 2% of
    a replay's time); equal to it in every field, in the same order.

    >>> _sample(3, None, {"loss": 1.0}, None, ()) == Sample(step=3, values={"loss": 1.0})
    True
    """
    s = _new(Sample)
    s.__dict__.update(step=step, time=time, values=values, lr_groups=lr_groups, events=events)
    return s


def _check_utf8(line: str) -> None:
    """Raise ``ValueError`` for a line read with ``surrogateescape`` that held bytes that are
    not UTF-8 (they come back as lone surrogates, which do not encode)."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid UTF-8") from None


@dataclass
class TraceReader:
    """Reads a trace, validating every line.

    With ``strict=True`` (the default) the first bad line raises :class:`TraceFormatError` naming
    file and line. With ``strict=False`` bad lines are skipped and counted in ``skipped``, with
    the messages in ``errors`` (the first 100), so one broken line never loses the rest.
    ``lineno`` is the line of the sample yielded last: a caller that finds that sample's content
    bad (replay: a corrupt ``engine_state`` in its events) reports it with :meth:`reject`, so
    it is named and counted like any malformed line.
    """

    source: str | os.PathLike[str] | IO[str]
    strict: bool = True
    lines: int = 0
    skipped: int = 0

    def __post_init__(self) -> None:
        self.errors: list[str] = []
        self.lineno = 0
        self._name = "<stream>"

    def __iter__(self) -> Iterator[Sample]:
        if isinstance(self.source, (str, os.PathLike)):
            name = str(self.source)
            with _open_text(self.source) as fh:
                yield from self._iter(fh, name)
        else:
            yield from self._iter(self.source, getattr(self.source, "name", "<stream>"))

    def reject(self, msg: str) -> None:
        """Count the line yielded last as malformed, for a reason only the caller could see.

        With ``strict`` this raises :class:`TraceFormatError` (file, line and ``msg``) as a bad
        line would; otherwise the line is counted in ``skipped`` and ``msg`` kept in ``errors``.
        """
        if self.strict:
            raise TraceFormatError(self._name, self.lineno, msg)
        self._skip(f"{self._name}:{self.lineno}: {msg}")

    def _skip(self, where_msg: str) -> None:
        self.skipped += 1
        if len(self.errors) < 100:
            self.errors.append(where_msg)

    def _numbered(self, fh: IO[str], name: str) -> Iterator[tuple[int, str]]:
        """The numbered lines of ``fh``. A compressed stream cut short or corrupt (a copy
        still being written) ends the trace after the whole lines before it: the line it
        broke in is bad (raised with ``strict``, else counted)."""
        lineno = 0
        try:
            for lineno, line in enumerate(fh, 1):
                yield lineno, line
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            msg = (f"the gzip-compressed trace is cut short or corrupt here ({exc}); the "
                   f"lines before it were read")
            if self.strict:
                raise TraceFormatError(name, lineno + 1, msg) from None
            self._skip(f"{name}:{lineno + 1}: {msg}")

    def _iter(self, fh: IO[str], name: str) -> Iterator[Sample]:
        self._name = name
        last_step: int | None = None
        for lineno, line in self._numbered(fh, name):
            if lineno == 1 and line.startswith(_BOM):   # (Notepad, PowerShell's Out-File)
                line = line[1:]
            if line[:1] != "{" and not line.strip():   # (a record's line: no copy made)
                continue
            self.lines += 1
            try:
                if not line.isascii():
                    _check_utf8(line)
                sample = parse_record(_decode(line))
                if last_step is not None and sample.step <= last_step:
                    raise ValueError(f"key 'step': {sample.step} does not increase "
                                     f"(previous {last_step})")
            except (ValueError, RecursionError) as exc:  # json.JSONDecodeError: a ValueError
                msg = _bad_line_message(exc)
                if isinstance(exc, json.JSONDecodeError) and not line.endswith("\n"):
                    msg = _CUT_SHORT + msg
                if self.strict:
                    raise TraceFormatError(name, lineno, msg) from None
                self._skip(f"{name}:{lineno}: {msg}")
                continue
            last_step = sample.step
            self.lineno = lineno
            yield sample


def _once_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are each given once (json keeps the last of a repeated key
    without a word: ``{"loss": 1.0, "loss": "nan"}`` was a finite loss to one reader and a NaN
    to another). Raises ``ValueError`` naming the first repeated key.

    >>> _once_each([("step", 1), ("loss", 1.0), ("loss", "nan")])
    Traceback (most recent call last):
    ...
    ValueError: key 'loss' is given twice on the line (a trace line holds each key once: which value is meant is not known)
    """
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"key {_short(key)} is given twice on the line (a trace line "
                                 f"holds each key once: which value is meant is not known)")
            seen.add(key)
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_once_each)


def _decode(line: str) -> Any:
    """``json.loads(line, object_pairs_hook=_once_each)``, without building a decoder per line
    (a tenth of a replay's time): the same values and the same errors.

    >>> _decode('{"step": 1}'), _decode(_BOM + '{"step": 1}')
    Traceback (most recent call last):
    ...
    json.decoder.JSONDecodeError: Unexpected UTF-8 BOM (decode using utf-8-sig): line 1 column 1 (char 0)
    """
    if line.startswith(_BOM):   # as json.loads (the first line's mark is dropped before)
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", line, 0)
    if line[:1] == "{":
        # the common line, an object from its first character to its newline: scanned as
        # JSONDecoder.decode scans it, without its two calls and two whitespace matches;
        # anything else (a value missing inside, text after the object) goes through decode,
        # which scans it again and gives json's own error
        try:
            obj, end = _SCAN(line, 0)
        except StopIteration:
            return _DECODER.decode(line)
        n = len(line)
        if end == n or (end == n - 1 and line[end] == "\n"):
            return obj
    return _DECODER.decode(line)


_SCAN = _DECODER.scan_once


def _bad_line_message(exc: Exception) -> str:
    """What is wrong with a line that did not parse, in the words of the trace format: json's
    own, except where they would mislead (a value nested past the parser's recursion limit
    raised out of the reader and ended the trace, ``--lenient`` or not; an integer of over
    4300 digits advised ``sys.set_int_max_str_digits()``).

    >>> _bad_line_message(RecursionError("maximum recursion depth exceeded"))
    'a value nested too deeply to read (a corrupt line)'
    """
    if isinstance(exc, RecursionError):
        return "a value nested too deeply to read (a corrupt line)"
    msg = str(exc).splitlines()[0]
    if "integer string conversion" in msg:
        return "an integer of more than 4300 digits (a corrupt line: trace values are " \
               "floats, steps integers)"
    return msg


#: what a last line without its newline that does not parse most likely is
_CUT_SHORT = ("the last line is cut short, without its newline (the run stopped while it "
              "wrote it, or is still writing it; --lenient skips it): ")
_BOM = "\ufeff"
_GZIP_MAGIC = b"\x1f\x8b"


@contextlib.contextmanager
def _open_text(path: str | os.PathLike[str]) -> Iterator[IO[str]]:
    """The trace at ``path`` opened for reading text; a gzip-compressed one (``gzip run.jsonl``)
    is decompressed as it is read.

    Opened once, its first bytes peeked: a pipe (``/dev/stdin``, ``<(zcat run.jsonl.gz)``)
    cannot be opened twice, and a probe that opened it first read its data away (the trace
    was "no samples")."""
    # surrogateescape, not "replace": a byte that is not UTF-8 must make its line bad, not
    # turn a key "loss" into another metric whose NaN nobody judges (_iter checks)
    with open(path, "rb") as raw:
        if raw.peek(2)[:2] == _GZIP_MAGIC:
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz, \
                    io.TextIOWrapper(gz, encoding="utf-8", errors="surrogateescape") as fh:
                yield fh
        else:
            with io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape") as fh:
                yield fh


def iter_trace(source: str | os.PathLike[str] | IO[str], *, strict: bool = True) -> Iterator[Sample]:
    """Iterate the samples of a trace (see :class:`TraceReader`)."""
    return iter(TraceReader(source, strict=strict))


def read_trace(source: str | os.PathLike[str] | IO[str], *, strict: bool = True) -> list[Sample]:
    """All samples of a trace as a list."""
    return list(iter_trace(source, strict=strict))
