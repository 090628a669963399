"""Whether a loaded ``state.json`` is a state this daemon can restore (pure, no I/O).

:func:`snapshot_problem` checks the type of every field the daemon's loader reads, before
anything is restored, and names the first that is wrong: a hand-edited or damaged file (``{}``,
a counter ``"x"``) is then set aside and the state rebuilt from the journal, as an unreadable
one is (see ``Daemon._load_snapshot``), instead of stopping the start with a traceback or
restoring a value that breaks the worker later. :func:`newer_version` tells a state written by
a newer lrwatch, which is refused rather than rebuilt (no silent downgrade).

The rule engine's state is checked down to each rule's streak counters; its detectors' states
are the engine's to check (it restores them all or nothing, and the daemon starts the rules
afresh when they do not load). :func:`evidence_problem` checks the drift detector's saved
evidence against the reference it is restored for (widths, finite sums, counts): a damaged
one is refused on its own (the evidence starts afresh, counted), the rest of the state kept.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

__all__ = ["snapshot_problem", "newer_version", "evidence_problem"]

#: counters every state holds (whole numbers >= 0)
_COUNTS = ("predictions", "labels", "received", "labels_joined", "labels_unmatched",
           "labels_expired", "windows")
#: counters a state may hold (numbers >= 0)
_OPTIONAL_COUNTS = ("internal_errors", "estimation_compared", "labels_early",
                    "labels_early_joined")
_WINDOW_TIMES = ("start", "end", "first_time", "last_time", "clock_time", "clock_arrival",
                 "last_arrival")
_WINDOW_COUNTS = ("rejected", "joined", "own_joined")
_WINDOW_SUMS = ("score_sum", "delay_sum", "own_correct", "error_mean")
_RULE_TIMES = ("pending_since", "clear_since", "resolved_step", "resolved_time", "pending_step",
               "last_firing_step")


#: how a snapshot writes a value that is no finite number (trace format v1)
_NONFINITE = ("nan", "inf", "-inf")


class _Bad(Exception):
    """The first field that is not what the loader reads."""


def _is_num(v: Any) -> bool:
    return type(v) is int or type(v) is float and not math.isinf(v)


def _is_count(v: Any) -> bool:
    return _is_num(v) and v >= 0


def _is_whole(v: Any) -> bool:
    return (type(v) is int or type(v) is float and v.is_integer()) and v >= 0


def _is_time(v: Any) -> bool:
    return v is None or _is_num(v)


def _need(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise _Bad(f"{where} is not {what}")


def _mapping(d: Any, where: str) -> Mapping[str, Any]:
    _need(isinstance(d, dict), where, "an object")
    return d


def _rows(v: Any, where: str, check: Callable[[Any], bool], what: str) -> None:
    _need(isinstance(v, list), where, "a list")
    for i, row in enumerate(v):
        _need(check(row), f"{where}[{i}]", what)


def newer_version(snap: Mapping[str, Any], version: int) -> bool:
    """Whether ``snap`` says it was written by a newer lrwatch (a state version above ours)."""
    v = snap.get("version")
    return type(v) is int and v > version


def snapshot_problem(snap: Any, version: int) -> str | None:
    """What makes ``snap`` no state of this ``version`` (the first field found), ``None`` when
    every field the loader reads has its type."""
    try:
        _check(snap, version)
    except _Bad as exc:
        return str(exc)
    return None


def _check(snap: Any, version: int) -> None:
    d = _mapping(snap, "the file")
    if "version" not in d:
        raise _Bad("'version' is missing")
    _need(d.get("version") == version and type(d.get("version")) is int, "'version'",
          f"{version}")
    _counters(d.get("counters"))
    files = _mapping(d.get("files"), "'files'")
    for path, v in files.items():
        _need(isinstance(v, list) and len(v) == 3 and all(map(_is_whole, v)),
              f"'files'[{path!r}]", "[device, inode, offset] (whole numbers)")
    j = d.get("journal")
    _need(isinstance(j, list) and len(j) == 2 and all(type(v) is int and v >= 0 for v in j)
          and j[0] >= 1,
          "'journal'", "[segment, offset] (whole numbers)")
    _window(d.get("window"))
    _pending(d.get("pending"))
    if d.get("ref_rows") is not None:
        _rows(d["ref_rows"], "'ref_rows'", lambda r: isinstance(r, dict), "an object")
    if d.get("ref_ids") is not None:
        _rows(d["ref_ids"], "'ref_ids'", _is_id, "an id (a string or an integer)")
    if d.get("detector") is not None:
        _detector(d["detector"])
    _engine(d.get("engine"))
    if d.get("last") is not None:
        last = _mapping(d["last"], "'last'")
        for k, v in _mapping(last.get("values") or {}, "'last'.'values'").items():
            _need(_is_time(v) or v in _NONFINITE, f"'last'.'values'.{k!r}", "a number")
    if d.get("coverage"):
        _coverage(d["coverage"])
    if d.get("estimates") is not None:
        est = _mapping(d["estimates"], "'estimates'")
        _need(_is_time(est.get("reference")), "'estimates'.'reference'", "a number")
        _rows(est.get("open", []), "'estimates'.'open'",
              lambda r: isinstance(r, list) and len(r) >= 6 and _is_whole(r[0])
              and all(map(_is_num, r[1:6])), "[window, five numbers]")
    if d.get("metric_totals") is not None:
        totals = _mapping(d["metric_totals"], "'metric_totals'")
        if totals.get("label_delay") is not None:
            _mapping(totals["label_delay"], "'metric_totals'.'label_delay'")
        if totals.get("actions") is not None:
            _mapping(totals["actions"], "'metric_totals'.'actions'")


def _counters(c: Any) -> None:
    c = _mapping(c, "'counters'")
    for k in _COUNTS:
        _need(_is_whole(c.get(k)), f"'counters'.{k!r}", "a whole number >= 0")
    for k in _OPTIONAL_COUNTS:
        if k in c:
            _need(_is_count(c[k]), f"'counters'.{k!r}", "a number >= 0")
    for k in ("errors", "problems"):
        for reason, v in _mapping(c.get(k, {}), f"'counters'.{k!r}").items():
            _need(_is_count(v), f"'counters'.{k!r}.{reason!r}", "a number >= 0")
    for rule, by_severity in _mapping(c.get("firings", {}), "'counters'.'firings'").items():
        for sev, v in _mapping(by_severity, f"'counters'.'firings'.{rule!r}").items():
            _need(_is_count(v), f"'counters'.'firings'.{rule!r}.{sev!r}", "a number >= 0")
    _need(isinstance(c.get("errors"), dict), "'counters'.'errors'", "an object")


def _window(w: Any) -> None:
    w = _mapping(w, "'window'")
    _need(_is_whole(w.get("index")), "'window'.'index'", "a whole number >= 0")
    for k in _WINDOW_TIMES:
        _need(_is_time(w.get(k)), f"'window'.{k!r}", "a number or null")
    for k in _WINDOW_COUNTS:
        if k in w:
            _need(_is_whole(w[k]), f"'window'.{k!r}", "a whole number >= 0")
    for k in _WINDOW_SUMS:  # an overflowed sum is saved as "inf" (Window.SUMS); sums of
        if k in w:          # absolute errors, delays and counts are never NaN nor negative
            _need(_is_num(w[k]) or w[k] == "inf", f"'window'.{k!r}", "a number")
    feats, preds = w.get("feats", []), w.get("preds", [])
    _rows(feats, "'window'.'feats'", lambda r: isinstance(r, dict), "an object")
    _need(isinstance(preds, list) and len(preds) == len(feats), "'window'.'preds'",
          "a list as long as 'feats'")


def _is_id(v: Any) -> bool:
    return type(v) is str or type(v) is int


def _pending(p: Any) -> None:
    p = _mapping(p, "'pending'")
    _rows(p.get("items", []), "'pending'.'items'",
          lambda r: isinstance(r, list) and len(r) in (3, 4) and _is_id(r[0])
          and _is_num(r[2]) and (len(r) == 3 or r[3] is None or _is_whole(r[3])),
          "[id, prediction, time, window]")
    early = p.get("early")
    if early is not None:
        early = _mapping(early, "'pending'.'early'")
        _rows(early.get("items", []), "'pending'.'early'.'items'",
              lambda r: isinstance(r, list) and len(r) >= 4 and _is_id(r[0])
              and _is_num(r[2]) and _is_num(r[3]), "[id, label, time, arrival]")
        _rows(early.get("joined", []), "'pending'.'early'.'joined'",
              lambda r: isinstance(r, list) and len(r) >= 2 and _is_id(r[0]) and _is_num(r[1]),
              "[id, time]")


def _numbers(v: Any) -> bool:
    return isinstance(v, list) and all(map(_is_time, v))


def _detector(det: Any) -> None:
    det = _mapping(det, "'detector'")
    ref = det.get("reference")
    if ref is not None:
        ref = _mapping(ref, "'detector'.'reference'")
        _need(ref.get("features") is None or isinstance(ref["features"], list),
              "'detector'.'reference'.'features'", "a list")
    _rows(det.get("history", []), "'detector'.'history'",
          lambda r: isinstance(r, list) and len(r) == 2 and _numbers(r[0]) and _numbers(r[1]),
          "[sums, counts] (lists of numbers)")
    _rows(det.get("joint_history", []), "'detector'.'joint_history'",
          lambda r: isinstance(r, list) and len(r) == 2 and _numbers(r[0]) and _is_time(r[1]),
          "[sums, count]")


def _engine(e: Any) -> None:
    """The rule engine's state as far as the daemon's start reads it: each rule's streak
    counters (a ``"x"`` there loaded, and broke the worker at the rule's next window). The
    detectors' states are the engine's to check: it loads them all or nothing, and the
    daemon starts the rules afresh when they do not load."""
    e = _mapping(e, "'engine'")
    _need(_is_time(e.get("last_step")) and _is_time(e.get("last_time")),
          "'engine'.'last_step'/'last_time'", "a number or null")
    for name, r in _mapping(e.get("rules"), "'engine'.'rules'").items():
        where = f"'engine'.'rules'.{name!r}"
        r = _mapping(r, where)
        for k in ("pending", "clear"):
            _need(type(r.get(k)) is int and r[k] >= 0, f"{where}.{k!r}", "a whole number >= 0")
        for k in _RULE_TIMES:
            _need(_is_time(r.get(k)), f"{where}.{k!r}", "a number or null")
        _mapping(r.get("detectors"), f"{where}.'detectors'")
        for k in ("firing", "last_firing"):
            _need(r.get(k) is None or isinstance(r[k], dict), f"{where}.{k!r}",
                  "an object or null")


def _coverage(c: Any) -> None:
    c = _mapping(c, "'coverage'")
    _need(_is_time(c.get("horizon", -1)), "'coverage'.'horizon'", "a number")
    _need(_is_time(c.get("now")), "'coverage'.'now'", "a number or null")
    _rows(c.get("buckets", []), "'coverage'.'buckets'",
          lambda r: isinstance(r, list) and len(r) == 3 and type(r[0]) is int
          and _is_whole(r[1]) and _is_whole(r[2]), "[bucket, predictions, labelled] (whole "
          "numbers)")


def _finite(v: Any) -> bool:
    return (type(v) is int or type(v) is float) and math.isfinite(v)


def _sums(v: Any, width: int) -> bool:
    return isinstance(v, list) and len(v) == width and all(map(_finite, v))


def evidence_problem(state: Mapping[str, Any], width: int, joint_width: int | None
                     ) -> str | None:
    """What makes a drift detector's saved evidence (``DriftDetector.state_dict``) no evidence
    of a detector with ``width`` numeric features and a joint test of ``joint_width`` features
    (``None``: none runs): the first row found, ``None`` when every row is one.

    A sum or count that is ``null`` was read as NaN, and one NaN made the feature's
    accumulated test NaN, never over its threshold, for the 16 windows the row stays; a
    ``null`` window size of the joint test stopped the start with a ``TypeError``; a count
    row shorter than the sums was broadcast."""
    for i, row in enumerate(state.get("history") or []):
        if not (isinstance(row, list) and len(row) == 2 and _sums(row[0], width)
                and _sums(row[1], width) and all(v >= 0 for v in row[1])):
            return (f"'history'[{i}] is not [{width} finite sums, {width} counts >= 0] "
                    f"(one of each per numeric feature)")
    if joint_width is None:
        return None
    for i, row in enumerate(state.get("joint_history") or []):
        if not (isinstance(row, list) and len(row) == 2 and _sums(row[0], joint_width)
                and _finite(row[1]) and row[1] > 0):
            return (f"'joint_history'[{i}] is not [{joint_width} finite sums, a window size "
                    f"> 0] (one sum per feature of the joint test)")
    return None
