"""Durability, on the worker: the state a snapshot holds, the start from a saved state and
the journal replay after it, and the snapshots themselves (see :mod:`.state` for the files).

:class:`DurabilityMixin` is one of the parts :class:`~.core.Daemon` is made of. A saved state
that is no state is set aside and rebuilt from the journal (:func:`.state.load_checked_snapshot`);
a damaged detector state inside a good one (:class:`~lrwatch.errors.DamagedStateError`) is
refused on its own, counted, and that detector starts afresh (sixteenth round).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, DamagedStateError
from ..samples import decode_number, encode_number
from .records import REASONS, lines_within, loads, parse_payload, validate_labels, \
    validate_predictions
from .state import load_checked_snapshot, save_snapshot
from .windows import Window

if TYPE_CHECKING:
    from .config import DaemonConfig
    from .coverage import LabelCoverage
    from .detector import DriftDetector
    from .estimate_tracking import EstimateTracker
    from .ingest import BoundedQueue
    from .labels import PendingLabels
    from .metrics import DaemonMetrics
    from .records import Batch, Limits
    from .state import Journal

__all__ = ["DurabilityMixin", "STATE_VERSION"]

_log = logging.getLogger("lrwatch.daemon")
#: the version of ``state.json`` this lrwatch writes and reads
STATE_VERSION = 1


def _saved_last(last: dict[str, Any]) -> dict[str, Any]:
    """The last window's summary for the snapshot: a value that is no finite number (the
    mean of predictions near the float range, an absolute error that overflowed) as
    ``"inf"``/``"nan"``, since JSON has none (orjson wrote ``null``, which stopped every later
    start when the gauges were restored from it)."""
    values = last.get("values")
    if not values:
        return last
    return {**last, "values": {k: encode_number(v) for k, v in values.items()}}


def _loaded_last(last: dict[str, Any]) -> dict[str, Any]:
    """:func:`_saved_last` read back; a ``null`` value (a snapshot written before) is left
    out: what it was is unknown."""
    values = last.get("values")
    if not values:
        return last
    return {**last, "values": {k: decode_number(v) for k, v in values.items()
                               if v is not None}}


class DurabilityMixin:
    """Snapshots, the start from one, and the journal replay (see the module notes)."""

    config: DaemonConfig
    metrics: DaemonMetrics
    counters: dict[str, Any]
    files: dict[str, list[int]]
    journal_pos: list[int]
    journal: Journal | None
    queue: BoundedQueue
    limits: Limits
    window: Window
    pending: PendingLabels
    coverage: LabelCoverage
    detector: DriftDetector | None
    estimates: EstimateTracker | None
    engine: Any
    alerts: Any
    hook: Any
    last: dict[str, Any]
    _ref_rows: list[dict[str, Any]]
    _ref_ids: set[Any]
    _calibrating: bool
    _replaying: bool
    _dirty: bool
    _last_snapshot: float

    if TYPE_CHECKING:  # provided by the other parts of Daemon
        def _counters_state(self) -> dict[str, Any]:  # see WindowsMixin
            ...

        def _count_rejections(self, rej: Any) -> None:  # see WindowsMixin
            ...

        def _add_predictions(self, ok: Batch, t: float) -> None:  # see WindowsMixin
            ...

        def _add_labels(self, ok: Any, t: float) -> None:  # see WindowsMixin
            ...

        def _republish(self) -> None:  # see PublishingMixin
            ...

        def _expired(self, k: int) -> None:  # see WindowsMixin
            ...

        def _unmatched(self, k: int, also: str | None = None) -> None:  # see WindowsMixin
            ...

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "counters": self._counters_state(), "files": self.files,
                "journal": self.journal_pos, "window": self.window.state_dict(),
                "pending": self.pending.state_dict(), "ref_rows": self._ref_rows,
                "ref_ids": list(self._ref_ids),
                "detector": self.detector.state_dict() if self.detector else None,
                "engine": self.engine.state_dict(), "last": _saved_last(self.last),
                "coverage": self.coverage.state_dict(),
                "estimates": self.estimates.state_dict() if self.estimates else None,
                "metric_totals": self.metrics.totals(self._actions())}

    def _actions(self) -> dict[str, Any]:
        return {"alerts": self.alerts, "hook": self.hook}

    def _load_snapshot(self) -> dict[str, Any] | None:
        """The saved state (:func:`.state.load_checked_snapshot`: one that is no state is set
        aside and the whole journal rebuilds it)."""
        assert self.journal is not None and self.config.state_dir
        return load_checked_snapshot(self.config.state_dir, STATE_VERSION,
                                     self.journal.segments(),
                                     self.metrics.problems["snapshot_set_aside"].inc)

    def _restore(self, snap: dict[str, Any] | None) -> None:
        if not self.config.state_dir:
            return
        if snap is not None:
            self.counters = snap["counters"]
            for r in REASONS:
                self.counters["errors"].setdefault(r, 0)
            self.files = {k: list(v) for k, v in snap["files"].items()}
            self.journal_pos = list(snap["journal"])
            self.window = Window.from_state(snap["window"])
            self.pending.load_state_dict(snap["pending"])
            self._ref_rows = snap.get("ref_rows") or []
            self._ref_ids = set(snap.get("ref_ids") or [])
            self._restore_detectors(snap)
            self.last = _loaded_last(snap.get("last") or {})
            self.coverage.load_state_dict(snap.get("coverage") or {})
            if self.estimates is not None:
                self.estimates.load_state_dict(snap.get("estimates"))
            self.metrics.restore_totals(snap.get("metric_totals") or {}, self._actions())
        self.metrics.restore(self.counters)
        self._trim_labels()
        assert self.journal is not None
        replayed = 0
        self._replaying = True  # a live reference completed during replay calibrates inline
        try:
            for seg, end, kind, t, payload in self.journal.replay(*self.journal_pos):
                self._apply_journal(kind, t, payload)
                self.journal_pos = [seg, end]
                replayed += 1
        finally:
            self._replaying = False
        self.journal.segment = max([self.journal_pos[0]] + self.journal.segments())
        self.journal.open()
        if replayed:
            _log.info("replayed %d journal entries", replayed)
            self._snapshot()
        self._republish()

    def _trim_labels(self) -> None:
        """A state saved under larger label limits (``max_pending_labels``,
        ``labels.max_early``, lowered for memory) is brought within the new ones at once, the
        predictions forgotten counted as expired and the labels given up as unmatched, as
        when they are pushed out at run time."""
        forgotten, given_up = self.pending.trim()
        if forgotten or given_up:
            _log.warning("the saved state held more than the label limits allow now: %d "
                         "pending predictions forgotten (counted as expired), %d early "
                         "labels given up (counted as unmatched)", forgotten, given_up)
            self._expired(forgotten)
            self._unmatched(given_up)
            self._dirty = True

    def _restore_detectors(self, snap: dict[str, Any]) -> None:
        """The drift evidence and the rules' states. Another reference's evidence, or rules
        changed since, start afresh with a warning; a damaged state (wrong types, widths,
        missing sums: :class:`~lrwatch.errors.DamagedStateError`) is refused too, and counted
        (``lrwatch_daemon_problems_total{reason="detector_state_refused"}``): the drift
        detector is the reference's with no evidence yet, the rules start afresh."""
        try:
            if snap.get("detector") and self.detector:
                self.detector.resume(snap["detector"])  # another reference: afresh
        except DamagedStateError as exc:
            self._refused_state(exc, "the drift evidence starts afresh from the reference")
        try:
            self.engine.load_state_dict(snap["engine"])
        except DamagedStateError as exc:
            self._refused_state(exc, "the rules start afresh")
        except (ConfigError, TypeError, ValueError, KeyError, AttributeError,
                IndexError) as exc:  # the rules changed (or a damaged part of their
            # state, which the engine restores all or nothing): start them fresh
            _log.warning("rule state not restored: %s", exc)

    def _refused_state(self, exc: Exception, then: str) -> None:
        self.metrics.problems["detector_state_refused"].inc()
        _log.warning("%s: a damaged detector state is not restored (%s); %s. The rest of the "
                     "state is kept", os.path.join(self.config.state_dir or "", "state.json"),
                     exc, then)

    def _snapshot(self) -> None:
        if not self.config.state_dir or self._calibrating:
            return  # see the module notes: never snapshot windows that are not tested yet
        try:
            save_snapshot(self.config.state_dir, self.state_dict())
        except OSError:
            self.metrics.internal_errors.inc()
            _log.exception("snapshot failed")
            return
        self._dirty = False
        self._last_snapshot = time.monotonic()
        j = self.journal
        if j is not None:
            try:
                with self.queue.cond:
                    if j.size > 64 * 1024 * 1024 and self.journal_pos[0] == j.segment:
                        j.roll()
                j.prune(self.journal_pos[0])
            except OSError:  # a full disk: the current segment stays; tried again next time
                self.metrics.internal_errors.inc()
                _log.exception("rolling the journal failed")

    def _apply_journal(self, kind: bytes, t: float, payload: bytes) -> None:
        """Re-apply one journal entry during replay (same parse, same validation)."""
        if kind == b"R":
            self._count_rejections(loads(payload))
            return
        lim = self.limits
        items = parse_payload(payload, limits=lim)
        ok, rej, _ = (validate_predictions(
            items, lim, short_strings=lines_within(payload, lim.max_string_chars))
            if kind == b"P" else validate_labels(items, lim))
        self._count_rejections(rej)
        if kind == b"P":
            self._add_predictions(ok, t)
        else:
            self._add_labels(ok, t)
