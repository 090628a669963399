"""The data side of a watched loop: the batches lrwatch hands out, and what it measures on them.

:class:`DataSide` is a mixin of :class:`lrwatch.watch.Watcher`: :meth:`~DataSide.batches`
wraps the user's iterable and carries out lrwatch's decisions between batches (the skip
window after a rollback, the replay after a sudden failure, the end after a ``stop``), and
before the first step it measures the untrained and constant-prediction losses
(:mod:`lrwatch.untrained`) and runs the pre-flight learning-rate check when it is due.
Adapters whose framework draws the data call :meth:`~DataSide.skip_batch`,
:meth:`~DataSide.remember_batch`, :meth:`~DataSide.measure_untrained`,
:meth:`~DataSide.start_check_batch` and :meth:`~DataSide.start_check_boundary` themselves.

The checks that train a shadow are its own mixins: the start check
(:class:`lrwatch.start_check_side.StartCheckSide`, with its gate,
:class:`lrwatch.start_gate.StartGate`) and the mid-run check
(:class:`lrwatch.mid_check_side.MidCheckSide`).
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Iterable, Iterator, TypeVar

from .mid_check_side import MidCheckSide
from .start_check_side import StartCheckSide
from .untrained import OutputShapes, measure_constant_loss, measure_untrained_loss

__all__ = ["DataSide"]

log = logging.getLogger("lrwatch")

T = TypeVar("T")


class DataSide(StartCheckSide, MidCheckSide):
    """Batches in, decisions carried out between them (a mixin of the Watcher, whose
    attributes it uses: the step, the policy, the recorder, the replay and skip state)."""

    # provided by the Watcher and its other parts
    step: int
    data_position: int
    skipped_batches: int
    untrained_batches: int
    _skip_remaining: int
    _boundary_kind: str | None
    _probe_loss: Any
    _recent: Any
    _replay: Any
    policy: Any
    recorder: Any
    model: Any
    dist: Any
    should_stop: bool
    flush: Any
    _unjudged_steps: bool
    _going_back: bool
    _safe_point: Any
    _refuse_unlogged_stage: Any   # (StepPath)
    #: the untrained loss :meth:`measure_untrained` measured (a device scalar), or ``None``
    untrained_level: Any = None
    def batches(self, iterable: Iterable[T]) -> Iterator[T]:
        """Yield the batches of ``iterable``, acting on lrwatch's decisions between them.

        After a rollback it drops the configured window of batches (``skip_batches``); after a
        rollback for a sudden failure it first yields again the batches drawn since the
        snapshot, less the failure's (``RecoveryConfig.replay``; also for a rollback carried
        out when ``iterable`` has run out, after its last batch); after a ``stop`` it ends the
        loop. When ``iterable`` runs out it flushes (a collective under ``torch.distributed``,
        outside DDP's ``Join``), so the last steps are judged while their replay can still be
        yielded. ``data_position`` counts the batches drawn, and snapshots record it.
        """
        self._boundary_kind = "batches"
        if self._probe_loss is not None and self.step == 0 and self.untrained_batches:
            iterable = self._measure_untrained(iter(iterable))
        if self._probe_loss is not None and self.policy.lr_check_due(self.step):
            iterable = self._lr_check(iter(iterable))
        if self._probe_loss is not None and self.policy.start_check_due(self.step):
            iterable = self._start_check(iter(iterable))
        if self._probe_loss is not None and self.policy.mid_check_step() is not None:
            iterable = self._mid_checks(iter(iterable))
        for batch in iterable:
            self._refuse_unlogged_stage()   # (a pipeline stage: StepPath)
            self._boundary("batches")
            yield from self._replayed()
            if self.should_stop:
                return
            if self.skip_batch():
                continue
            self._hold(batch)
            yield batch
        self._end_of_data()
        # a rollback carried out at the end of the data still trains its batches again
        yield from self._replayed()

    def _end_of_data(self) -> None:
        """The data ran out: judge the steps not judged yet -- the flush still in flight
        (``flush_lag=1``) and the rows since the last flush (fewer than ``flush_every``) --
        so that a failure among the last steps is answered now, while its replay can still be
        yielded (not when a rollback or skip waits, which abandons those steps unjudged); then
        carry out what waits.

        Under ``torch.distributed`` judging is collective: every rank comes here at the same
        step when every rank is given the same number of batches, which lrwatch requires
        (docs/distributed.md). Not inside DDP's ``Join``: there one rank's data runs out while
        the others still train (their next collective is ``Join``'s own), so those steps are
        judged at ``close()``, as before."""
        if self._unjudged_steps and not self._going_back and not self.dist.in_join:
            self.flush()
        self._safe_point()

    def _replayed(self) -> Iterator[Any]:
        """After a rollback for a bad batch, the batches drawn since its snapshot, again (less
        the bad one; ``RecoveryConfig.replay``), each followed by its boundary."""
        while not self.should_stop:
            due, again = self._replay.next()
            if not due:
                return
            self._hold(again)
            yield again
            self._boundary("batches")


    def _measure_untrained(self, it: Iterator[T]) -> Iterator[T]:
        """Measure the untrained loss on the first batches of ``it``; they are yielded first,
        so the run's first steps meet the same batches (the start check's gate compares)."""
        first = list(itertools.islice(it, self.untrained_batches))
        self.measure_untrained(first)
        self._untrained_own = True
        return itertools.chain(first, it)

    def measure_untrained(self, batches: Iterable[Any]) -> None:
        """Record the untrained loss: the median ``probe_loss`` of the model as it is now over
        ``batches``, as ``untrained_loss`` in the next step's sample (:mod:`lrwatch.untrained`).

        :meth:`batches` does this itself before the first step; adapters whose framework draws
        the data call it with the first ``untrained_batches`` batches, before the first step. A
        failed measurement is counted and the run goes on without it.
        """
        if self._probe_loss is None:
            return
        batches = list(batches)
        outputs = OutputShapes()
        try:
            each: list[Any] = []
            loss = measure_untrained_loss(self.model, batches, self._probe_loss, outputs, each)
            if not self.policy.start_check_due(self.step):   # no gate to read them
                each = []
            self._untrained_each, self._untrained_inputs = each, batches if each else []
            if each:   # the gate reads the run's first losses against them
                self._listen_early()
            self.untrained_level = loss   # a device scalar (or None), for adapters
            if loss is not None:
                self.recorder.row_for_log(self.step + 1).put("untrained_loss", loss)
        except Exception:
            self._internal_error("measuring the untrained loss before the first step")
            return
        try:
            level = measure_constant_loss(batches, self._probe_loss, outputs)
            if level is not None:
                self.recorder.row_for_log(self.step + 1).put("constant_loss", level)
        except Exception as e:  # a probe_loss that needs the real model: the rules fall back
            log.info("constant-prediction loss not measured: probe_loss failed on a constant "
                     "stand-in for the model (%s: %s); the dead-network rules fall back to the "
                     "first loss", type(e).__name__, e)

    def skip_batch(self) -> bool:
        """Count one batch drawn by the framework; ``True`` if it falls in a rollback's skip window.

        For adapters whose framework draws the data itself (so :meth:`batches` cannot wrap the
        loop): call it once per batch drawn, and drop the batch when it returns ``True``. It
        counts ``data_position`` and ``skipped_batches`` exactly as :meth:`batches` does, but
        carries out no decisions (the adapter calls :meth:`log` at its own iteration boundary).
        """
        self.data_position += 1
        if self._skip_remaining > 0:
            self._skip_remaining -= 1
            self.skipped_batches += 1
            return True
        return False

    def remember_batch(self, batch: Any) -> None:
        """Keep ``batch`` among the recent ones a rollback's range test runs on (adapters
        whose framework draws the data; :meth:`batches` does it itself)."""
        if self._recent is not None:
            self._recent.append(batch)
