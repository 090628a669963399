"""Windows and labels, on the worker: counted records go into windows by count or by time,
inline labels are joined at once, records with an id wait for theirs (:mod:`.labels`), and
a closed window goes to the evaluation (:mod:`.evaluation`).

:class:`WindowsMixin` is one of the parts :class:`~.core.Daemon` is made of; it runs on the
worker thread only, like the rest of the state it shares with them.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from ..errors import ConfigError
from .baseline import build_reference
from .coverage import LabelCoverage
from .labels import PendingLabels, is_classification, score
from .records import DATA_REASONS, Batch
from .reference import describe_prediction_type
from .windows import Window

if TYPE_CHECKING:
    from .config import DaemonConfig
    from .metrics import DaemonMetrics
    from .reference import Reference
    from .stats import Profile

__all__ = ["WindowsMixin"]

_log = logging.getLogger("lrwatch.daemon")
_PLAIN = frozenset({float, int, str, bool})


class WindowsMixin:
    """Counting, windowing and the label join (see the module notes)."""

    config: DaemonConfig
    metrics: DaemonMetrics
    counters: dict[str, Any]
    pending: PendingLabels
    window: Window
    reference: Reference | None
    _profile: Profile | None
    _ref_rows: list[dict[str, Any]]
    _ref_ids: set[Any]
    coverage: LabelCoverage
    reference_error: str | None

    if TYPE_CHECKING:  # provided by the other parts of Daemon
        def _close_window(self, now: float) -> None:  # see EvaluationMixin
            ...

        def _estimation_join(self, window: int | None, correct: float) -> None:  # OutputsMixin
            ...

        def _start_calibration(self, ref: Reference) -> None:  # see EvaluationMixin
            ...

    def _counters_state(self) -> dict[str, Any]:
        """The counters to save, with ``lrwatch_internal_errors_total`` and
        ``lrwatch_daemon_problems_total`` (counted on every thread, so read from the
        metrics)."""
        self.counters["internal_errors"] = self.metrics.internal_error_total()
        self.counters["problems"] = self.metrics.problem_totals()
        return self.counters

    def _count_rejections(self, rej: Mapping[str, int]) -> None:
        if not rej:
            return
        total = data = 0
        errs = self.counters["errors"]
        for reason, n in rej.items():
            errs[reason] = errs.get(reason, 0) + n
            self.metrics.errors[reason].inc(n)
            total += n
            if reason in DATA_REASONS:
                data += n
        self.counters["received"] += total
        self.metrics.received.inc(total)
        # ingest_error_ratio is about the data: 401s, 429s and a full disk have their own
        # series and alerts (rules/lrwatch-serving.rules.yml)
        self.window.rejected += data

    def _add_predictions(self, b: Batch, t_arrival: float) -> None:
        if not b:
            return
        n = len(b)
        self.counters["predictions"] += n
        self.counters["received"] += n
        self.metrics.predictions.inc(n)
        self.metrics.received.inc(n)
        self._expire_early(t_arrival)
        if self.reference is None:
            self._collect_reference(b, t_arrival)
            return
        self._windowize(b, t_arrival)

    def _windowize(self, b: Batch, t_arrival: float) -> None:
        """Put counted records into windows, a slice at a time (closing them as they fill)."""
        if self.reference.prediction_type == "probability" \
                and not _PLAIN.issuperset(map(type, b.preds)):  # type: ignore[union-attr]
            # validated before the live reference was known (the batch that completed it,
            # those of its calibration): [p0, p1] is p1 and [p] is p, as validation reads
            # them against it
            b.preds = [p[-1] if type(p) is list and len(p) in (1, 2) else p for p in b.preds]
        n = len(b)
        ws = self.config.window_seconds
        size = self.config.window_size
        times = b.times
        if times is not None and None in times:
            times = [t_arrival if t is None else t for t in times]
        if times is None:
            self.coverage.add_count(t_arrival, n)
        else:
            self.coverage.add_predictions(times)
        tarr = None
        if ws is not None:
            tarr = (np.asarray(times, dtype=np.float64) if times is not None
                    else np.full(n, t_arrival))
        pos = 0
        while pos < n:
            if tarr is None:
                w = self.window
                stop = min(n, pos + max(size - len(w), 1))
            else:
                w, stop = self._time_slice(tarr, pos, ws)  # type: ignore[arg-type]
            self._append(w, b, pos, stop, times, t_arrival)
            if tarr is not None:
                w.advance_clock(float(tarr[pos:stop].max()), t_arrival)
                if len(w) >= self.config.window_max_records:
                    self._window_full(w)
            elif len(w) >= size:
                self._close_window(w.last_time if w.last_time is not None else t_arrival)
            pos = stop
        self._update_fill(t_arrival)

    def _time_slice(self, tarr: np.ndarray, pos: int, ws: float) -> tuple[Window, int]:
        """The time window record ``pos`` goes to (closing the open one when the record is
        past its end), and where the run of records that go there with it stops: at the first
        one past the window's end, or where the window reaches ``window_max_records``."""
        w = self.window
        t0 = float(tarr[pos])
        if w.start is None:
            w.start = math.floor(t0 / ws) * ws
            w.end = w.start + ws
        elif t0 >= w.end and len(w):  # type: ignore[operator]
            self._close_window(t0)
            w = self.window
            w.start = math.floor(t0 / ws) * ws
            w.end = w.start + ws
        later = np.flatnonzero(tarr[pos + 1:] >= w.end)
        stop = pos + 1 + int(later[0]) if later.size else len(tarr)
        return w, min(stop, pos + max(self.config.window_max_records - len(w), 1))

    def _window_full(self, w: Window) -> None:
        """A time window reached ``window_max_records``: it is closed and tested now, and
        the records after it go to a new window over the same interval. A flood, or a
        stream whose clock stands still, never holds more than that in memory."""
        start, end = w.start, w.end
        _log.warning("time window %d reached %d records before its end: closed early",
                     w.index, len(w))
        self._close_window(w.last_time if w.last_time is not None else 0.0)
        self.window.start, self.window.end = start, end

    def _append(self, w: Window, b: Batch, lo: int, hi: int, times: list[Any] | None,
                t_arrival: float) -> None:
        """Records ``lo:hi`` of ``b`` join window ``w``: inline labels are joined, records
        with an id wait for theirs."""
        w.extend_batch(self._profile, b, lo, hi)
        if w.first_time is None:
            w.first_time = times[lo] if times is not None else t_arrival
        w.last_time = times[hi - 1] if times is not None else t_arrival
        w.last_arrival = t_arrival
        ids, labels, preds = b.ids, b.labels, b.preds
        if labels is not None:
            ptype = self.reference.prediction_type  # type: ignore[union-attr]
            waiting = []
            for i in range(lo, hi):
                if labels[i] is not None:
                    t = times[i] if times is not None else t_arrival
                    self._join(preds[i], labels[i], t, t, ptype, w.index)
                elif ids is not None and ids[i] is not None:
                    waiting.append(i)
            if waiting:
                self._await_labels(
                    [ids[i] for i in waiting], [preds[i] for i in waiting],  # type: ignore
                    [times[i] for i in waiting] if times is not None
                    else [t_arrival] * len(waiting), w.index, t_arrival)
        elif ids is not None:
            sl = ids[lo:hi]
            if None in sl:
                keep = [i for i in range(lo, hi) if ids[i] is not None]
                sl = [ids[i] for i in keep]
                ps = [preds[i] for i in keep]
                ts = [times[i] for i in keep] if times is not None else [t_arrival] * len(keep)
            else:
                ps = preds[lo:hi]
                ts = times[lo:hi] if times is not None else [t_arrival] * (hi - lo)
            if sl:
                self._await_labels(sl, ps, ts, w.index, t_arrival)  # type: ignore[arg-type]

    def _await_labels(self, ids: list[str], preds: list[Any], times: list[float],
                      window: int, t_arrival: float) -> None:
        """Predictions with an id wait for their label, unless it came first (then they are
        joined now)."""
        early = self.pending.early
        early.predicted(ids)
        if early.any_of(ids):
            ptype = self.reference.prediction_type  # type: ignore[union-attr]
            keep = []
            for i, id_ in enumerate(ids):
                hit = early.take(id_)
                if hit is None:
                    keep.append(i)
                    continue
                self.counters["labels_early_joined"] = \
                    self.counters.get("labels_early_joined", 0) + 1
                early.joined(id_, t_arrival)
                self._join(preds[i], hit[0], times[i], hit[1], ptype, window)
            if len(keep) < len(ids):
                ids, preds, times = ([a[i] for i in keep] for a in (ids, preds, times))
        if ids:
            self._expired(self.pending.add_many(ids, preds, times, window))

    def _expire_early(self, now: float) -> None:
        """Labels that waited for their prediction longer than ``early_label_seconds``: given
        up, counted as unmatched (arrival times: a replay gives them up alike)."""
        self._unmatched(self.pending.early.expire(now), "labels_early_expired")

    def _unmatched(self, k: int, also: str | None = None) -> None:
        if k:
            self.counters["labels_unmatched"] += k
            self.metrics.labels_unmatched.inc(k)
            if also is not None:
                self.counters[also] = self.counters.get(also, 0) + k

    def _expired(self, k: int) -> None:
        if k:
            self.counters["labels_expired"] += k
            self.metrics.labels_expired.inc(k)

    def _collect_reference(self, b: Batch, t_arrival: float) -> None:
        need = self.config.live_records - len(self._ref_rows)
        labels = b.labels[:need] if b.labels is not None else []
        self._ref_rows.extend({"features": f, "prediction": p} if lab is None else
                              {"features": f, "prediction": p, "label": lab}
                              for f, p, lab in zip(b.feats[:need], b.preds[:need],
                                                   labels or [None] * need))
        if b.ids is not None:
            self._ref_ids.update(i for i in b.ids[:need] if i is not None)
        if len(self._ref_rows) >= self.config.live_records:
            _log.info("building the reference from the first %d records", len(self._ref_rows))
            # calibration and the estimator's fit happen off the worker (_start_calibration)
            try:
                ref = build_reference(self._ref_rows, calibrate=False, estimate=False)
            except ConfigError as exc:
                self._reference_failed(exc)
                return
            _log.info("live reference: prediction %s", describe_prediction_type(ref))
            for note in ref.notes:
                _log.warning("live reference: %s", note)
            self._start_calibration(ref)
            if len(b) > need:
                self._windowize(b.slice(need, len(b)), t_arrival)

    def _reference_failed(self, exc: ConfigError) -> None:
        """These rows make no reference (every feature empty, say): building it again from
        the same rows would fail the same way on every batch, so the next ``live_records``
        records are collected instead. The records stay counted; the reason is in the log,
        ``lrwatch_internal_errors_total`` and ``/v1/status`` (``collecting_reference``)."""
        self.metrics.internal_errors.inc()
        self.reference_error = f"the first {len(self._ref_rows)} records make no reference " \
                               f"({exc}); collecting the next {self.config.live_records}"
        _log.error("%s", self.reference_error)
        self._ref_rows = []

    def _add_labels(self, recs: list[dict[str, Any]], t_arrival: float) -> None:
        if not recs:
            return
        n = len(recs)
        self.counters["labels"] += n
        self.counters["received"] += n
        self.metrics.labels.inc(n)
        self.metrics.received.inc(n)
        ptype = self.reference.prediction_type if self.reference else "class"
        early = self.pending.early
        self._expire_early(t_arrival)
        for r in recs:
            hit = self.pending.join(r["id"])
            if hit is None and early.was_joined(r["id"]):
                # re-sent for a prediction already joined: a duplicate, never held for a
                # later prediction that reuses the id (docs/daemon.md)
                self._unmatched(1, "labels_duplicate")
                continue
            if hit is None and r["id"] in self._ref_ids:
                # a record of the live reference: not windowed, so there is nothing to join
                # (the reference's estimator was fitted on its inline labels; docs/daemon.md)
                self._unmatched(1, "labels_reference_record")
                continue
            if hit is None:  # its prediction may be on its way: held (docs/daemon.md)
                self._unmatched(early.hold(r["id"], r["label"], r.get("time", t_arrival),
                                           t_arrival))
                if early.enabled:
                    self.counters["labels_early"] = self.counters.get("labels_early", 0) + 1
                continue
            pred, tp, widx = hit
            early.joined(r["id"], t_arrival)
            self._join(pred, r["label"], tp, r.get("time", t_arrival), ptype, widx)

    def _join(self, pred: Any, label: Any, t_pred: float, t_label: float, ptype: str,
              window: int | None = None) -> None:
        """A label met its prediction (made at ``t_pred``, in window ``window``)."""
        s = score(pred, label, ptype)
        self.counters["labels_joined"] += 1
        self.metrics.labels_joined.inc()
        self.coverage.add_label(t_pred)
        delay = max(0.0, t_label - t_pred)
        self.metrics.label_delay.observe(delay)
        if s is None:
            return
        w = self.window
        w.joined += 1
        w.score_sum += s
        w.delay_sum += delay
        if is_classification(ptype):
            if window == w.index:
                w.own_joined += 1
                w.own_correct += s
            else:
                self._estimation_join(window, s)
        else:
            w.add_error(s)

    def _update_fill(self, now: float) -> None:
        w = self.window
        if self.config.window_seconds is not None:
            fill = 0.0 if w.start is None else min(1.0, max(0.0, (now - w.start)
                                                          / self.config.window_seconds))
        else:
            fill = len(w) / self.config.window_size
        self.metrics.fill.set(fill)

    def _new_window(self, index: int) -> Window:
        return Window(index)
