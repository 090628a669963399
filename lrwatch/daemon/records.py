"""Parsing and validating ingested records: predictions and delayed labels.

A payload is a JSON object, a JSON array, or NDJSON (one object per line). Every record is
either accepted or rejected with exactly one *reason*, so that accepted + rejected always equals
received; :data:`REASONS` lists the reasons (they label ``lrwatch_ingest_errors_total``).

The per-record path is deliberately lean. Parsing uses ``orjson`` when it is importable (the
``fast`` extra; about 4x faster than the standard library) and falls back to :mod:`json`; a
payload ``orjson`` refuses (``NaN``/``Infinity`` literals) is re-parsed by :mod:`json`, so both
back ends accept the same payloads and give the same records. One difference remains: orjson
reads an integer beyond 64 bits as a float, the standard library keeps it exact (as a feature
value it is the same number; as an ``id`` orjson's float is rejected).

Validation is batch-oriented: a few C-level ``map``/``set`` passes check the types of every
value of a whole payload at once, and accepted predictions come out *columnar* (:class:`Batch`:
feature dicts, predictions, ids, times, labels) instead of one dict per record. Only a payload
that fails the batch check is validated record by record, which finds each bad record's reason.

Examples
--------
>>> ok, rejected, errors = validate_predictions(parse_payload(
...     b'{"id": "a", "features": {"x": 1.5, "c": "DE"}, "prediction": 0.8}\\n'
...     b'{"features": {"x": [1]}, "prediction": 1}\\n'
...     b'not json'))
>>> len(ok), dict(rejected)
(1, {'invalid_feature': 1, 'invalid_json': 1})
>>> errors[0]
'record 2: feature values must be numbers, strings, booleans or null'
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from itertools import chain, repeat
from operator import itemgetter
from typing import Any, Callable, Iterable, Sequence

from ..errors import LrwatchError
from ..samples import encode_number
from .estimation import PROBA_SUM_TOLERANCE

try:  # the optional ``fast`` extra
    import orjson as _orjson
except ImportError:  # pragma: no cover - exercised when orjson is not installed
    _orjson = None

__all__ = ["REASONS", "DATA_REASONS", "RecordError", "Invalid", "TooManyRecords", "Limits",
           "Batch",
           "parse_payload", "parse_lines", "validate_predictions", "validate_labels",
           "validate_prediction", "MAX_ERRORS", "JSON_BACKEND", "dumps_bytes", "loads",
           "loads_record",
           "strict_json", "longest_line", "lines_within", "fits_reference_kind",
           "TIME_FUTURE_SLACK", "times_plausible", "labels_are_classes"]

#: Every rejection reason (``lrwatch_ingest_errors_total{reason}``).
REASONS = (
    "unauthorized",        # missing or wrong bearer token (whole request)
    "too_large",           # body over the size limit (whole request)
    "queue_full",          # the bounded queue is full: HTTP 429 (whole request)
    "invalid_json",        # a payload or NDJSON line that is not JSON
    "not_an_object",       # a JSON value that is not an object
    "missing_features",    # a prediction without a "features" object
    "invalid_feature",     # a feature value that is not a number, string, boolean or null
    "invalid_prediction",  # missing, or not a number, class name or class probabilities
    "invalid_label",       # missing (on /v1/labels) or not a number, string or boolean
    "invalid_id",          # an id that is not a non-empty string (<= 256 chars) or a 64-bit
                           # integer
    "invalid_time",        # not a number of unix seconds in [0, now + TIME_FUTURE_SLACK]
    "line_too_long",       # an NDJSON line (HTTP or tailed file) over ``max_line_bytes``
    "string_too_long",     # a string value (feature, prediction, label) over ``max_string_chars``
    "too_many_features",   # a record with more than ``max_features`` features
    "storage",             # the journal could not be written (full or failing disk): HTTP 503
)
#: Reasons that say something about the data clients send (what ``ingest_error_ratio`` and
#: ``LrwatchIngestErrorsHigh`` watch). The others (an unauthenticated client, back-pressure,
#: the daemon's own disk) have their own series and alerts.
DATA_REASONS = frozenset(REASONS) - {"unauthorized", "queue_full", "storage"}
#: Error messages returned per response (the counters count them all).
MAX_ERRORS = 20
_VALUE_TYPES = frozenset({int, float, str, bool, type(None)})
_LABEL_TYPES = (int, float, str, bool)
_NONE = type(None)
_PRED_TYPES = frozenset({int, float, str, bool})
_PRED_OR_PROBA = _PRED_TYPES | {list, dict}
_PROBA_TYPES = frozenset({int, float})
_LABEL_OR_NONE = frozenset({int, float, str, bool, _NONE})
_TIME_TYPES = frozenset({int, float, _NONE})
#: How far past this host's clock a record's ``time`` may be (seconds): more is a wrong
#: clock or a wrong unit (milliseconds), and it would carry a time window, or the label
#: coverage's clock, that far ahead. Before 1970 (a negative time) is refused too.
TIME_FUTURE_SLACK = 86400.0
_get_features = itemgetter("features")
_get_prediction = itemgetter("prediction")


@dataclass(frozen=True)
class Limits:
    """Bounds on what one record may hold (each breach is a counted reason)."""

    #: an NDJSON line, over HTTP or in a tailed file (``line_too_long``)
    max_line_bytes: int = 1 << 20
    #: a string feature value, class-name prediction or label (``string_too_long``)
    max_string_chars: int = 4096
    #: features of one record (``too_many_features``)
    max_features: int = 2048
    #: class probabilities a list prediction must hold (the reference's classes), once a
    #: reference of probability lists is known; ``None``: any width up to MAX_CLASS_PROBABILITIES
    proba_width: int | None = None
    #: the reference's predictions are class-1 probabilities (a binary model): a live
    #: prediction must be a number, or ``[p0, p1]`` (kept as ``p1``); not a class name
    binary_probability: bool = False
    #: the reference's own labels were 0/1 (see ``Reference.prediction_basis``): its model is
    #: a classifier for sure. Without them it may be a regression with outputs in [0, 1], and
    #: a fractional label's message says how to have it read as one
    binary_from_labels: bool = False
    #: the daemon estimates performance, and its estimator reads lists as class
    #: probabilities: a list of two or more must sum to 1 (``estimation.PROBA_SUM_TOLERANCE``)
    proba_sum: bool = False


DEFAULT_LIMITS = Limits()
#: The longest list of class probabilities a prediction may hold.
MAX_CLASS_PROBABILITIES = 10_000


class NonFinite:
    """``NaN``, ``Infinity`` or a number beyond the float range (``1e400``, ``10**400`` written
    out), as the standard library's parser found it. orjson and both chunk decoders refuse these; the standard
    library would make them floats, which must never reach the statistics. As a feature value,
    ``NaN`` is a missing value (how pandas writes one) and the others are ``invalid_feature``;
    anywhere else the record is rejected (its type is not one the checks accept)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _parse_float(text: str) -> Any:
    v = float(text)
    return v if v - v == 0.0 else NonFinite(text)  # inf - inf is nan


def _parse_int(text: str) -> Any:
    """An integer, unless no float can hold it (``10**400``: it would overflow wherever the
    statistics read it as a number) or it has more digits than the interpreter converts: then
    a :class:`NonFinite`, refused as ``1e400`` is."""
    try:
        v = int(text)
        float(v)
    except (OverflowError, ValueError):
        return NonFinite(text if len(text) <= 24 else f"{text[:12]}...({len(text)} digits)")
    return v


def _choose_backend() -> str:
    # LRWATCH_JSON=stdlib forces the fallback (benchmarks measure both back ends)
    want = os.environ.get("LRWATCH_JSON", "").strip().lower()
    if want in ("json", "stdlib"):
        return "stdlib"
    return "orjson" if _orjson is not None else "stdlib"


#: ``"orjson"`` or ``"stdlib"``: the parser :func:`parse_payload` uses by default.
JSON_BACKEND = _choose_backend()


def _stdlib_loads(data: bytes | str) -> Any:
    """:func:`json.loads` that never lets a non-finite number through as a float (see
    :class:`NonFinite`) and turns a nesting deeper than the interpreter's recursion limit
    (``RecursionError``, not a ``ValueError``) into a ``ValueError``."""
    try:
        return json.loads(data, parse_float=_parse_float, parse_int=_parse_int,
                          parse_constant=NonFinite)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def loads(data: bytes | str) -> Any:
    """Parse JSON with the fastest back end that accepts it (orjson, then :mod:`json`).

    Non-finite numbers come back as :class:`NonFinite` (never as floats); a nesting too deep
    for either parser is a ``ValueError``."""
    if JSON_BACKEND == "orjson":
        try:
            return _orjson.loads(data)  # type: ignore[union-attr]
        except ValueError:
            pass
    return _stdlib_loads(data)


def dumps_bytes(obj: Any) -> bytes:
    """Compact JSON bytes (orjson when available; NaN becomes ``null`` there, ``NaN`` in the
    standard library: every reader of these files treats both as missing)."""
    if JSON_BACKEND == "orjson":
        try:
            return _orjson.dumps(obj)  # type: ignore[union-attr]
        except TypeError:  # non-str keys, huge ints: let the standard library decide
            pass
    return json.dumps(obj, separators=(",", ":"), allow_nan=True).encode()


class RecordError(LrwatchError):
    """A record was rejected: ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Invalid:
    """Marks an NDJSON line (or a whole payload) that did not parse, and why (``reason``)."""

    __slots__ = ("message", "reason")

    def __init__(self, message: str, reason: str = "invalid_json") -> None:
        self.message = message
        self.reason = reason


class TooManyRecords(ValueError):
    """A payload holds more records (NDJSON lines, array elements) than ``max_items``: the
    caller refuses it whole before checking any (``count`` of them), since it could never be
    queued; parsing and validating them first cost up to 60 µs a record on the HTTP loop."""

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} records")
        self.count = count


def _loader(backend: str | None) -> Callable[[Any], Any]:
    b = backend or JSON_BACKEND
    if b not in ("orjson", "stdlib"):
        raise ValueError(f"backend must be 'orjson' or 'stdlib', got {backend!r}")
    if b == "orjson" and _orjson is not None:
        return _orjson_then_stdlib
    return _stdlib_record


def _orjson_then_stdlib(data: bytes | str) -> Any:
    try:
        return _orjson.loads(data)  # type: ignore[union-attr]
    except ValueError:
        return _stdlib_record(data)


def loads_record(data: bytes | str) -> Any:
    """:func:`loads` for records (bodies, tailed lines, reference data): a string with a lone
    UTF-16 surrogate is a ``ValueError`` too (see :func:`_stdlib_record`)."""
    return _loader(None)(data)


#: A ``\uD800``-``\uDFFF`` escape: only where one is can a parsed string hold a surrogate
#: (raw UTF-8 cannot encode one; such bytes are not UTF-8).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def _stdlib_record(data: bytes | str) -> Any:
    """:func:`_stdlib_loads`, refusing what orjson and msgspec refuse: a string holding a lone
    surrogate (``"\\ud800"`` without its pair) is valid JSON text but no Unicode character,
    and cannot be written as UTF-8; as a feature name it became a metric label that made
    every scrape of /metrics fail."""
    doc = _stdlib_loads(data)
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(doc):
        raise ValueError("a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff "
                         "without its pair), which is no Unicode character")
    return doc


def _has_lone_surrogate(doc: Any) -> bool:
    stack = [doc]
    while stack:
        v = stack.pop()
        t = type(v)
        if t is str:
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    return True
        elif t is dict:
            stack.extend(v)
            stack.extend(v.values())
        elif t is list:
            stack.extend(v)
    return False


def longest_line(body: bytes) -> int:
    """Bytes in the longest line of ``body`` (one C split; ~30 µs for 1000 records). No string
    in a line can be longer than the line, so a body whose lines are all short needs no
    per-string length check."""
    if len(body) <= 4096 or b"\n" not in body:
        return len(body)
    return max(map(len, body.split(b"\n")))


def lines_within(body: bytes, limit: int) -> bool:
    """Whether no line of ``body`` is longer than ``limit`` bytes, usually without splitting
    it: when every full block of ``limit // 2`` bytes holds a newline, no line can reach
    ``limit`` (one ``find`` per block, stopping at the first newline: ~10 µs for 128 KiB
    against ~65 µs for a split). Otherwise a split decides."""
    n = len(body)
    if n <= limit:
        return True
    block = limit // 2
    if block >= 64:
        find = body.find
        for start in range(0, n - block + 1, block):
            if find(b"\n", start, start + block) < 0:
                break
        else:
            return True
    return max(map(len, body.split(b"\n"))) <= limit


def parse_payload(body: bytes | str, *, backend: str | None = None,
                  limits: Limits = DEFAULT_LIMITS, max_items: int | None = None) -> list[Any]:
    """The items of a payload: a JSON array's elements, one object, or NDJSON lines.

    A line that is not JSON (not UTF-8, nested too deeply, over ``limits.max_line_bytes``)
    becomes an :class:`Invalid` item, so the other lines still count. A body that is one JSON
    document is bounded by the body size limit, not the line limit. ``backend`` (``"orjson"``
    or ``"stdlib"``) overrides :data:`JSON_BACKEND`; both give the same items for every
    payload. More than ``max_items`` items (array elements, non-blank lines) raise
    :class:`TooManyRecords` before any line is parsed alone.
    """
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")
    ld = _loader(backend)
    utf8 = True
    if not body.isascii():
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            utf8 = False  # some line is bad: find it line by line, the others still count
    if utf8:
        try:
            doc = ld(body)
        except ValueError:
            pass
        else:
            if isinstance(doc, list) and max_items is not None and len(doc) > max_items:
                raise TooManyRecords(len(doc))
            return doc if isinstance(doc, list) else [doc]
    return parse_lines(body.split(b"\n"), backend=backend, limits=limits, max_items=max_items)


def parse_lines(lines: Sequence[bytes], *, backend: str | None = None,
                limits: Limits = DEFAULT_LIMITS, max_items: int | None = None) -> list[Any]:
    """The items of NDJSON lines (blank lines are not records); one parser call for the batch
    (several times faster than one per line), line by line only when some line is bad. More
    than ``max_items`` lines raise :class:`TooManyRecords` before any is parsed."""
    ld = _loader(backend)
    lines = [ln for ln in map(bytes.strip, lines) if ln]
    if not lines:
        return [Invalid("empty payload")]
    if max_items is not None and len(lines) > max_items:
        raise TooManyRecords(len(lines))
    too_long = limits.max_line_bytes
    if max(map(len, lines)) <= too_long:
        try:
            out = ld(b"[" + b",".join(lines) + b"]")
            # a line holding "1,2" parses as two items: then go line by line
            if len(out) == len(lines) and set(map(type, out)) == {dict}:
                return out
        except ValueError:
            pass
    out = []
    for i, ln in enumerate(lines, 1):
        if len(ln) > too_long:  # not even parsed: its cost is the attacker's, not ours
            out.append(Invalid(f"line {i} has {len(ln)} bytes, over the limit of {too_long}",
                               "line_too_long"))
            continue
        try:
            out.append(ld(ln))
        except ValueError as exc:  # the standard library's message: both loaders end in it
            if not ln.isascii():
                try:
                    ln.decode("utf-8")
                except UnicodeDecodeError:
                    out.append(Invalid(f"line {i} is not UTF-8"))
                    continue
            n = _glued_count(ln, exc)
            out.append(Invalid(f"line {i} is not JSON: {exc}{_glued_hint(n)}"))
            out.extend(Invalid(f"line {i}: record {k} of the {n} glued together on it "
                               f"(one record per line)") for k in range(2, n + 1))
    return out


_JSON_SPACE = re.compile(r"[ \t\r]*")


def _glued_count(line: bytes, exc: ValueError) -> int:
    """How many records a line that is not JSON holds: more than one when they were glued
    together (``{...}{...}``: ``curl -d @file`` drops the file's newlines), each refused and
    counted (it was one rejection for all of them); a value that does not parse ends the
    count (it and whatever follows are one more). 1 for any other line."""
    pos = getattr(exc, "pos", None)
    if getattr(exc, "msg", "") != "Extra data" or pos is None:
        return 1
    text = line.decode("utf-8", "replace")
    if text[pos:pos + 1] not in ("{", "["):   # pos: characters
        return 1
    decode, n, end = json.JSONDecoder().raw_decode, 1, len(text)
    while pos < end:
        try:
            pos = decode(text, pos)[1]
        except (ValueError, RecursionError):
            return n + 1
        n += 1
        pos = _JSON_SPACE.match(text, pos).end()
    return n


def _glued_hint(n: int) -> str:
    """What to do about ``n`` records glued together on one line (the whole body was one
    record rejected with only "Extra data" to say why)."""
    if n < 2:
        return ""
    return (f" ({n} records glued together on one line: NDJSON needs one record per line; "
            "curl -d drops newlines, send the file with --data-binary)")


def validate_prediction(p: Any, limits: Limits = DEFAULT_LIMITS) -> Any:
    """The prediction as the daemon keeps it (``{"proba": [...]}`` becomes its list), or raise
    :class:`RecordError` unless ``p`` is a number, a class name, or class probabilities: a
    list, or an object ``{"proba": [...]}``, of finite numbers in [0, 1] (at most
    :data:`MAX_CLASS_PROBABILITIES`; exactly ``limits.proba_width`` when set)."""
    if limits.binary_probability or limits.proba_width is not None:
        return _as_reference_kind(p, limits)
    return _any_prediction(p, limits)


def _as_reference_kind(p: Any, limits: Limits) -> Any:
    """A prediction checked against the reference's kind of probabilities (the estimator and
    the prediction's drift read it so): a binary model's class-1 probability, or a list of
    the reference's width."""
    p = _any_prediction(p, limits)
    t = type(p)
    if limits.proba_width is not None:
        if t is not list:
            raise RecordError("invalid_prediction", f"the reference's predictions are lists "
                              f"of {limits.proba_width} class probabilities; got {p!r:.40}")
        return p
    if t is list:  # [p0, p1], or [p]: a sigmoid output (Keras' predict(x)[i].tolist())
        if len(p) not in (1, 2):
            raise RecordError("invalid_prediction", f"the reference's predictions are a "
                              f"binary model's class-1 probabilities; got {len(p)} class "
                              f"probabilities")
        return p[-1]
    if t in (int, float):   # a number outside [0, 1] is kept: a regression whose reference
        if limits.binary_from_labels and not 0 <= p <= 1:   # values all fell in [0, 1] reads
            raise RecordError("invalid_prediction", _not_a_probability(p))  # as probabilities
        return p            # too, unless the reference's 0/1 labels made it a classifier
    raise RecordError("invalid_prediction", f"the reference's predictions are numbers (a "
                      f"binary model's class-1 probabilities, or [p0, p1]); got {p!r:.40}")


def _not_a_probability(p: Any) -> str:
    return (f"prediction {p!r:.40} is outside [0, 1]: the reference's labels (0/1) make the "
            f"model a binary classifier, whose prediction is its class-1 probability")


def _any_prediction(p: Any, limits: Limits) -> Any:
    t = type(p)
    if t is float:
        if not math.isfinite(p):
            raise RecordError("invalid_prediction", "prediction must be finite")
        return p
    if t is str:
        if len(p) > limits.max_string_chars:
            raise RecordError("string_too_long", f"prediction is a string of {len(p)} "
                              f"characters, over the limit of {limits.max_string_chars}")
        return p
    if t is int or t is bool:
        return p
    if t is NonFinite:
        raise RecordError("invalid_prediction", f"prediction must be finite, got {p}")
    if t is dict:
        if set(p) != {"proba"}:
            raise RecordError("invalid_prediction", "a prediction object must be "
                              "{\"proba\": [class probabilities]} and nothing else, got keys "
                              f"{sorted(map(str, p))[:5]}")
        p = p["proba"]
        if type(p) is not list:
            raise RecordError("invalid_prediction", "'proba' must be a list of class "
                              "probabilities")
    if type(p) is list:
        _check_probabilities(p, limits)
        return p
    raise RecordError("invalid_prediction", "prediction must be a number, a class name, a "
                      "list of class probabilities or {\"proba\": [...]}")


def _check_probabilities(p: list[Any], limits: Limits) -> None:
    n = len(p)
    if not n or n > MAX_CLASS_PROBABILITIES:
        raise RecordError("invalid_prediction", f"class probabilities must be a non-empty list "
                          f"of at most {MAX_CLASS_PROBABILITIES}, got {n}")
    if not all(type(v) in (int, float) and math.isfinite(v) and 0 <= v <= 1 for v in p):
        raise RecordError("invalid_prediction", "class probabilities must be finite numbers "
                          "in [0, 1]")
    width = limits.proba_width
    if width is not None and n != width:
        raise RecordError("invalid_prediction", f"the prediction has {n} class probabilities; "
                          f"the reference's model has {width} classes")
    if limits.proba_sum and n > 1 and abs(sum(p) - 1.0) > PROBA_SUM_TOLERANCE:
        raise RecordError("invalid_prediction", f"class probabilities must sum to 1 (within "
                          f"{PROBA_SUM_TOLERANCE}), these sum to {sum(p):.4g}: send the "
                          f"model's probabilities (a softmax), not per-class scores")


#: The integers every JSON back end reads as integers (orjson: int64 and uint64). Beyond
#: them orjson reads a float, so an id like Python's ``uuid.int`` was refused as "no
#: integer" with the ``fast`` extra and accepted without it.
_ID_INTS = (-2 ** 63, 2 ** 64)


def _check_id(r: dict[str, Any]) -> None:
    i = r.get("id")
    if i is None:
        return
    t = type(i)
    if t is int and _ID_INTS[0] <= i < _ID_INTS[1]:
        r["id"] = str(i)
    elif t is int or t is float and i.is_integer() and not -2 ** 63 < i < 2 ** 63:
        raise RecordError("invalid_id", "an integer id beyond 64 bits (uuid.int, say) is not "
                          "kept exactly by JSON parsers: send it as a string")
    elif t is not str or not i or len(i) > 256:
        raise RecordError("invalid_id", "id must be a non-empty string (at most 256 "
                          "characters) or an integer of at most 64 bits")


def _check_time(r: dict[str, Any]) -> None:
    t = r.get("time")
    if t is None:
        return
    if type(t) not in (int, float) or not math.isfinite(t):
        raise RecordError("invalid_time", "time must be a finite number (unix seconds)")
    if t < 0:
        raise RecordError("invalid_time", f"time {t!r} is before 1970: send unix seconds")
    now = time.time()
    if t > now + TIME_FUTURE_SLACK:
        raise RecordError("invalid_time", f"time {t!r} is more than a day after this host's "
                          f"clock ({now:.0f}): send unix seconds (not milliseconds), and check "
                          f"the sender's clock")


def times_plausible(times: Sequence[Any]) -> bool:
    """Whether every time present (``None`` is none) is in the range :func:`_check_time`
    accepts: the batch checks use this, so that they accept exactly what it accepts (the
    caller has checked the types and finiteness)."""
    present = [t for t in times if t is not None]
    return not present or (min(present) >= 0
                           and max(present) <= time.time() + TIME_FUTURE_SLACK)


def _check_label(v: Any, limits: Limits) -> None:
    if not isinstance(v, _LABEL_TYPES) or (type(v) is float and not math.isfinite(v)):
        raise RecordError("invalid_label", "label must be a finite number, a string or a "
                          "boolean")
    if type(v) is str and len(v) > limits.max_string_chars:
        raise RecordError("string_too_long", f"label is a string of {len(v)} characters, "
                          f"over the limit of {limits.max_string_chars}")
    if (limits.binary_probability or limits.proba_width is not None) \
            and not labels_are_classes([v], limits):
        raise RecordError("invalid_label", _not_a_class(v, limits))


def _not_a_class(v: Any, limits: Limits) -> str:
    """Why label ``v`` is refused, and what to send. A fractional number against class-1
    probabilities that no reference label vouched for is most likely a regression's label
    (outputs in [0, 1] read as probabilities): the way out is a reference with its labels,
    from which :mod:`.reference` reads a regression."""
    want = ("0 or 1 (true/false)" if limits.binary_probability else
            f"a class index 0..{limits.proba_width - 1}")  # type: ignore[operator]
    msg = f"label {v!r:.40} is not a class of the model whose probabilities the reference " \
          f"holds: send {want}"
    if limits.binary_probability and not limits.binary_from_labels \
            and type(v) is float and not v.is_integer():
        msg += ("; if the model is a regression with outputs in [0, 1], build the reference "
                "from data with its labels (`lrwatch baseline build`, or inline labels in "
                "the live reference's records) so that lrwatch reads it as one")
    return msg


def _class_key(v: Any) -> str:
    # as reference.cat_key (which sits above this module): True, 1, 1.0 and "1" are class 1
    if v is True or v is False:
        return "1" if v else "0"
    if type(v) is float and v.is_integer():
        return str(int(v))
    return str(v)


def labels_are_classes(labels: Iterable[Any], limits: Limits) -> bool:
    """Whether every label present names a class of the reference's model: ``0``/``1``
    against class-1 probabilities, a class index below the width against probability lists
    (what ``lrwatch baseline build`` accepts as a reference label); anything, otherwise.
    A label that is no class would be scored as wrong and make up an accuracy."""
    if limits.binary_probability:
        return all(v is None or _class_key(v) in ("0", "1") for v in labels)
    if limits.proba_width is not None:
        width = limits.proba_width
        for v in labels:
            if v is None:
                continue
            k = _class_key(v)   # "01" is no class index: scored as a string it never
            if not (k.isascii() and k.isdigit() and int(k) < width  # matched class 1
                    and (len(k) == 1 or k[0] != "0")):
                return False
    return True


def _check_features(r: dict[str, Any], feats: dict[str, Any], limits: Limits) -> None:
    if len(feats) > limits.max_features:
        raise RecordError("too_many_features", f"a record has {len(feats)} features, over "
                          f"the limit of {limits.max_features}")
    types = set(map(type, feats.values()))
    if not _VALUE_TYPES.issuperset(types):
        if NonFinite not in types or not _VALUE_TYPES.issuperset(types - {NonFinite}):
            raise RecordError("invalid_feature", "feature values must be numbers, strings, "
                              "booleans or null")
        bad = [k for k, v in feats.items() if type(v) is NonFinite and v.text != "NaN"]
        if bad:
            raise RecordError("invalid_feature", f"feature values must be finite: "
                              f"{bad[0]!r} is {feats[bad[0]]}")
        # NaN is a missing value (pandas writes one so): the same as null
        r["features"] = feats = {k: (None if type(v) is NonFinite else v)
                                 for k, v in feats.items()}
    if str in types:
        longest = max(len(v) for v in feats.values() if type(v) is str)
        if longest > limits.max_string_chars:
            raise RecordError("string_too_long", f"a feature value is a string of {longest} "
                              f"characters, over the limit of {limits.max_string_chars}")


#: the keys of a record; any other top-level key is ignored, unless it looks like one of the
#: optional ones misnamed (:func:`misnamed_key`)
RECORD_KEYS = frozenset({"features", "prediction", "id", "time", "label"})
#: what a misnamed optional key was meant to be: its reason and the key to write
_MISNAMED = {"label": "invalid_label", "time": "invalid_time", "id": "invalid_id"}
_TIME_ALIASES = frozenset({"timestamp"})


def misnamed_key(r: dict[str, Any]) -> tuple[str, str, str] | None:
    """``(reason, key as written, key meant)`` when record ``r`` has a top-level key that
    is an optional key in another case (``"Label"``, ``"ID"``, ``"Time"``: keys are
    case-sensitive) or ``"timestamp"`` (any case) for ``"time"``, while the key itself is
    absent; ``None`` otherwise. Such a key was ignored: the label never joined, the arrival
    time stood in for the record's. Other keys are the sender's own and stay ignored."""
    for k in r:
        if k in RECORD_KEYS or type(k) is not str:
            continue
        low = k.lower()
        meant = "time" if low in _TIME_ALIASES else low
        if meant in _MISNAMED and meant not in r:
            return _MISNAMED[meant], k, meant
    return None


def _check_misnamed(r: dict[str, Any]) -> None:
    if len(r) > 2 and not RECORD_KEYS.issuperset(r):
        bad = misnamed_key(r)
        if bad is not None:
            reason, k, meant = bad
            why = "keys are case-sensitive" if k.lower() == meant else \
                "the prediction's time (unix seconds) is read from 'time' only"
            raise RecordError(reason, f"the record has {k!r}, which is not read ({why}): "
                              f"write {meant!r}")


_LABEL_HINT = (" (this one looks like a delayed label, an 'id' and a 'label': send those "
               "to /v1/labels)")
_PREDICTION_HINT = (" (this one looks like a prediction record, with 'features' or a "
                    "'prediction': send those to /v1/predictions)")


def _near_miss(r: dict[str, Any], key: str, hint: str) -> str:
    """What to add to the message for a record that lacks ``key``: the key written in
    another case (``"Features"``: keys are case-sensitive), or, for a record of the other
    endpoint's kind, ``hint``; ``""`` otherwise."""
    other = next((k for k in r if type(k) is str and k.lower() == key), None)
    if other is not None:
        return f" (it has {other!r}: keys are case-sensitive, write {key!r})"
    if key == "features" and "label" in r and "prediction" not in r:
        return hint
    if key == "label" and ("features" in r or "prediction" in r):
        return hint
    return ""


def _prediction(r: Any, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    if type(r) is not dict:
        if isinstance(r, Invalid):
            raise RecordError(r.reason, r.message)
        raise RecordError("not_an_object", "a record must be a JSON object")
    feats = r.get("features")
    if type(feats) is not dict:
        raise RecordError("missing_features", "a record needs a 'features' object"
                          + _near_miss(r, "features", _LABEL_HINT))
    _check_features(r, feats, limits)
    if "prediction" not in r:
        raise RecordError("invalid_prediction", "a record needs a 'prediction'"
                          + _near_miss(r, "prediction", ""))
    r["prediction"] = validate_prediction(r["prediction"], limits)
    _check_misnamed(r)
    if "id" in r:
        _check_id(r)
    if "time" in r:
        _check_time(r)
    if "label" in r and r["label"] is not None:
        _check_label(r["label"], limits)
    return r


def _label(r: Any, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    if type(r) is not dict:
        if isinstance(r, Invalid):
            raise RecordError(r.reason, r.message)
        raise RecordError("not_an_object", "a label must be a JSON object")
    if r.get("id") is None:
        raise RecordError("invalid_id", "a label needs the 'id' of its prediction"
                          + _near_miss(r, "id", ""))
    _check_id(r)
    _check_misnamed(r)
    if "label" not in r:
        raise RecordError("invalid_label", "a label record needs a 'label'"
                          + _near_miss(r, "label", _PREDICTION_HINT))
    _check_label(r["label"], limits)
    if "time" in r:
        _check_time(r)
    return r


class Batch:
    """Accepted prediction records, column by column (what the worker windows).

    ``feats`` holds each record's features dict, ``preds`` the predictions; ``ids``, ``times``
    and ``labels`` are lists aligned with them, or ``None`` when no record of the batch has
    one (the common case costs nothing).
    """

    __slots__ = ("feats", "preds", "ids", "times", "labels")

    def __init__(self, feats: list[dict[str, Any]], preds: list[Any],
                 ids: list[Any] | None = None, times: list[Any] | None = None,
                 labels: list[Any] | None = None) -> None:
        self.feats = feats
        self.preds = preds
        self.ids = ids
        self.times = times
        self.labels = labels

    def __len__(self) -> int:
        return len(self.feats)

    def __bool__(self) -> bool:
        return bool(self.feats)

    @classmethod
    def from_records(cls, recs: Sequence[dict[str, Any]]) -> "Batch":
        b = cls([r["features"] for r in recs], [r["prediction"] for r in recs])
        b.ids = _column(recs, "id")
        b.times = _column(recs, "time")
        b.labels = _column(recs, "label")
        return b

    def slice(self, lo: int, hi: int) -> "Batch":
        def cut(col: list[Any] | None) -> list[Any] | None:
            return None if col is None else col[lo:hi]

        return Batch(self.feats[lo:hi], self.preds[lo:hi], cut(self.ids), cut(self.times),
                     cut(self.labels))

    def records(self) -> list[dict[str, Any]]:
        """One dict per record (for callers that want rows)."""
        out = []
        for i, (f, p) in enumerate(zip(self.feats, self.preds)):
            r: dict[str, Any] = {"features": f, "prediction": p}
            for k, col in (("id", self.ids), ("time", self.times), ("label", self.labels)):
                if col is not None and col[i] is not None:
                    r[k] = col[i]
            out.append(r)
        return out


def _column(items: Sequence[dict[str, Any]], key: str) -> list[Any] | None:
    col = list(map(dict.get, items, repeat(key)))
    return col if col.count(None) != len(col) else None


def _finite_floats(values: Iterable[Any]) -> bool:
    # NaN and inf propagate through a sum; an overflowing sum of finite values is sent to the
    # per-record path, which is exact
    return math.isfinite(sum(v for v in values if type(v) is float))


def _fast_predictions(items: list[Any], limits: Limits, short_strings: bool) -> Batch | None:
    """The whole payload as a :class:`Batch` if every item is a valid prediction record
    (checked with a few C-level passes), else ``None``. ``short_strings``: the caller knows
    that no string can be over the limit (every line of the body is shorter)."""
    try:
        feats = list(map(_get_features, items))
        preds = list(map(_get_prediction, items))
    except (KeyError, TypeError, IndexError):
        return None
    if not items or set(map(type, feats)) != {dict} or set(map(type, items)) != {dict}:
        return None
    if not RECORD_KEYS.issuperset(chain.from_iterable(items)) \
            and any(map(misnamed_key, items)):
        return None  # the per-record path names the misnamed key
    if max(map(len, feats)) > limits.max_features:
        return None
    vt = set(map(type, chain.from_iterable(map(dict.values, feats))))
    if not _VALUE_TYPES.issuperset(vt):
        return None  # NonFinite, nested values: the per-record path names them
    pt = set(map(type, preds))
    if (limits.binary_probability or limits.proba_width is not None) and not (
            pt <= {list, dict} if limits.proba_width is not None else
            fits_reference_kind(preds, limits)):
        return None   # lists to unwrap, or values the per-record path refuses by name
    if not pt <= _PRED_TYPES:
        if not pt <= _PRED_OR_PROBA:
            return None
        preds = _probability_column(preds, pt, limits)  # type: ignore[assignment]
        if preds is None:
            return None
        pt = {list}
    elif float in pt and not _finite_floats(preds):
        return None
    if not short_strings and (str in vt or str in pt) and _longest_string(
            chain(chain.from_iterable(map(dict.values, feats)), preds)) > \
            limits.max_string_chars:
        return None
    batch = Batch(feats, preds)
    labels = _column(items, "label")
    if not _check_columns(batch, _column(items, "id"), _column(items, "time"), labels,
                          None if short_strings else limits) \
            or (labels is not None and not labels_are_classes(labels, limits)):
        return None
    return batch


def fits_reference_kind(preds: list[Any], limits: Limits) -> bool:
    """Whether plain predictions (numbers, class names) are all of the kind the reference's
    limits ask for: anything without a probability reference; numbers for a binary one (in
    [0, 1] when its labels made it a classifier); never, for a reference of probability
    lists."""
    if limits.proba_width is not None:
        return False
    if limits.binary_probability:
        return set(map(type, preds)) <= _PROBA_TYPES and (
            not limits.binary_from_labels or not preds or 0 <= min(preds) <= max(preds) <= 1)
    return True


def _probability_column(preds: list[Any], pt: set[type], limits: Limits) -> list[Any] | None:
    """Predictions that are all class probabilities (lists or ``{"proba": [...]}``), as lists,
    if every one is valid (a few C-level passes), else ``None``: then the per-record path
    (:func:`validate_prediction`) names each bad one, with the same result for the good."""
    if not pt <= {list, dict}:
        return None  # mixed with plain values: rare, the per-record path handles it
    if dict in pt:
        if not all(type(p) is list or (type(p) is dict and len(p) == 1 and "proba" in p)
                   for p in preds):
            return None
        preds = [p["proba"] if type(p) is dict else p for p in preds]
        if set(map(type, preds)) != {list}:
            return None
    widths = set(map(len, preds))
    if min(widths) == 0 or max(widths) > MAX_CLASS_PROBABILITIES or (
            limits.proba_width is not None and widths != {limits.proba_width}):
        return None
    flat = list(chain.from_iterable(preds))
    if not _PROBA_TYPES.issuperset(map(type, flat)):
        return None
    if not math.isfinite(sum(flat)) or min(flat) < 0 or max(flat) > 1:
        return None  # NaN/inf never get here as floats (NonFinite); kept for direct callers
    if limits.proba_sum and max(abs(s - 1.0) for s in map(sum, preds)) > PROBA_SUM_TOLERANCE:
        return None
    return preds


def _longest_string(values: Iterable[Any]) -> int:
    return max((len(v) for v in values if type(v) is str), default=0)


def _check_columns(batch: Batch, ids: list[Any] | None, times: list[Any] | None,
                   labels: list[Any] | None, limits: Limits | None = None) -> bool:
    """Whether the optional columns of a batch are all valid (then they are set on it): the
    batch check shared by every fast path, so that all of them accept exactly the same."""
    if ids is not None:
        it = set(map(type, ids))
        if not it <= {str, _NONE}:
            return False  # integer ids are converted on the per-record path
        present = [i for i in ids if i is not None] if _NONE in it else ids
        if min(map(len, present)) == 0 or max(map(len, present)) > 256:
            return False
        batch.ids = ids
    if times is not None:
        tt = set(map(type, times))
        if not tt <= _TIME_TYPES or (float in tt and not _finite_floats(times)) \
                or not times_plausible(times):
            return False
        batch.times = times
    if labels is not None:
        lt = set(map(type, labels))
        if not lt <= _LABEL_OR_NONE or (float in lt and not _finite_floats(labels)):
            return False
        if limits is not None and str in lt and _longest_string(labels) > \
                limits.max_string_chars:
            return False
        batch.labels = labels
    return True


def _validate(items: Iterable[Any], check: Any) -> tuple[list[dict[str, Any]], Counter[str],
                                                         list[str]]:
    ok: list[dict[str, Any]] = []
    rejected: Counter[str] = Counter()
    errors: list[str] = []
    append = ok.append
    for i, item in enumerate(items, 1):
        try:
            append(check(item))
        except RecordError as exc:
            rejected[exc.reason] += 1
            if len(errors) < MAX_ERRORS:
                errors.append(f"record {i}: {exc}")
    return ok, rejected, errors


def validate_predictions(items: Iterable[Any], limits: Limits = DEFAULT_LIMITS, *,
                         short_strings: bool = False
                         ) -> tuple[Batch, Counter[str], list[str]]:
    """Split parsed items into accepted predictions (a :class:`Batch`), rejection counts and
    messages. ``short_strings``: no line of the body was over ``limits.max_string_chars``
    (see :func:`longest_line`), so the string lengths need no check."""
    items = items if isinstance(items, list) else list(items)
    fast = _fast_predictions(items, limits, short_strings)
    if fast is not None:
        return fast, Counter(), []
    ok, rejected, errors = _validate(items, partial(_prediction, limits=limits))
    return Batch.from_records(ok), rejected, errors


def validate_labels(items: Iterable[Any], limits: Limits = DEFAULT_LIMITS
                    ) -> tuple[list[dict[str, Any]], Counter[str], list[str]]:
    """Split parsed items into accepted label records, rejection counts and messages."""
    return _validate(items, partial(_label, limits=limits))


def dumps(obj: Any) -> str:  # compact, for the responses
    return json.dumps(obj, separators=(",", ":"))


def _finite_only(obj: Any) -> Any:
    if type(obj) is float:
        return encode_number(obj)
    if isinstance(obj, dict):
        return {k: _finite_only(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_only(v) for v in obj]
    return obj


def strict_json(obj: Any) -> bytes:
    """Compact JSON that strict parsers accept: a non-finite float is written as the string
    ``"nan"``, ``"inf"`` or ``"-inf"`` (as in trace format v1), never as a bare ``Infinity``."""
    try:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        return json.dumps(_finite_only(obj), separators=(",", ":"), allow_nan=False).encode()
