"""The front end of the daemon's worker: HTTP payloads and tailed chunks in, entries out.

:class:`Ingest` runs on the front ends' threads (the HTTP server's loop, the file tailers). It
parses and validates a payload (on the columnar path when the chunk decoder takes it), appends
it to the journal before the client gets its answer (:mod:`.state`), and puts it on the
:class:`BoundedQueue` that the worker (:mod:`.core`) applies in order. A full queue answers 429
and a journal that cannot be written 503; request-level rejections (401, 413, 415, 429, 503)
are only counted, never journaled, and the worker picks the counts up
(:meth:`Ingest.take_refused`).

Entry kinds: ``P`` predictions payload, ``L`` labels payload, ``R`` request-level rejections
(old journals only), ``F`` parsed lines of a tailed file (with the file offset they end at),
``C`` a raw chunk of a tailed file (parsed by the worker), ``T`` a clock tick.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from typing import Any, Callable, Mapping

from . import columnar
from .config import DaemonConfig
from .metrics import DaemonMetrics
from .records import (Batch, Limits, TooManyRecords, fits_reference_kind, labels_are_classes,
                      lines_within, parse_lines, parse_payload, times_plausible,
                      validate_labels, validate_predictions)
from .state import Journal
from .stats import Profile

__all__ = ["BoundedQueue", "Ingest"]

_log = logging.getLogger("lrwatch.daemon")


class BoundedQueue:
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


class Ingest:
    """Validation, journal and queue: everything a payload meets before the worker.

    Parameters
    ----------
    config, metrics:
        The daemon's settings and metrics (the internal-error counter).
    journal:
        The write-ahead journal, or ``None`` without a state directory.
    profile:
        Returns the reference's :class:`~.stats.Profile` (or ``None`` before there is one):
        the layout the chunk decoder reads.
    stop:
        Set when the daemon stops (a tailer waiting for room gives up).
    """

    def __init__(self, config: DaemonConfig, metrics: DaemonMetrics, journal: Journal | None,
                 profile: Callable[[], Profile | None], stop: threading.Event) -> None:
        self.config = config
        self.metrics = metrics
        self.journal = journal
        self._profile_of = profile
        self._stop = stop
        self.queue = BoundedQueue(config.max_queue_records)
        self.limits = Limits(config.max_line_bytes, config.max_string_chars,
                             config.max_features)
        # request-level rejections (401, 413, 415, 429, 503): counted by the worker, never
        # journaled (a flood of them must not fill the disk or the queue)
        self._refused: dict[str, int] = {}
        #: decode chunks and NDJSON bodies straight into columns when possible (tests turn it
        #: off to compare with the general path)
        self.fast_ingest = columnar.ENABLED
        self._decoder: Any = None  # the worker's (tailed chunks)
        self._http_decoder: Any = None  # the front end's own (another thread than the worker)

    def submit(self, kind: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """Take one HTTP payload (``kind`` ``"predictions"`` or ``"labels"``).

        Returns the HTTP status and JSON body: 200 with the counts when anything was accepted,
        400 naming the problems when nothing was, 429 when the queue is full, 503 when the
        journal cannot be written (nothing of the payload is counted as accepted then).
        """
        q = self.queue
        if q.records >= q.max_records:
            # full already: answer before parsing, so that overload does not spend the CPU
            # the worker needs on bodies that are refused anyway (counted as one record, like
            # the other requests refused before they are parsed)
            with q.cond:
                self._refuse_locked("queue_full", 1)
            return 429, {"error": "queue full, retry later", "reason": "queue_full",
                         "rejected": 1}
        try:
            ok, rejected, errors, received = self._parse(kind, body)
        except TooManyRecords as exc:  # refused before any record is checked: see below
            ok, received = (), exc.count
        code = b"P" if kind == "predictions" else b"L"
        now = time.time()
        if len(ok) > q.max_records or not ok and received > q.max_records:
            # never fits, however long the client waits: not a 429. A body of more records
            # than the queue holds is refused before they are checked one by one: 5 million
            # lines of junk in a 10 MB body held the HTTP loop (every client, /healthz)
            # for five minutes
            with q.cond:
                self._refuse_locked("too_large", received)
            return 413, {"error": f"the body holds {max(len(ok), received)} records, over "
                                  f"the queue's limit of {q.max_records} (max_queue_records): "
                                  f"send them in smaller bodies", "reason": "too_large",
                         "rejected": received}
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

    def _parse(self, kind: str, body: bytes) -> tuple[Any, Any, list[str], int]:
        """The payload's accepted records, rejection counts, messages and record count."""
        lim = self.limits
        short = lines_within(body, lim.max_string_chars)
        ok: Any = self._decode_http(body) if kind == "predictions" and short else None
        if ok is not None:  # the columnar path: no dict per record (see _decode_http)
            return ok, Counter(), [], len(ok)
        items = parse_payload(body, limits=lim, max_items=self.queue.max_records)
        if kind == "predictions":
            ok, rejected, errors = validate_predictions(items, lim, short_strings=short)
        else:
            ok, rejected, errors = validate_labels(items, lim)
        return ok, rejected, errors, len(items)

    def _decode_http(self, body: bytes) -> Any:
        """An NDJSON body of plain prediction records laid out like the reference, straight to
        columns with the chunk decoder (the tailed files' fast path, :mod:`.columnar`), or
        ``None``: then the general path parses it. Both give the same records, counts and
        windows (``tests/daemon/test_columnar.py``); the journal replays through the general
        path. The caller checked that no line is longer than the string limit (the decoder
        bounds neither)."""
        prof = self._profile_of()
        if not self.fast_ingest or prof is None or body[:1] != b"{":
            return None
        try:
            return self._decode_http_chunk(body, prof)
        except Exception:  # noqa: BLE001 - a decoder bug must not cost the body: parse it again
            self.metrics.internal_errors.inc()
            _log.exception("the chunk decoder failed on an HTTP body; the general path parses "
                           "it (please report this)")
            return None

    def _decode_http_chunk(self, body: bytes, prof: Any) -> Any:
        dec = self._http_decoder
        if dec is None or dec.profile is not prof:
            try:
                dec = self._http_decoder = columnar.ChunkDecoder(prof)
            except RuntimeError:  # neither msgspec nor the compiled decoder
                self.fast_ingest = False
                return None
        lines = body.rstrip(b"\r\n")
        chunk = lines.replace(b"\n", b",\n")
        batch = dec.decode(chunk, len(chunk) - len(lines) + 1)
        if batch is not None and not self._decoded_fits(batch):
            return None   # the general path names the records it refuses
        return batch

    def _decoded_fits(self, batch: Any) -> bool:
        """Whether the general path would accept every record the chunk decoder took: the
        checks the decoder's static types cannot make (the reference's kind of prediction,
        a time within a day of this host's clock, labels that are the model's classes)."""
        return fits_reference_kind(batch.preds, self.limits) and (
            batch.times is None or times_plausible(batch.times)) and (
            batch.labels is None or labels_are_classes(batch.labels, self.limits))

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
            ok, lok, rej = self.validate_lines(lines)
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

    def validate_lines(self, lines: list[bytes]) -> tuple[Batch, list[dict[str, Any]], Any]:
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

    def decode_chunk(self, body: bytes, n: int) -> tuple[Batch, list[dict[str, Any]], Any]:
        """``n`` lines of a file, joined by ``,\\n``: straight to columns when the chunk
        decoder takes them (see :mod:`.columnar`), else the general path."""
        prof = self._profile_of()
        # the chunk decoders bound neither lines nor strings: a chunk with a long line goes
        # to the general path, which checks both
        if self.fast_ingest and prof is not None and body and \
                lines_within(body, self.limits.max_string_chars):
            dec = self._decoder
            if dec is None or dec.profile is not prof:
                dec = self._decoder = columnar.ChunkDecoder(prof)
            b = dec.decode(body, n)
            if b is not None and self._decoded_fits(b):
                return b, [], None
        # every newline got one comma in front, so this gives the lines back exactly
        chunk = body.replace(b",\n", b"\n")
        return self.validate_lines([ln for ln in chunk.split(b"\n") if ln.strip()])

    def tick(self, now: float | None = None) -> None:
        with self.queue.cond:
            self.queue.put((b"T", time.time() if now is None else now), 0)

    def take_refused(self) -> dict[str, int]:
        """The request-level rejections counted since the last call (for the worker)."""
        with self.queue.cond:
            refused, self._refused = self._refused, {}
        return refused

    def has_refused(self) -> bool:
        return bool(self._refused)
