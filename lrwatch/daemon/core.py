"""The daemon: front end, worker, durability, and the parts it is made of.

:class:`Daemon` ties together five responsibilities, each in a module of its own:

* ingest and journal (:mod:`.ingest`, :class:`~.ingest.Ingest`, its own object on the front
  ends' threads): parse and validate payloads, journal them before they are acknowledged (see
  :mod:`.state`), and put them on a bounded queue;
* windows and labels (:mod:`.windowing`): one worker thread applies entries in order, so all
  counting happens in one place and the state it snapshots is consistent;
* evaluation (:mod:`.evaluation`): closed windows are tested against the reference, and a live
  reference is calibrated in the background;
* publishing and status (:mod:`.publishing`): metrics, rule actions, ``/v1/status``;
* durability (:mod:`.durability`): snapshots, the start from one, the journal replay.

This module keeps what binds them: set-up and the worker loop.

A tailed file's chunks are parsed on the worker, right before they are windowed: with the
``fast`` extra or the compiled ``_jsonl`` extension, :class:`~.columnar.ChunkDecoder` turns a
chunk laid out like the reference straight into columns (no dict per record), and any chunk it
does not take goes through the general parse and validation, so both give the same counts and
windows. NDJSON bodies over HTTP take the same decoder in the front end.

When the reference is the first N live records, its thresholds are calibrated on a background
thread (seconds of CPU). Ingest goes on meanwhile: records are counted and windowed, closed
windows wait as columns (at most :data:`~.evaluation.MAX_WAITING_WINDOWS`; then the worker
waits for the calibration, so the queue fills and answers 429), and they are tested in order
once the thresholds are ready. No snapshot is written while a calibration runs, so a crash
replays the journal from before the reference was complete and calibrates again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import numpy as np

from ..errors import ConfigError
from .config import DaemonConfig
from .detector import DriftDetector
from .evaluation import EvaluationMixin
from .ingest import BoundedQueue, Ingest
from .coverage import LabelCoverage
from .estimate_tracking import EstimateTracker
from .labels import EarlyLabels, PendingLabels
from .metrics import DaemonMetrics
from .outputs import OutputsMixin
from .publishing import PublishingMixin
from .durability import DurabilityMixin
from .records import REASONS, Limits
from .reference import Reference
from .state import Journal
from .stats import Profile
from .windowing import WindowsMixin
from .windows import Window

__all__ = ["Daemon"]

_log = logging.getLogger("lrwatch.daemon")



def daemon_rules(config: DaemonConfig) -> Any:
    """The daemon's rules: the serving pack, or the config's pack names and rule files joined
    in order as layers (docs/rules.md, "Layering rule sets"); every ``hook.rules`` name must
    be one of them."""
    from ..rules import load_pack
    from ..rules.layering import join

    rules = (join([config.rules] if isinstance(config.rules, str) else config.rules)
             if config.rules else load_pack("serving"))
    unknown = sorted(set(config.hook_rules or ()) - set(rules.names))
    if unknown:  # a hook that never runs, without a word: a typo in the config
        raise ConfigError(f"hook rules {unknown} are not rules of "
                          f"{config.rules or 'the serving pack'}; its rules: "
                          f"{', '.join(rules.names)}")
    return rules

class Daemon(DurabilityMixin, WindowsMixin, EvaluationMixin, OutputsMixin, PublishingMixin):
    """The serving-side watcher. ``start()`` runs the worker; front ends call :meth:`submit`.

    Parameters
    ----------
    config:
        The settings (:class:`~.config.DaemonConfig`).
    registry:
        Where the metrics go; a fresh ``CollectorRegistry`` by default.
    executor:
        A :class:`concurrent.futures.Executor` that calibrates a live reference; by default a
        thread of its own. Calibration never runs on the worker (see the module notes).
    """

    def __init__(self, config: DaemonConfig, *, registry: Any = None,
                 executor: Any = None) -> None:
        self.config, self._executor = config, executor
        self.pending = PendingLabels(config.max_pending_labels, EarlyLabels(
            config.max_early_labels, config.early_label_seconds,
            max_joined=config.max_pending_labels))
        # lrwatch_pending_labels reads the store's size when scraped (len is atomic)
        self.metrics = DaemonMetrics(registry, pending=self.pending.__len__)
        self.registry = self.metrics.registry
        self.coverage = LabelCoverage(config.label_horizon_seconds)
        self.metrics.model.horizon.set(config.label_horizon_seconds)
        self.estimates: EstimateTracker | None = None
        self._distribution: Any = None
        self._errors: list[float] = []
        self.counters: dict[str, Any] = {"predictions": 0, "labels": 0, "received": 0,
                                         "labels_joined": 0, "labels_unmatched": 0,
                                         "labels_expired": 0, "windows": 0,
                                         "errors": {r: 0 for r in REASONS}}
        self.files: dict[str, list[int]] = {}  # path -> [dev, ino, offset] applied
        self.journal_pos = [1, 0]
        self.reference: Reference | None = None
        self.detector: DriftDetector | None = None
        self._ref_rows: list[dict[str, Any]] = []
        # ids of the records a live reference was collected from (never windowed): their
        # labels are counted at once, as `labels_reference_record`, not held (docs/daemon.md)
        self._ref_ids: set[Any] = set()
        self.reference_error: str | None = None  # why the last live rows made no reference
        self._profile: Profile | None = None  # the reference's arrays (before the detector)
        self._calibrating = False
        self._cal_done = threading.Event()  # set when the calibration has a result
        self._cal_result: Any = None  # a DriftDetector or the exception, from the thread
        self._cal_rows: list[dict[str, Any]] = []  # the reference rows, until calibrated
        self._waiting: list[tuple[Window, int, np.ndarray, list[np.ndarray]]] = []
        self._replaying = False
        self.window = self._new_window(0)
        self.last: dict[str, Any] = {}
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._busy = False  # the worker is applying an entry (drain waits for it)
        self._dirty = False
        self._last_snapshot = time.monotonic()
        self.tailers: list[Any] = []
        from ..rules import Engine

        self.rules = daemon_rules(config)
        self.engine = Engine(self.rules)
        self._setup_actions()
        self.journal: Journal | None = None
        if config.state_dir:
            os.makedirs(config.state_dir, exist_ok=True)
            self.journal = Journal(config.state_dir)
        self.ingest = Ingest(config, self.metrics, self.journal, lambda: self._profile,
                             self._stop)
        self.queue: BoundedQueue = self.ingest.queue
        self.limits: Limits = self.ingest.limits
        snap = self._load_snapshot() if config.state_dir else None
        self._load_reference(snap)
        self._restore(snap)

    # --- set-up --------------------------------------------------------------------------------
    def _setup_actions(self) -> None:
        from ..actions import AlertmanagerSink, AlertSender, HookAction, LogSink, WebhookSink
        from ..actions.alerts import export_no_sinks
        from ..actions.notify import Notifier

        cfg = self.config
        sinks: list[Any] = [AlertmanagerSink(u, name=f"alertmanager{i or ''}")
                            for i, u in enumerate(cfg.alertmanager)]
        sinks += [WebhookSink(u, name=f"webhook{i or ''}") for i, u in enumerate(cfg.webhook)]
        if cfg.log_alerts:
            sinks.append(LogSink(_log))
        self.alerts = AlertSender(sinks, registry=self.registry,
                                  resend_interval=cfg.resend_interval,
                                  on_error=self.metrics.internal_errors.inc) if sinks else None
        if self.alerts is None:   # lrwatch_alerts_sent_total at 0, not missing
            export_no_sinks(self.registry, self)
        self.hook = HookAction(cfg.hook_argv, cooldown=cfg.hook_cooldown,
                               timeout=cfg.hook_timeout, registry=self.registry,
                               on_error=self.metrics.internal_errors.inc) \
            if cfg.hook_argv else None
        # the same notifier as the Watcher's; the daemon logs every event itself (_act)
        self.notifier = Notifier(self.alerts, self.hook, on_error=self.metrics.internal_errors.inc,
                                 log_without_sender=False)

    def _ref_path(self) -> str | None:
        if self.config.reference:
            return self.config.reference
        if self.config.state_dir:
            return os.path.join(self.config.state_dir, "reference.json")
        return None

    def _load_reference(self, snap: dict[str, Any] | None) -> None:
        path = self._ref_path()
        if path and os.path.exists(path):
            if not self.config.reference and self._replay_builds_reference(snap):
                _log.info("the snapshot predates the live reference: the replay builds it")
                return
            self._set_reference(Reference.load(path), save=False)
        elif self.config.reference:
            raise ConfigError(f"reference {self.config.reference!r} does not exist; build one "
                              f"with `lrwatch baseline build DATA -o {self.config.reference}`")

    def _replay_builds_reference(self, snap: dict[str, Any] | None) -> bool:
        """Whether the replay starts before the live reference was complete (saved, then a
        crash before a snapshot held it). Then the replay builds it again: loaded, it would
        window its own rows and hold earlier records to its kind, which they need not fit."""
        if snap is not None:
            return snap.get("detector") is None
        segs = self.journal.segments() if self.journal is not None else []
        return bool(segs) and segs[0] == 1  # the whole journal, from the first record

    # --- front-end side (any thread): see Ingest ----------------------------------------------
    def submit(self, kind: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """Take one HTTP payload (:meth:`.ingest.Ingest.submit`)."""
        return self.ingest.submit(kind, body)

    def reject(self, reason: str, count: int = 1) -> None:
        """Count a request rejected before parsing (:meth:`.ingest.Ingest.reject`)."""
        self.ingest.reject(reason, count)

    def health(self) -> tuple[bool, str]:
        return self.ingest.health()

    def enqueue_file(self, path: str, dev: int, ino: int, offset: int,
                     lines: list[bytes] | bytes, now: float,
                     rejected: dict[str, int] | None = None) -> bool:
        return self.ingest.enqueue_file(path, dev, ino, offset, lines, now, rejected)

    def tick(self, now: float | None = None) -> None:
        self.ingest.tick(now)

    @property
    def fast_ingest(self) -> bool:
        """Whether chunks and NDJSON bodies take the columnar decoder when it can."""
        return self.ingest.fast_ingest

    @fast_ingest.setter
    def fast_ingest(self, value: bool) -> None:
        self.ingest.fast_ingest = value

    # --- worker ---------------------------------------------------------------------------------
    def start(self) -> None:
        for t in self.tailers:
            t.start()
        self._worker = threading.Thread(target=self._run, name="lrwatch-daemon", daemon=True)
        self._worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Drain the queue, snapshot, stop the tailers and actions."""
        for t in self.tailers:
            t.stop()
        deadline = time.monotonic() + timeout
        while len(self.queue) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        with self.queue.cond:
            self.queue.cond.notify_all()
        if self._worker is not None:
            self._worker.join(timeout)
        if self._calibrating:
            self._cal_done.wait(max(timeout, 60.0))
            if self._cal_result is not None:
                self._finish_calibration()
        for closing in (self.alerts, self.hook):   # their last counts go in the snapshot
            if closing is not None:
                closing.close()
        self._snapshot()
        if self.journal is not None:
            self.journal.close()

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every queued entry has been applied (for tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.queue.cond:
                if not len(self.queue) and self.queue.records == 0 and not self._busy \
                        and not self._calibrating and not self.ingest.has_refused():
                    return True
            time.sleep(0.005)
        return False

    def _run(self) -> None:
        next_tick = time.monotonic() + 1.0
        while not self._stop.is_set():
            if self._cal_result is not None:
                self._finish_calibration()
            if self.ingest.has_refused():
                self._count_refused()
            entry = self.queue.get(0.2)
            if entry is not None:
                self._busy = True
                try:
                    self._apply(entry)
                except Exception:  # fail open: count, log, go on
                    self.metrics.internal_errors.inc()
                    _log.exception("applying an entry failed")
                finally:
                    self._busy = False
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + 1.0
                try:
                    self._on_tick(time.time())
                    j = self.journal
                    if j is not None and j.error is not None:
                        with self.queue.cond:
                            j.probe()
                except Exception:  # fail open
                    self.metrics.internal_errors.inc()
                    _log.exception("the clock tick failed")
            if self._dirty and now - self._last_snapshot >= self.config.snapshot_interval:
                self._snapshot()

    def _count_refused(self) -> None:
        self._count_rejections(self.ingest.take_refused())
        self._dirty = True

    def _apply(self, entry: tuple[Any, ...]) -> None:
        code = entry[0]
        if code == b"P" or code == b"L":
            _, t, ok, rej, pos = entry
            try:
                self._count_rejections(rej)
                if code == b"P":
                    self._add_predictions(ok, t)
                else:
                    self._add_labels(ok, t)
            finally:  # even when applying failed: a leaked count would mean 429 forever
                self.queue.done(len(ok))
            if pos is not None:
                self.journal_pos = list(pos)
        elif code == b"R":
            self._count_rejections(entry[2])
            if entry[3] is not None:
                self.journal_pos = list(entry[3])
        elif code == b"C":
            _, t, path, dev, ino, offset, body, n = entry
            try:
                ok, lok, rej = self.ingest.decode_chunk(body, n)
                self._count_rejections(rej)
                self._add_predictions(ok, t)
                self._add_labels(lok, t)
                self.files[path] = [dev, ino, offset]
            finally:
                self.queue.done(n)
        elif code == b"F":
            _, t, path, dev, ino, offset, ok, lok, rej = entry
            try:
                self._count_rejections(rej)
                self._add_predictions(ok, t)
                self._add_labels(lok, t)
                self.files[path] = [dev, ino, offset]
            finally:
                self.queue.done(len(ok) + len(lok))
        elif code == b"T":
            self._on_tick(entry[1])
        self._dirty = True
        self.metrics.queue.set(self.queue.records)

    def _on_tick(self, now: float) -> None:
        ws = self.config.window_seconds
        w = self.window
        if ws is not None and w.time_due(now, ws):
            self._close_window(now)
        for ev in self.engine.tick(now):
            self._act(ev)
        self._update_fill(now)
        # labels come between windows: the horizon coverage follows them
        self.metrics.model.set_coverage(self.coverage.ratio())
        self._estimation_sweep(self.coverage.now)
        self._expire_early(now)
