"""The data side of a watched loop: the batches lrwatch hands out, and what it measures on them.

:class:`DataSide` is a mixin of :class:`lrwatch.watch.Watcher`: :meth:`~DataSide.batches`
wraps the user's iterable and carries out lrwatch's decisions between batches (the skip
window after a rollback, the replay after a sudden failure, the end after a ``stop``), and
before the first step it measures the untrained and constant-prediction losses
(:mod:`lrwatch.untrained`) and runs the pre-flight learning-rate check when it is due.
Adapters whose framework draws the data call :meth:`~DataSide.skip_batch`,
:meth:`~DataSide.remember_batch` and :meth:`~DataSide.measure_untrained` themselves.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Iterable, Iterator, TypeVar

from .untrained import OutputShapes, measure_constant_loss, measure_untrained_loss

__all__ = ["DataSide"]

log = logging.getLogger("lrwatch")

T = TypeVar("T")


class DataSide:
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

    def batches(self, iterable: Iterable[T]) -> Iterator[T]:
        """Yield the batches of ``iterable``, acting on lrwatch's decisions between them.

        After a rollback it drops the configured window of batches (``skip_batches``); after a
        rollback for a sudden failure it first yields again the batches drawn since the
        snapshot, less the failure's (``RecoveryConfig.replay``); after a ``stop`` it ends the
        loop. ``data_position`` counts the batches drawn, and snapshots
        record it.
        """
        self._boundary_kind = "batches"
        if self._probe_loss is not None and self.step == 0 and self.untrained_batches:
            iterable = self._measure_untrained(iter(iterable))
        if self._probe_loss is not None and self.policy.lr_check_due(self.step):
            iterable = self._lr_check(iter(iterable))
        for batch in iterable:
            self._boundary("batches")
            while not self.should_stop:   # a rollback after a bad batch: its batches again
                due, again = self._replay.next()
                if not due:
                    break
                self._hold(again)
                yield again
                self._boundary("batches")
            if self.should_stop:
                return
            if self.skip_batch():
                continue
            self._hold(batch)
            yield batch
        self._safe_point()

    def _measure_untrained(self, it: Iterator[T]) -> Iterator[T]:
        """Measure the untrained loss on the first batches of ``it``; they are yielded first."""
        first = list(itertools.islice(it, self.untrained_batches))
        self.measure_untrained(first)
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
            loss = measure_untrained_loss(self.model, batches, self._probe_loss, outputs)
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
