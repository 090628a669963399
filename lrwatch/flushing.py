"""The Watcher's flush: the buffered steps copied to the host in one transfer, then judged by
the rules, acted on and exported.

A flush is due once ``flush_every`` rows are committed. With ``flush_lag=0`` it is carried out
at once: the host waits for the device to finish every step queued so far, and then the rules
run on the host while the device has nothing queued. With ``flush_lag=1`` (the default when
the steps are recorded on a CUDA device) the copy is queued without waiting at the step that
fills the buffer, and the flush is *landed* (waited for, judged, acted on, exported) when the
next step's row is committed: by then the device has that step's work queued, so the wait is
for work it has long finished and the rules run while it computes (docs/overhead.md, "The
flush off the GPU's critical path"). Every rank of a distributed run lands at the same step,
so every rank still decides identically. What the rules decide takes effect one step later
than with ``flush_lag=0``. A snapshot taken while its step is not judged yet is no rollback
target until a flush judges it healthy (:mod:`lrwatch.recovery.keeper`), as before. A rollback
drops the steps not judged yet (the row trained between the copy and its landing, or a copy
in flight): the trajectory they were trained on is abandoned, and the rules never see them, in
the trace either. :meth:`Flushing.flush` and ``close()`` land the flush in flight first (when
that plans a rollback, the steps after it are left to be dropped); ``state_dict()`` does not
(the detectors' state it saves is the last judged flush's, as for steps not flushed yet).
The evaluations a flush reads are decided once its plans are known, so that a rollback can
drop those of the steps it abandons (:mod:`lrwatch.best_keeper`).

:class:`Flushing` is a mixin over the Watcher's state (``recorder``, ``dist``, ``_evals``,
``_rules``, ``_snaps``, ``outputs``, ``_faults``, ``batch_size``, ``flush_every``,
``flushes``) and its ``_act`` and ``_internal_error``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Callable

from .distributed import combine_rank_samples
from .exporters.trace import TraceWriter
from .pipeline import NOT_REPLICAS, replicas_apart
from .samples import Sample
from .steps import Transfer, materialise

__all__ = ["Flushing", "resolve_flush_lag"]


log = logging.getLogger("lrwatch")


def resolve_flush_lag(flush_lag: int | None, device: Any) -> int:
    """``flush_lag`` as given (0 or 1), or for ``None`` 1 when the steps are recorded on a CUDA
    device (where waiting for the copy stalls the queue) and 0 elsewhere."""
    if flush_lag is None:
        return 1 if getattr(device, "type", None) == "cuda" else 0
    if isinstance(flush_lag, bool) or flush_lag not in (0, 1):
        raise ValueError(f"flush_lag must be 0, 1 or None (1 on CUDA, else 0), got {flush_lag!r}")
    return int(flush_lag)


class Flushing:
    """The Watcher's flush (see the module docstring)."""

    # attributes the Watcher provides (declared for readers and type checkers)
    recorder: Any
    dist: Any
    batch_size: int | None
    flush_every: int
    flush_lag: int
    flushes: int
    outputs: Any
    _evals: Any
    _rules: Any
    _snaps: Any
    _faults: Any
    _in_flight: Transfer | None
    _pending: list[Any]   # (lrwatch.recovery.executor) plans for the next safe point
    _act: Callable[[Any, list[Sample]], list[Sample]]
    _internal_error: Callable[[str], None]
    trace: Any   # the trace writer, the outputs' (opened again: _reopen_trace)
    policy: Any
    should_stop: bool
    _late_records: list[Any]   # (lrwatch.recovery.executor) events after a flush
    _queue: Callable[[Any, list[Any]], None]
    _progress: Callable[[], Any]
    _safe_point: Callable[[], bool]
    _last_line: Sample | None = None   # the trace's last line (its sample), once written
    _said_not_replicas = False   # (lrwatch.pipeline.NOT_REPLICAS, said once)
    #: the last flush judged: its first and last steps and the rules that began firing on them
    _last_flush: tuple[int, int, tuple[str, ...]] | None = None

    def flush(self) -> list[Sample]:
        """Copy what the device holds to the host now and hand it to the listeners (a flush
        still in flight is landed first); returns the samples, in step order."""
        landed = self._land()
        if self._going_back:
            # the landed flush planned going back: the steps after it are on the trajectory
            # that abandons (dropped at the safe point), not judged by the restored detectors
            return landed
        return landed + self._judge(self._send(asynchronous=False))

    @property
    def _going_back(self) -> bool:
        """Whether a rollback or skip waits for the safe point (the steps since its target,
        and those trained until then, are abandoned)."""
        return any(p.action in ("rollback", "skip") for p, _ in self._pending)

    @property
    def flush_in_flight(self) -> bool:
        """Whether a flush's copy was queued and not yet judged (``flush_lag=1``)."""
        return self._in_flight is not None

    @property
    def _unjudged_steps(self) -> bool:
        """Whether steps were recorded and not judged yet (in flight, committed, or the open
        row once its step happened); the same on every rank of a run in lock-step."""
        row = self.recorder.open
        return (self._in_flight is not None or bool(self.recorder.rows)
                or (row is not None and row.stepped))

    def _commit_done(self) -> None:
        """A row was committed: land the flush in flight, then send the next when it is due."""
        if self._in_flight is not None:
            self._land()
        if len(self.recorder.rows) >= self.flush_every:
            if self.flush_lag:
                self._in_flight = self._send(asynchronous=True)
            else:
                self.flush()

    def _discard_unjudged(self) -> int:
        """Drop the steps not judged yet, committed or in flight, and the evaluations not
        decided yet (a rollback abandoned the trajectory they were trained on); returns how
        many steps."""
        self._evals.abandon()
        self._last_flush = None   # the state is no longer the one after the last flush
        self._last_logged = None   # (a log() after this is not late for a judged step)
        n = self.recorder.discard()
        if self._in_flight is not None:
            n += len(self._in_flight.rows)
            self._in_flight = None
        return n

    def _unjudged(self) -> list[Sample]:
        """The steps recorded and not judged yet -- a flush in flight, the committed rows, the
        open row once its step happened -- as samples on the host, left where they are (for
        ``state_dict``: this waits for the device, and judges nothing)."""
        rows = list(self.recorder.rows)
        row = self.recorder.open
        if row is not None and row.stepped:
            rows.append(row)
        samples = self._in_flight.result(self.batch_size)[0] if self._in_flight else []
        if rows:
            samples += materialise(rows, [], self.recorder.device, self.batch_size)[0]
        return samples

    def _resume_at(self, step: int) -> int:
        """``load_state_dict`` resumes the run at ``step``; the trace goes on from there (the
        lines up to it kept, :class:`~lrwatch.exporters.trace.TraceWriter`'s ``resume``);
        returns the lines kept. On a Watcher that already recorded steps (a checkpoint loaded
        mid-run), what came after the checkpoint was trained on the trajectory it replaces,
        as at a rollback: the steps not judged yet, the plans waiting for the safe point and
        the snapshots after ``step`` go, and the trace, whose lines go past ``step``, is
        opened again, which moves them aside for its ``resume`` (its steps must increase)."""
        self._discard_unjudged()
        self._pending.clear()
        if self._snaps is not None:
            self._snaps.store.discard_after(step)
        self._last_line = None
        old = self.outputs.trace
        if old is not None and old.path is not None:
            self._faults.guard(old.flush)
            if old.lines_written:
                self._reopen_trace(old)
        return self.outputs.resume(step)

    def _final_flush(self) -> None:
        """``close()``'s flush; then a rollback the cooldown held, or a watched failure's
        still firing, is carried out (it must not be lost), and what was done after the
        trace's last line was written -- its events, a range test's -- goes on that line
        (:meth:`_amend_last_line`)."""
        self.flush()
        done: list[dict[str, Any]] = []
        if ((self.policy.held is not None or self.policy.watching is not None)
                and not self.should_stop):   # (a watched failure still firing rolls back)
            self._queue(self.policy.release_held(self._progress()), done)
        late = len(self._late_records)
        self._safe_point()
        self._amend_last_line(done + self._late_records[late:])

    def _amend_last_line(self, records: list[dict[str, Any]]) -> None:
        """Write the trace's last line again with ``records`` added to its events (what was
        done after it was written, at the end of the run). A writer only appends: it is
        opened again, and its lines before that one come back (its ``resume``)."""
        last, old = self._last_line, self.outputs.trace
        if not records or last is None or old is None or old.path is None:
            return
        new = self._reopen_trace(old)
        self._faults.guard(new.resume, last.step - 1)
        self._faults.guard(new.write, replace(last, events=last.events + tuple(records)))

    def _reopen_trace(self, old: Any) -> Any:
        """The trace writer ``old`` closed and opened again on its path, which moves what it
        wrote aside for the new one's ``resume``; the new one."""
        self._faults.guard(old.close)
        new = self.trace = self.outputs.trace = TraceWriter(old.path, on_error=old.on_error)
        return new

    def _land(self) -> list[Sample]:
        transfer, self._in_flight = self._in_flight, None
        return self._judge(transfer) if transfer is not None else []

    def _send(self, *, asynchronous: bool) -> Transfer | None:
        """The committed rows (and pending evaluations) on their way to the host; ``None``
        when there is nothing to judge."""
        rows, pending = self.recorder.take(), self._evals.pending_values()
        if not rows and not self.dist.active:
            if pending:
                self._evals.decide(materialise([], pending, self.recorder.device,
                                               self.batch_size)[1])
            return None
        return Transfer(rows, pending, self.recorder.device, asynchronous=asynchronous)

    def _judge(self, transfer: Transfer | None) -> list[Sample]:
        if transfer is None:
            return []
        samples, best_values = transfer.result(self.batch_size)
        if transfer.n_extra:   # decided once the plans are known (a stop's: before it restores)
            pending = self._evals.pending_values()
            if len(pending) != transfer.n_extra:   # evaluated again since the copy was queued
                best_values = materialise([], pending, self.recorder.device, self.batch_size)[1]
            self._evals.judged(best_values)
        self.flushes += 1
        return self._judge_samples(samples)

    def _judge_samples(self, samples: list[Sample], emit: bool = True) -> list[Sample]:
        """One flush's samples judged by the rules (the ranks agree on them first), acted on
        and exported (not with ``emit=False``); the samples, with the events that ride on
        them."""
        if self.dist.active:
            samples = self._agree(samples)
        if self._rules is not None:   # the rules judge, the executor acts on their events
            samples, events = self._rules(samples)
            samples = self._act(events, samples)
        # a rollback or skip drops the evaluations of the steps it abandons
        back = [t.step for p, t in self._pending
                if p.action in ("rollback", "skip") and t is not None]
        self._evals.settle(min(back) if back else None)
        if emit:
            self.outputs.emit(samples, self._faults.guard)
        if samples and emit:
            self._last_line = samples[-1]
            self._last_flush = (samples[0].step, samples[-1].step, tuple(sorted(
                {str(e.get("rule")) for x in samples for e in x.events
                 if e.get("type") == "firing"})))
        return samples

    def _agree(self, samples: list[Sample]) -> list[Sample]:
        """One collective per flush: every rank's rows, combined identically on every rank."""
        took, memory, held = 0.0, None, None
        if self._snaps is not None:
            took, held = self._snaps.took_seconds(), self._snaps.held_steps()
            try:
                memory = self._snaps.memory_report()
            except Exception:
                self._internal_error("reading the host memory")
        gathered = self.dist.gather((samples, took, memory, held))
        if not (self.recorder.sharded or self._said_not_replicas):
            apart = replicas_apart([g[0] for g in gathered])
            if apart is not None:   # (every rank says it: the same rows)
                self._said_not_replicas = True
                log.warning(NOT_REPLICAS.format(**apart))
        merged = combine_rank_samples([g[0] for g in gathered])
        if self._snaps is not None:
            self._snaps.adapt(max(g[1] for g in gathered), merged)
            self._snaps.agree_memory([g[2] for g in gathered])
            # a snapshot one rank could not take is no rollback target on any rank
            self._snaps.agree_held([g[3] for g in gathered])
        return merged
