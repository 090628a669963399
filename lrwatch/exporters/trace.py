"""Trace format v1: JSON Lines, one object per optimizer step (or serving window).

The format is a contract (see DESIGN.md)::

    {"step": 120, "time": 1764300000.5, "lr": 0.001, "loss": 2.31, "grad_norm": 1.2}

``step`` is required and strictly increasing; ``time`` is optional; ``lr`` is a number or a list
with one number per parameter group; every other key is a metric with a number. Non-finite numbers
are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"``; readers also accept bare
``NaN``/``Infinity``. A line may carry ``"events": [...]``.

Examples
--------
>>> import io
>>> from lrwatch.samples import Sample
>>> buf = io.StringIO()
>>> w = TraceWriter(buf)
>>> w.write(Sample(step=1, time=None, values={"lr": 0.1, "loss": float("nan")}, lr_groups=(0.1,)))
>>> buf.getvalue()
'{"step": 1, "lr": 0.1, "loss": "nan"}\\n'
>>> [s.values["loss"] for s in iter_trace(io.StringIO(buf.getvalue()))]
[nan]
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Mapping

from ..errors import TraceFormatError
from ..samples import Sample, encode_number

__all__ = ["TraceWriter", "TraceReader", "iter_trace", "read_trace", "encode_sample"]

_log = logging.getLogger("lrwatch")

_NONFINITE_IN = {"nan": math.nan, "inf": math.inf, "+inf": math.inf, "-inf": -math.inf,
                 "infinity": math.inf, "-infinity": -math.inf}
_RESERVED = ("step", "time", "lr", "events")


def encode_sample(sample: Sample) -> dict[str, Any]:
    """The JSON-ready trace record of ``sample`` (non-finite numbers as strings)."""
    rec: dict[str, Any] = {"step": int(sample.step)}
    if sample.time is not None:
        rec["time"] = round(float(sample.time), 6)
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


class TraceWriter:
    """Writes samples as trace v1 lines to a path or an open text stream.

    Lines are kept in memory and pushed to the OS by :meth:`flush` (the Watcher calls it once
    per flush, at most once a second), whole lines only. A path is opened for appending with
    ``append=True`` so that a resumed run continues its trace.

    **Fail open** (for a path): a trace that cannot be opened or written (a read-only
    directory, a full disk) never stops training. A failed write is cut back to the last whole
    line (``ftruncate``), its lines are dropped and counted in :attr:`failures`, and the next
    flush tries again, so the trace has a gap but no broken line. Only the first failure is
    logged, as one line; with ``on_error`` every failure is also reported to it (the Watcher
    counts them in ``lrwatch_internal_errors_total``). Without ``on_error`` the first failure
    is raised once, from the first call after it, so that the caller's own error handling
    sees it; later ones are only counted. A stream target (an open text file you own) is
    written directly and its errors are yours.
    """

    #: Pending bytes above which a flush happens whatever ``min_interval`` says.
    MAX_PENDING = 1 << 20

    def __init__(self, target: str | os.PathLike[str] | IO[str], *, append: bool = False,
                 on_error: Callable[[], object] | None = None) -> None:
        self.lines_written = 0
        #: I/O failures absorbed (a failed open counts once, then once per dropped flush).
        self.failures = 0
        self.on_error = on_error
        self._last_flush = 0.0
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._pending_lines = 0
        self._fd: int | None = None
        self._stream: IO[str] | None = None
        self._raise: OSError | None = None
        self._logged = False
        if isinstance(target, (str, os.PathLike)):
            self.path: str | None = str(target)
            try:
                path = Path(target)
                if path.parent and not path.parent.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
                self._fd = os.open(path, flags, 0o644)
                self._good = os.lseek(self._fd, 0, os.SEEK_END)  # the end of the last whole line
            except OSError as exc:
                self._failed(exc, "open")
        else:
            self._stream = target
            self.path = getattr(target, "name", None)

    @property
    def ok(self) -> bool:
        """Whether every write so far reached the OS."""
        return self.failures == 0

    def write(self, sample: Sample) -> None:
        self.write_many((sample,))

    def write_many(self, samples: Iterable[Sample]) -> None:
        lines = [json.dumps(encode_sample(s), allow_nan=False) + "\n" for s in samples]
        if self._stream is not None:
            self._stream.write("".join(lines))
            self.lines_written += len(lines)
            return
        self._raise_pending()
        if self._fd is None:
            return  # could not open: counted at open
        data = "".join(lines).encode("utf-8")
        self._pending.append(data)
        self._pending_bytes += len(data)
        self._pending_lines += len(lines)
        if self._pending_bytes >= self.MAX_PENDING:
            self.flush()

    def flush(self, *, min_interval: float = 0.0) -> None:
        """Push pending lines to the OS; with ``min_interval``, at most that often (seconds)."""
        now = time.monotonic()
        if min_interval and now - self._last_flush < min_interval \
                and self._pending_bytes < self.MAX_PENDING:
            return
        self._last_flush = now
        if self._stream is not None:
            self._stream.flush()
            return
        self._raise_pending()
        if self._fd is None or not self._pending:
            return
        data = b"".join(self._pending)
        lines = self._pending_lines
        self._pending.clear()
        self._pending_bytes = self._pending_lines = 0
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as exc:
            # Cut back to the last whole line: a reader must never meet half a record.
            try:
                os.ftruncate(self._fd, self._good)
                os.lseek(self._fd, self._good, os.SEEK_SET)  # or the next write leaves a hole
            except OSError:
                pass
            self._failed(exc, f"write {lines} line(s) to")
            self._raise_pending()
            return
        self._good += len(data)
        self.lines_written += lines

    def _failed(self, exc: OSError, what: str) -> None:
        self.failures += 1
        if self.on_error is not None:
            try:
                self.on_error()
            except Exception:
                _log.exception("lrwatch: trace on_error callback failed")
        elif self._raise is None and self.failures == 1:
            self._raise = exc  # the caller hears of the first failure once, and logs it
            return
        if not self._logged:
            self._logged = True
            _log.warning("lrwatch: could not %s the trace %s: %s; training goes on, and further "
                         "trace failures are only counted", what, self.path, exc)

    def _raise_pending(self) -> None:
        exc, self._raise = self._raise, None
        if exc is not None:
            self._logged = True  # the caller logs this one
            raise exc

    def close(self) -> None:
        if self._stream is not None:
            try:
                self._stream.flush()
            finally:
                self._stream = None
            return
        try:
            self.flush()
        finally:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                try:
                    os.close(fd)
                except OSError:
                    pass

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _to_float(v: Any, key: str) -> float:
    if isinstance(v, bool):
        raise ValueError(f"key {key!r}: expected a number, got a boolean")
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        f = _NONFINITE_IN.get(v.strip().lower())
        if f is not None:
            return f
        raise ValueError(f"key {key!r}: expected a number or \"nan\"/\"inf\"/\"-inf\", got {v!r}")
    raise ValueError(f"key {key!r}: expected a number, got {type(v).__name__}")


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
            raise ValueError(f"key 'step': expected an integer, got {step!r}")
    t = rec.get("time")
    time_ = None if t is None else _to_float(t, "time")
    values: dict[str, float] = {}
    lr_groups: tuple[float, ...] | None = None
    lr = rec.get("lr")
    if lr is not None:
        if isinstance(lr, list):
            if not lr:
                raise ValueError("key 'lr': empty list")
            lr_groups = tuple(_to_float(x, "lr") for x in lr)
        else:
            lr_groups = (_to_float(lr, "lr"),)
        values["lr"] = lr_groups[0]
    for k, v in rec.items():
        if k in _RESERVED or v is None:
            continue
        values[k] = _to_float(v, k)
    ev = rec.get("events")
    events: tuple[Mapping[str, Any], ...] = ()
    if ev is not None:
        if not isinstance(ev, list) or not all(isinstance(e, dict) for e in ev):
            raise ValueError("key 'events': expected a list of objects")
        events = tuple(ev)
    return Sample(step=step, time=time_, values=values, lr_groups=lr_groups, events=events)


@dataclass
class TraceReader:
    """Reads a trace, validating every line.

    With ``strict=True`` (the default) the first bad line raises :class:`TraceFormatError` naming
    file and line. With ``strict=False`` bad lines are skipped and counted in ``skipped``, with
    the messages in ``errors`` (the first 100), so one broken line never loses the rest.
    """

    source: str | os.PathLike[str] | IO[str]
    strict: bool = True
    lines: int = 0
    skipped: int = 0

    def __post_init__(self) -> None:
        self.errors: list[str] = []

    def __iter__(self) -> Iterator[Sample]:
        if isinstance(self.source, (str, os.PathLike)):
            name = str(self.source)
            with open(self.source, "r", encoding="utf-8", errors="replace") as fh:
                yield from self._iter(fh, name)
        else:
            yield from self._iter(self.source, getattr(self.source, "name", "<stream>"))

    def _iter(self, fh: IO[str], name: str) -> Iterator[Sample]:
        last_step: int | None = None
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            self.lines += 1
            try:
                sample = parse_record(json.loads(line))
                if last_step is not None and sample.step <= last_step:
                    raise ValueError(f"key 'step': {sample.step} does not increase "
                                     f"(previous {last_step})")
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                msg = str(exc).splitlines()[0]
                if self.strict:
                    raise TraceFormatError(name, lineno, msg) from None
                self.skipped += 1
                if len(self.errors) < 100:
                    self.errors.append(f"{name}:{lineno}: {msg}")
                continue
            last_step = sample.step
            yield sample


def iter_trace(source: str | os.PathLike[str] | IO[str], *, strict: bool = True) -> Iterator[Sample]:
    """Iterate the samples of a trace (see :class:`TraceReader`)."""
    return iter(TraceReader(source, strict=strict))


def read_trace(source: str | os.PathLike[str] | IO[str], *, strict: bool = True) -> list[Sample]:
    """All samples of a trace as a list."""
    return list(iter_trace(source, strict=strict))
