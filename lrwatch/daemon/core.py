"""The daemon's worker: entries in, windows, drift decisions, rules and actions out.

Front ends (:mod:`.server` for HTTP, :mod:`.sources` for tailed files) only parse and validate;
they hand *entries* to :meth:`Daemon.submit` / :meth:`Daemon.enqueue`, which journal HTTP
payloads (see :mod:`.state`) and put them on a bounded queue. One worker thread applies entries
in order, so all counting happens in one place and the state it snapshots is consistent.

Entry kinds: ``P`` predictions payload, ``L`` labels payload, ``R`` request-level rejections,
``F`` parsed lines of a tailed file (with the file offset they end at), ``C`` a raw chunk of a
tailed file (parsed by the worker, see below), ``T`` a clock tick.

A tailed file's chunks are parsed on the worker, right before they are windowed: with the
``fast`` extra or the compiled ``_jsonl`` extension, :class:`~.columnar.ChunkDecoder` turns a
chunk laid out like the reference straight into columns (no dict per record), and any chunk it does not take goes through the
general parse and validation, so both give the same counts and windows.

The per-record path is columnar: a validated payload arrives as a :class:`~.records.Batch`,
windows take slices of it, pending labels are added per batch, and a closed window is turned
into one float matrix (:func:`~.windows.columns`) for the vectorised tests.

When the reference is the first N live records, its thresholds are calibrated on a background
thread (seconds of CPU). Ingest goes on meanwhile: records are counted and windowed, closed
windows wait as columns (at most :data:`MAX_WAITING_WINDOWS`; then the worker waits for the
calibration, so the queue fills and answers 429), and they are tested in order once the
thresholds are ready. No snapshot is written while a calibration runs, so a crash replays the
journal from before the reference was complete and calibrates again.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import Counter, deque
from typing import Any, Mapping

import numpy as np

from ..errors import ConfigError
from ..samples import Sample
from . import columnar
from .config import DaemonConfig
from .detector import DriftDetector, DriftResult
from .labels import PendingLabels, is_classification, score
from .metrics import DaemonMetrics
from .records import (DATA_REASONS, REASONS, Batch, Limits, loads, longest_line, parse_lines,
                      parse_payload, validate_labels, validate_predictions)
from .reference import PREDICTION, Reference, build_reference
from .state import Journal, load_snapshot, save_snapshot
from .stats import Profile
from .windows import Window

__all__ = ["Daemon"]

_log = logging.getLogger("lrwatch.daemon")
STATE_VERSION = 1
#: Closed windows kept (as columns) while a live reference is calibrated in the background.
MAX_WAITING_WINDOWS = 128


class _Queue:
    """A FIFO bounded by the number of records it holds (entries of any size)."""

    def __init__(self, max_records: int) -> None:
        self.max_records = max_records
        self.records = 0
        self._items: deque[tuple[Any, ...]] = deque()
        self.cond = threading.Condition()

    def put(self, entry: tuple[Any, ...], n: int) -> None:  # caller holds cond
        self._items.append(entry)
        self.records += n
        self.cond.notify_all()

    def get(self, timeout: float) -> tuple[Any, ...] | None:
        with self.cond:
            if not self._items:
                self.cond.wait(timeout)
            if not self._items:
                return None
            return self._items.popleft()

    def done(self, n: int) -> None:
        with self.cond:
            self.records -= n
            # only producers that block (file tailers) wait for room: wake them once the
            # queue is half empty, not after every entry (a thread switch per chunk)
            if self.records <= self.max_records // 2:
                self.cond.notify_all()

    def __len__(self) -> int:
        return len(self._items)


class Daemon:
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
        self.config = config
        self._executor = executor
        self.metrics = DaemonMetrics(registry)
        self.registry = self.metrics.registry
        self.queue = _Queue(config.max_queue_records)
        self.limits = Limits(config.max_line_bytes, config.max_string_chars,
                             config.max_features)
        # request-level rejections (401, 411, 413, 429, 503): counted by the worker, never
        # journaled (a flood of them must not fill the disk or the queue)
        self._refused: dict[str, int] = {}
        self.pending = PendingLabels(config.max_pending_labels)
        self.counters: dict[str, Any] = {"predictions": 0, "labels": 0, "received": 0,
                                         "labels_joined": 0, "labels_unmatched": 0,
                                         "labels_expired": 0, "windows": 0,
                                         "errors": {r: 0 for r in REASONS}}
        self.files: dict[str, list[int]] = {}  # path -> [dev, ino, offset] applied
        self.journal_pos = [1, 0]
        self.reference: Reference | None = None
        self.detector: DriftDetector | None = None
        self._ref_rows: list[dict[str, Any]] = []
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
        self._dirty = False
        self._last_snapshot = time.monotonic()
        self.tailers: list[Any] = []
        #: decode tailed chunks straight into columns when possible (``msgspec``; tests turn
        #: it off to compare with the general path)
        self.fast_ingest = columnar.ENABLED
        self._decoder: Any = None
        self._http_decoder: Any = None  # the front end's own (another thread than the worker)
        from ..rules import Engine, load_pack, load_rules

        rules = load_rules(config.rules) if config.rules else load_pack("serving")
        self.engine = Engine(rules)
        self._setup_actions()
        self.journal: Journal | None = None
        if config.state_dir:
            os.makedirs(config.state_dir, exist_ok=True)
            self.journal = Journal(config.state_dir)
        self._load_reference()
        self._restore()

    # --- set-up --------------------------------------------------------------------------------
    def _setup_actions(self) -> None:
        from ..actions import AlertmanagerSink, AlertSender, HookAction, LogSink, WebhookSink

        cfg = self.config
        sinks: list[Any] = [AlertmanagerSink(u, name=f"alertmanager{i or ''}")
                            for i, u in enumerate(cfg.alertmanager)]
        sinks += [WebhookSink(u, name=f"webhook{i or ''}") for i, u in enumerate(cfg.webhook)]
        if cfg.log_alerts:
            sinks.append(LogSink(_log))
        self.alerts = AlertSender(sinks, registry=self.registry,
                                  resend_interval=cfg.resend_interval,
                                  on_error=self.metrics.internal_errors.inc) if sinks else None
        self.hook = HookAction(cfg.hook_argv, cooldown=cfg.hook_cooldown,
                               timeout=cfg.hook_timeout, registry=self.registry,
                               on_error=self.metrics.internal_errors.inc) \
            if cfg.hook_argv else None

    def _ref_path(self) -> str | None:
        if self.config.reference:
            return self.config.reference
        if self.config.state_dir:
            return os.path.join(self.config.state_dir, "reference.json")
        return None

    def _load_reference(self) -> None:
        path = self._ref_path()
        if path and os.path.exists(path):
            self._set_reference(Reference.load(path), save=False)
        elif self.config.reference:
            raise ConfigError(f"reference {self.config.reference!r} does not exist; build one "
                              f"with `lrwatch baseline build DATA -o {self.config.reference}`")

    def _make_detector(self, ref: Reference) -> DriftDetector:
        cfg = self.config
        return DriftDetector(ref, window_size=cfg.window_size if cfg.window_seconds is None
                             else (ref.calibration or {}).get("window_size", cfg.window_size),
                             target_windows=cfg.target_windows, min_effect=cfg.min_effect,
                             min_effect_categorical=cfg.min_effect_categorical,
                             min_missing_delta=cfg.min_missing_delta,
                             sequential=cfg.sequential, seq_min_effect=cfg.seq_min_effect,
                             seed=cfg.seed, sims=cfg.calibration_sims)

    def _set_reference(self, ref: Reference, save: bool,
                       detector: DriftDetector | None = None) -> None:
        cfg = self.config
        det = detector if detector is not None else self._make_detector(ref)
        if save:
            ref.calibration = det.calibration.to_dict()
            path = self._ref_path()
            if path:
                ref.save(path)
        self.reference = ref
        self.detector = det
        self._profile = det.profile
        self.metrics.bind_features(det.profile.num_names, det.profile.cat_names)
        thr = det.raw_thresholds(cfg.window_size)
        for i, name in enumerate(det.profile.num_names):
            ch = self.metrics.features[name]
            ch["thr_ks"].set(thr["ks"][i])
            ch["thr_chi2"].set(thr["chi2"][i])
            ch["thr_mean_z"].set(thr["mean"][i])
            ch["thr_score"].set(det.threshold)
            ch["thr_sequential_z"].set(det.seq_threshold)
        for name in det.profile.cat_names:
            self.metrics.features[name]["thr_score"].set(det.threshold)

    # --- durability ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "counters": self.counters, "files": self.files,
                "journal": self.journal_pos, "window": self.window.state_dict(),
                "pending": self.pending.state_dict(), "ref_rows": self._ref_rows,
                "detector": self.detector.state_dict() if self.detector else None,
                "engine": self.engine.state_dict(), "last": self.last}

    def _restore(self) -> None:
        if not self.config.state_dir:
            return
        snap = load_snapshot(self.config.state_dir)
        if snap is not None:
            if snap.get("version") != STATE_VERSION:
                raise ConfigError(f"state version {snap.get('version')!r} is not "
                                  f"{STATE_VERSION}; move {self.config.state_dir} away")
            self.counters = snap["counters"]
            for r in REASONS:
                self.counters["errors"].setdefault(r, 0)
            self.files = {k: list(v) for k, v in snap["files"].items()}
            self.journal_pos = list(snap["journal"])
            self.window = Window.from_state(snap["window"])
            self.pending.load_state_dict(snap["pending"])
            self._ref_rows = snap.get("ref_rows") or []
            if snap.get("detector") and self.detector:
                self.detector.load_state_dict(snap["detector"])
            try:
                self.engine.load_state_dict(snap["engine"])
            except ConfigError as exc:  # the rules changed: start them fresh
                _log.warning("rule state not restored: %s", exc)
            self.last = snap.get("last") or {}
        self.metrics.restore(self.counters)
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

    # --- front-end side (any thread) -----------------------------------------------------------
    def submit(self, kind: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """Take one HTTP payload (``kind`` ``"predictions"`` or ``"labels"``).

        Returns the HTTP status and JSON body: 200 with the counts when anything was accepted,
        400 naming the problems when nothing was, 429 when the queue is full, 503 when the
        journal cannot be written (nothing of the payload is counted as accepted then).
        """
        lim = self.limits
        short = longest_line(body) <= lim.max_string_chars
        ok: Any = self._decode_http(body) if kind == "predictions" and short else None
        if ok is not None:  # the columnar path: no dict per record (see _decode_http)
            rejected: Any = Counter()
            errors: list[str] = []
            received = len(ok)
        else:
            items = parse_payload(body, limits=lim)
            received = len(items)
            if kind == "predictions":
                ok, rejected, errors = validate_predictions(items, lim, short_strings=short)
            else:
                ok, rejected, errors = validate_labels(items, lim)
        code = b"P" if kind == "predictions" else b"L"
        now = time.time()
        q = self.queue
        with q.cond:
            if ok and q.records + len(ok) > q.max_records:
                self._refuse_locked("queue_full", received)
                return 429, {"error": "queue full, retry later", "reason": "queue_full",
                             "rejected": received}
            pos = None
            if self.journal is not None:
                try:
                    pos = self.journal.append(code, now, body)
                except OSError as exc:
                    self._refuse_locked("storage", received)
                    self.metrics.internal_errors.inc()
                    _log.error("journal write failed, answering 503: %s", exc)
                    return 503, {"error": f"the journal cannot be written ({exc.strerror or exc});"
                                          f" retry later", "reason": "storage",
                                 "rejected": received}
            q.put((code, now, ok, rejected, pos), len(ok))
        body_out: dict[str, Any] = {"accepted": len(ok), "rejected": sum(rejected.values())}
        if rejected:
            body_out["reasons"] = dict(rejected)
            body_out["errors"] = errors
        if not ok and rejected:
            body_out["error"] = errors[0] if errors else "no valid record"
            return 400, body_out
        return 200, body_out

    def _decode_http(self, body: bytes) -> Any:
        """An NDJSON body of plain prediction records laid out like the reference, straight to
        columns with the chunk decoder (the tailed files' fast path, :mod:`.columnar`), or
        ``None``: then the general path parses it. Both give the same records, counts and
        windows (``tests/daemon/test_columnar.py``); the journal replays through the general
        path. The caller checked that no line is longer than the string limit (the decoder
        bounds neither)."""
        prof = self._profile
        if not self.fast_ingest or prof is None or body[:1] != b"{":
            return None
        dec = self._http_decoder
        if dec is None or dec.profile is not prof:
            try:
                dec = self._http_decoder = columnar.ChunkDecoder(prof)
            except RuntimeError:  # neither msgspec nor the compiled decoder
                self.fast_ingest = False
                return None
        lines = body.rstrip(b"\r\n")
        chunk = lines.replace(b"\n", b",\n")
        return dec.decode(chunk, len(chunk) - len(lines) + 1)

    def reject(self, reason: str, count: int = 1) -> None:
        """Count a request rejected before parsing (unauthorized, too large). Not journaled:
        the worker counts it, and a crash before the next snapshot forgets it (it was never a
        record anyone acknowledged)."""
        with self.queue.cond:
            self._refuse_locked(reason, count)

    def _refuse_locked(self, reason: str, count: int) -> None:
        self._refused[reason] = self._refused.get(reason, 0) + count

    def health(self) -> tuple[bool, str]:
        """``(ok, text)`` for ``/healthz``: not ok while the journal cannot be written."""
        j = self.journal
        if j is not None and j.error is not None:
            return False, f"journal not writable: {j.error.strerror or j.error}"
        return True, "ok"

    def enqueue_file(self, path: str, dev: int, ino: int, offset: int,
                     lines: list[bytes] | bytes, now: float,
                     rejected: Mapping[str, int] | None = None) -> bool:
        """Queue lines of a tailed file; blocks while the queue is full (backpressure).

        ``lines`` is a list of non-blank lines, parsed here, or the raw chunk (whole lines
        without the last newline), which the worker parses. Returns False when the daemon is
        stopping."""
        if isinstance(lines, bytes):
            # ",\n" between the lines: the body of a JSON array for the chunk decoder, and
            # the length difference counts the lines in the same C pass (bytes.count is slower)
            body = lines.replace(b"\n", b",\n")
            n = len(body) - len(lines) + 1  # lines, blank or not: what the queue holds
            entry: tuple[Any, ...] = (b"C", now, path, dev, ino, offset, body, n)
        else:
            ok, lok, rej = self._validate_lines(lines)
            if rejected:  # lines the tailer skipped (over the line limit)
                rej = Counter(rej) + Counter(rejected)
            n = len(ok) + len(lok)
            entry = (b"F", now, path, dev, ino, offset, ok, lok, rej)
        q = self.queue
        with q.cond:
            while q.records + n > q.max_records and q.records > 0 and not self._stop.is_set():
                q.cond.wait(0.5)
            if self._stop.is_set():
                return False
            q.put(entry, n)
        return True

    def _validate_lines(self, lines: list[bytes]) -> tuple[Batch, list[dict[str, Any]], Any]:
        """The general path for lines of a file: predictions, label records, rejections."""
        lim = self.limits
        items = parse_lines(lines, limits=lim) if lines else []
        ok, rej, _ = validate_predictions(items, lim)
        lok: list[dict[str, Any]] = []
        if rej:  # the batch check failed: a mixed file? split off the label records
            preds, labels = [], []
            for it in items:
                (labels if type(it) is dict and "features" not in it and "label" in it
                 else preds).append(it)
            if labels:
                ok, rej, _ = validate_predictions(preds, lim)
                lok, lrej, _ = validate_labels(labels, lim)
                rej.update(lrej)
        return ok, lok, rej

    def _decode_chunk(self, body: bytes, n: int) -> tuple[Batch, list[dict[str, Any]], Any]:
        """``n`` lines of a file, joined by ``,\\n``: straight to columns when the chunk
        decoder takes them (see :mod:`.columnar`), else the general path."""
        prof = self._profile
        # the chunk decoders bound neither lines nor strings: a chunk with a long line goes
        # to the general path, which checks both
        if self.fast_ingest and prof is not None and body and \
                longest_line(body) <= self.limits.max_string_chars:
            dec = self._decoder
            if dec is None or dec.profile is not prof:
                dec = self._decoder = columnar.ChunkDecoder(prof)
            b = dec.decode(body, n)
            if b is not None:
                return b, [], None
        # every newline got one comma in front, so this gives the lines back exactly
        chunk = body.replace(b",\n", b"\n")
        return self._validate_lines([ln for ln in chunk.split(b"\n") if ln.strip()])

    def tick(self, now: float | None = None) -> None:
        with self.queue.cond:
            self.queue.put((b"T", time.time() if now is None else now), 0)

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
        self._snapshot()
        if self.journal is not None:
            self.journal.close()
        if self.alerts is not None:
            self.alerts.close()
        if self.hook is not None:
            self.hook.close()

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every queued entry has been applied (for tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.queue.cond:
                if not len(self.queue) and self.queue.records == 0 and not self._busy \
                        and not self._calibrating and not self._refused:
                    return True
            time.sleep(0.005)
        return False

    _busy = False

    def _run(self) -> None:
        next_tick = time.monotonic() + 1.0
        while not self._stop.is_set():
            if self._cal_result is not None:
                self._finish_calibration()
            if self._refused:
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
        with self.queue.cond:
            refused, self._refused = self._refused, {}
        self._count_rejections(refused)
        self._dirty = True

    def _apply(self, entry: tuple[Any, ...]) -> None:
        code = entry[0]
        if code == b"P" or code == b"L":
            _, t, ok, rej, pos = entry
            self._count_rejections(rej)
            if code == b"P":
                self._add_predictions(ok, t)
            else:
                self._add_labels(ok, t)
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
                ok, lok, rej = self._decode_chunk(body, n)
                self._count_rejections(rej)
                self._add_predictions(ok, t)
                self._add_labels(lok, t)
                self.files[path] = [dev, ino, offset]
            finally:
                self.queue.done(n)
        elif code == b"F":
            _, t, path, dev, ino, offset, ok, lok, rej = entry
            self._count_rejections(rej)
            self._add_predictions(ok, t)
            self._add_labels(lok, t)
            self.files[path] = [dev, ino, offset]
            self.queue.done(len(ok) + len(lok))
        elif code == b"T":
            self._on_tick(entry[1])
        self._dirty = True
        self.metrics.queue.set(self.queue.records)

    def _apply_journal(self, kind: bytes, t: float, payload: bytes) -> None:
        """Re-apply one journal entry during replay (same parse, same validation)."""
        if kind == b"R":
            self._count_rejections(loads(payload))
            return
        lim = self.limits
        items = parse_payload(payload, limits=lim)
        ok, rej, _ = (validate_predictions(
            items, lim, short_strings=longest_line(payload) <= lim.max_string_chars)
            if kind == b"P" else validate_labels(items, lim))
        self._count_rejections(rej)
        if kind == b"P":
            self._add_predictions(ok, t)
        else:
            self._add_labels(ok, t)

    # --- counting ---------------------------------------------------------------------------------
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
        if self.reference is None:
            self._collect_reference(b, t_arrival)
            return
        self._windowize(b, t_arrival)

    def _windowize(self, b: Batch, t_arrival: float) -> None:
        """Put counted records into windows, a slice at a time (closing them as they fill)."""
        n = len(b)
        ws = self.config.window_seconds
        size = self.config.window_size
        times = b.times
        if times is not None and None in times:
            times = [t_arrival if t is None else t for t in times]
        tarr = None
        if ws is not None:
            tarr = (np.asarray(times, dtype=np.float64) if times is not None
                    else np.full(n, t_arrival))
        pos = 0
        while pos < n:
            w = self.window
            if tarr is None:
                stop = min(n, pos + max(size - len(w), 1))
            else:
                t0 = float(tarr[pos])
                if w.start is None:
                    w.start = math.floor(t0 / ws) * ws
                    w.end = w.start + ws
                elif t0 >= w.end and len(w):
                    self._close_window(t0)
                    w = self.window
                    w.start = math.floor(t0 / ws) * ws
                    w.end = w.start + ws
                later = np.flatnonzero(tarr[pos + 1:] >= w.end)
                stop = pos + 1 + int(later[0]) if later.size else n
            self._append(w, b, pos, stop, times, t_arrival)
            pos = stop
            if tarr is None and len(w) >= size:
                self._close_window(w.last_time if w.last_time is not None else t_arrival)
        self._update_fill(t_arrival)

    def _append(self, w: Window, b: Batch, lo: int, hi: int, times: list[Any] | None,
                t_arrival: float) -> None:
        """Records ``lo:hi`` of ``b`` join window ``w``: inline labels are joined, records
        with an id wait for theirs."""
        w.extend_batch(self._profile, b, lo, hi)
        if w.first_time is None:
            w.first_time = times[lo] if times is not None else t_arrival
        w.last_time = times[hi - 1] if times is not None else t_arrival
        ids, labels, preds = b.ids, b.labels, b.preds
        if labels is not None:
            ptype = self.reference.prediction_type  # type: ignore[union-attr]
            waiting = []
            for i in range(lo, hi):
                if labels[i] is not None:
                    t = times[i] if times is not None else t_arrival
                    self._join(preds[i], labels[i], t, t, ptype)
                elif ids is not None and ids[i] is not None:
                    waiting.append(i)
            if waiting:
                self._expired(self.pending.add_many(
                    [ids[i] for i in waiting], [preds[i] for i in waiting],  # type: ignore
                    [times[i] for i in waiting] if times is not None
                    else [t_arrival] * len(waiting)))
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
                self._expired(self.pending.add_many(sl, ps, ts))

    def _expired(self, k: int) -> None:
        if k:
            self.counters["labels_expired"] += k
            self.metrics.labels_expired.inc(k)

    def _collect_reference(self, b: Batch, t_arrival: float) -> None:
        need = self.config.live_records - len(self._ref_rows)
        self._ref_rows.extend({"features": f, "prediction": p}
                              for f, p in zip(b.feats[:need], b.preds[:need]))
        if len(self._ref_rows) >= self.config.live_records:
            _log.info("building the reference from the first %d records", len(self._ref_rows))
            ref = build_reference(self._ref_rows, calibrate=False)
            self._start_calibration(ref)
            if len(b) > need:
                self._windowize(b.slice(need, len(b)), t_arrival)

    # --- calibration of a live reference, off the ingest path ---------------------------------
    def _start_calibration(self, ref: Reference) -> None:
        rows, self._ref_rows = self._ref_rows, []
        if self._replaying or self._worker is None:
            try:
                self._set_reference(ref, save=True)
            except Exception:
                self._ref_rows = rows
                raise
            return
        self.reference = ref
        self._profile = Profile(ref)
        self._calibrating = True
        self._cal_rows = rows

        self._cal_done.clear()

        def work() -> None:
            try:
                result: Any = self._make_detector(ref)
            except Exception as exc:  # handed to the worker, which fails open
                result = exc
            self._cal_result = result
            self._cal_done.set()
            with self.queue.cond:
                self.queue.cond.notify_all()

        _log.info("calibrating the live reference in the background")
        if self._executor is not None:
            self._executor.submit(work)
        else:
            threading.Thread(target=work, name="lrwatch-calibrate", daemon=True).start()

    def _finish_calibration(self) -> None:
        result, self._cal_result = self._cal_result, None
        ref = self.reference
        waiting, self._waiting = self._waiting, []
        try:
            if isinstance(result, BaseException) or ref is None:
                self.metrics.internal_errors.inc()
                _log.error("calibrating the live reference failed: %s", result)
                self.reference = None
                self._profile = None
                self._ref_rows = self._cal_rows  # retried with the next records
                return
            self._set_reference(ref, save=True, detector=result)
            self._cal_rows = []
            _log.info("live reference calibrated; testing %d waiting windows", len(waiting))
            for w, n, x, cats in waiting:
                self._evaluate(w, n, x, cats, 0.0)
        finally:
            self._calibrating = False  # only now: drain() waits for the waiting windows

    def _add_labels(self, recs: list[dict[str, Any]], t_arrival: float) -> None:
        if not recs:
            return
        n = len(recs)
        self.counters["labels"] += n
        self.counters["received"] += n
        self.metrics.labels.inc(n)
        self.metrics.received.inc(n)
        ptype = self.reference.prediction_type if self.reference else "class"
        for r in recs:
            hit = self.pending.join(r["id"])
            if hit is None:
                self.counters["labels_unmatched"] += 1
                self.metrics.labels_unmatched.inc()
                continue
            pred, tp = hit
            self._join(pred, r["label"], tp, r.get("time", t_arrival), ptype)

    def _join(self, pred: Any, label: Any, t_pred: float, t_label: float, ptype: str) -> None:
        s = score(pred, label, ptype)
        self.counters["labels_joined"] += 1
        self.metrics.labels_joined.inc()
        delay = max(0.0, t_label - t_pred)
        self.metrics.label_delay.observe(delay)
        if s is None:
            return
        w = self.window
        w.joined += 1
        w.score_sum += s
        w.delay_sum += delay

    def _update_fill(self, now: float) -> None:
        w = self.window
        if self.config.window_seconds is not None:
            fill = 0.0 if w.start is None else min(1.0, max(0.0, (now - w.start)
                                                          / self.config.window_seconds))
        else:
            fill = len(w) / self.config.window_size
        self.metrics.fill.set(fill)

    def _on_tick(self, now: float) -> None:
        ws = self.config.window_seconds
        w = self.window
        if ws is not None and w.end is not None and len(w) and now >= w.end + 0.1 * ws:
            self._close_window(now)
        for ev in self.engine.tick(now):
            self._act(ev)
        self._update_fill(now)

    def _new_window(self, index: int) -> Window:
        return Window(index)

    # --- window evaluation -----------------------------------------------------------------------
    def _close_window(self, now: float) -> None:
        w = self.window
        self.window = self._new_window(w.index + 1)
        prof = self._profile
        if self.reference is None or prof is None or not len(w):
            return
        t0 = time.perf_counter()
        n = len(w)
        x, cats = w.matrix(prof)
        w.feats, w.preds, w.cols = [], [], []  # done with the dicts; the columns hold the data
        if self.detector is None:  # calibrating: tested once the thresholds are ready
            self._waiting.append((w, n, x, cats))
            if len(self._waiting) >= MAX_WAITING_WINDOWS:
                self._cal_done.wait()  # bounded memory: ingest waits (the queue answers 429)
                self._finish_calibration()
            return
        self._evaluate(w, n, x, cats, time.perf_counter() - t0)

    def _evaluate(self, w: Window, n: int, x: np.ndarray, cats: list[np.ndarray],
                  seconds: float) -> None:
        det = self.detector
        assert det is not None
        t0 = time.perf_counter()
        res = det.update(x, cats)
        self.metrics.stat_seconds.observe(seconds + time.perf_counter() - t0)
        self.counters["windows"] += 1
        self.metrics.windows.inc()
        values = self._window_values(w, n, res)
        self._export(n, res, values)
        t = w.last_time if w.last_time is not None else time.time()
        sample = Sample(step=w.index, time=t, values=values)
        for ev in self.engine.update(sample):
            self._act(ev)
        self.last = {"window": w.index, "time": t, "records": n, "values": values,
                     "drifted_features": res.drifted_features,
                     "features": self._feature_status(res)}

    def _window_values(self, w: Window, n: int, res: DriftResult) -> dict[str, float]:
        tests = res.tests
        vals: dict[str, float] = {
            "drift_detected": 1.0 if res.detected else 0.0,
            "drift_score": res.score,
            "drift_features": float(sum(1 for f in res.drifted_features if f != PREDICTION)),
            "window_records": float(n),
            "ingest_error_ratio": w.rejected / max(w.rejected + n, 1),
            "label_coverage": min(1.0, w.joined / max(n, 1)),
        }
        if self.reference is not None and self.reference.prediction_type != "none":
            vals["prediction_drift"] = 1.0 if res.prediction_drift else 0.0
        miss = np.concatenate([tests.missing_ratio, tests.c_missing_ratio])
        vals["missing_ratio"] = float(miss.max(initial=0.0))
        if tests.out_of_range is not None and len(tests.out_of_range):
            vals["out_of_range_ratio"] = float(tests.out_of_range.max())
        if len(tests.c_unseen_ratio):
            vals["unseen_category_ratio"] = float(tests.c_unseen_ratio.max())
        if w.joined:
            ptype = self.reference.prediction_type if self.reference else "class"
            if is_classification(ptype):
                vals["model_accuracy"] = w.score_sum / w.joined
            else:
                vals["model_error"] = w.score_sum / w.joined
            vals["label_delay_seconds"] = w.delay_sum / w.joined
        return vals

    def _export(self, n: int, res: DriftResult, values: Mapping[str, float]) -> None:
        m = self.metrics
        tests = res.tests
        prof = self.detector.profile  # type: ignore[union-attr]
        fn = len(prof.num)
        drifted = res.drifted.astype(np.float64)
        num = {"stat_ks": tests.ks, "stat_chi2": tests.chi2, "stat_mean_z": tests.z_mean,
               "stat_psi": tests.psi, "stat_wasserstein": tests.wasserstein,
               "stat_jensen_shannon": tests.js, "stat_score": res.feature_score[:fn],
               "stat_sequential_z": res.seq_z[:fn], "p_ks": tests.p_ks,
               "p_chi2": tests.p_chi2, "p_mean": tests.p_mean, "p_missing": tests.p_missing,
               "detected": drifted[:fn], "missing": tests.missing_ratio}
        if tests.out_of_range is not None:
            num["oor"] = tests.out_of_range
        cat = {"stat_chi2": tests.c_chi2, "stat_psi": tests.c_psi,
               "stat_jensen_shannon": tests.c_js, "stat_score": res.feature_score[fn:],
               "p_chi2": tests.c_p_chi2, "p_missing": tests.c_p_missing,
               "detected": drifted[fn:], "missing": tests.c_missing_ratio,
               "unseen": tests.c_unseen_ratio}
        m.publish(num, cat)
        m.score.set(values["drift_score"])
        m.drift_any.set(values["drift_detected"])
        m.window_records.set(n)
        m.label_coverage.set(values["label_coverage"])
        if "model_accuracy" in values:
            m.accuracy.set(values["model_accuracy"])
        if "model_error" in values:
            m.error.set(values["model_error"])
        m.pending.set(len(self.pending))

    def _feature_status(self, res: DriftResult) -> dict[str, Any]:
        out = {}
        for i, name in enumerate(res.names):
            out[name] = {"drifted": bool(res.drifted[i]),
                         "score": round(float(res.feature_score[i]), 4),
                         "sequential_z": round(float(res.seq_z[i]), 4)}
        return out

    # --- actions ---------------------------------------------------------------------------------
    def _act(self, ev: Any) -> None:
        m = self.metrics
        firing = ev.kind == "firing"
        m.engine.set_rule_state(ev.rule, ev.severity, firing)
        _log.warning("%s %s: %s", ev.kind, ev.rule, ev.message)
        try:
            if "alert" in ev.actions and self.alerts is not None:
                from ..actions import Alert

                alert = Alert.from_firing(ev)
                if firing:
                    self.alerts.fire(alert)
                else:
                    self.alerts.resolve(alert, at=ev.time)
            if self.hook is not None and firing and (
                    ("hook" in ev.actions) if self.config.hook_rules is None
                    else ev.rule in self.config.hook_rules):
                self.hook.run(ev)
        except Exception:  # fail open
            m.internal_errors.inc()
            _log.exception("action for %s failed", ev.rule)

    # --- status ----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        det = self.detector
        return {
            "reference": None if self.reference is None else {
                "records": self.reference.records, "features": self.reference.names,
                "prediction_type": self.reference.prediction_type},
            "collecting_reference": None if self.reference is not None else {
                "have": len(self._ref_rows), "need": self.config.live_records},
            "calibrating": self._calibrating,
            "counters": self.counters,
            "window": {"index": self.window.index, "records": len(self.window)},
            "thresholds": None if det is None else {"score": det.threshold,
                                                    "sequential_z": det.seq_threshold},
            "pending_labels": len(self.pending),
            "queue_records": self.queue.records,
            "last_window": self.last,
            "firing": sorted(self.engine.active),
        }
