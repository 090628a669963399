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
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping

from ..errors import TraceFormatError
from ..samples import Sample

__all__ = ["TraceWriter", "TraceReader", "iter_trace", "read_trace", "encode_sample"]

_NONFINITE_OUT = {math.inf: "inf", -math.inf: "-inf"}
_NONFINITE_IN = {"nan": math.nan, "inf": math.inf, "+inf": math.inf, "-inf": -math.inf,
                 "infinity": math.inf, "-infinity": -math.inf}
_RESERVED = ("step", "time", "lr", "events")


def _num_out(v: float) -> float | str:
    if math.isfinite(v):
        return v
    if v != v:
        return "nan"
    return _NONFINITE_OUT[v]


def encode_sample(sample: Sample) -> dict[str, Any]:
    """The JSON-ready trace record of ``sample`` (non-finite numbers as strings)."""
    rec: dict[str, Any] = {"step": int(sample.step)}
    if sample.time is not None:
        rec["time"] = round(float(sample.time), 6)
    if sample.lr_groups is not None:
        lrs = [_num_out(float(x)) for x in sample.lr_groups]
        rec["lr"] = lrs[0] if len(lrs) == 1 else lrs
    elif "lr" in sample.values:
        rec["lr"] = _num_out(float(sample.values["lr"]))
    for k, v in sample.values.items():
        if k in _RESERVED:
            continue
        rec[k] = _num_out(float(v))
    if sample.events:
        rec["events"] = [dict(e) for e in sample.events]
    return rec


class TraceWriter:
    """Writes samples as trace v1 lines to a path or an open text stream.

    Writes are buffered and pushed to the OS by :meth:`flush` (the Watcher calls it once per
    flush, not per step). A path is opened for appending so that a resumed run continues its trace.
    """

    def __init__(self, target: str | os.PathLike[str] | IO[str], *, append: bool = False) -> None:
        if isinstance(target, (str, os.PathLike)):
            path = Path(target)
            if path.parent and not path.parent.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
            self._fh: IO[str] = open(path, "a" if append else "w", encoding="utf-8")
            self._owned = True
            self.path: str | None = str(path)
        else:
            self._fh = target
            self._owned = False
            self.path = getattr(target, "name", None)
        self.lines_written = 0
        self._last_flush = 0.0

    def write(self, sample: Sample) -> None:
        self._fh.write(json.dumps(encode_sample(sample), allow_nan=False) + "\n")
        self.lines_written += 1

    def write_many(self, samples: Iterable[Sample]) -> None:
        lines = [json.dumps(encode_sample(s), allow_nan=False) + "\n" for s in samples]
        self._fh.write("".join(lines))
        self.lines_written += len(lines)

    def flush(self, *, min_interval: float = 0.0) -> None:
        """Push buffered lines to the OS; with ``min_interval``, at most that often (seconds)."""
        now = time.monotonic()
        if min_interval and now - self._last_flush < min_interval:
            return
        self._last_flush = now
        self._fh.flush()

    def close(self) -> None:
        try:
            self._fh.flush()
        finally:
            if self._owned:
                self._fh.close()

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
