"""The mid-run rate check's torch side (``RecoveryConfig.mid_check``): a mixin of
:class:`lrwatch.data_side.DataSide`, so of the Watcher.

:meth:`MidCheckSide._mid_checks` wraps the batches :meth:`~DataSide.batches` hands out. When
the policy says a check is due (:meth:`~lrwatch.recovery.mid_check.MidCheckBooking.mid_check_due`)
it keeps the run's state (a CPU copy), yields the next ``mid_check_steps`` batches (trained on
as usual, their rates noted), draws the ``mid_check_batches`` after them, and hands all of it
to :func:`~lrwatch.recovery.shadow.shadow_check` with the policy's verdict: the shadow trains
on the same batches at ``mid_check_factor`` of the rates from the kept state, both are scored
on the drawn batches, and the run goes on from the shadow where it did better. The drawn
batches are then yielded as usual. A check during which lrwatch acted on the run (a rollback,
a skip, a rate cut, a stop) is given up and booked at no cost.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any, Iterator, TypeVar

from .actions.host_memory import copies_fit
from .actions.snapshot import capture_state
from .recovery.lr_find import rates_settable
from .recovery.probe import FORWARD_COST
from .recovery.shadow import group_rates, shadow_check

__all__ = ["MidCheckSide"]

log = logging.getLogger("lrwatch")
_EVENT = {"lrwatch_event": True}

T = TypeVar("T")


class MidCheckSide:
    """The mid-run check's batches and shadow (a mixin; the Watcher provides the rest)."""

    step: int
    policy: Any
    recovery: Any
    model: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    store: Any
    exporter: Any
    dist: Any
    should_stop: bool
    _probe_loss: Any
    _probing: bool
    _pending: list[Any]
    _late_records: list[Any]
    _internal_error: Any

    def _mid_checks(self, it: Iterator[T]) -> Iterator[T]:
        """Yield ``it``'s batches, running each mid-run check when it is due."""
        for batch in it:
            self.policy.scheduled = self.scheduler is not None   # it may be attached late
            if not self.policy.mid_check_due(self.step):
                yield batch
                continue
            yield from self._mid_check(batch, it)

    def _mid_acted(self) -> tuple[int, int, int, bool]:
        st = self.policy.state
        return st.rollbacks, st.skips, st.lr_reductions, bool(self.should_stop)

    def _mid_check(self, first: T, it: Iterator[T]) -> Iterator[T]:
        """One check from the run's state now: ``first`` and the next batches are the
        shadow's, then the held-out ones."""
        rc = self.recovery
        why = None
        if self.dist.active:
            why = "not under torch.distributed"
        elif not rates_settable(self.optimizer):
            why = "the optimizer's rates cannot be set"
        elif self._pending:
            why = "a plan waits"
        else:
            fits, why_not = copies_fit(self.model, self.optimizer, 2)
            why = None if fits else why_not
        start = None
        if why is None:
            try:
                start = capture_state(self.model, self.optimizer, self.scheduler, self.scaler)
            except Exception:
                self._internal_error("saving the state for the mid-run rate check")
                why = "its state could not be saved"
        if why is not None:
            log.info("lrwatch: mid-run rate check skipped (%s)", why)
            self.policy.mid_checked(self.step, 0, adopted=False)
            yield first
            return
        at, acted = self.step, self._mid_acted()
        held, rates = [], []
        for batch in itertools.chain([first], it):
            rates.append(group_rates(self.optimizer))
            held.append(batch)
            yield batch
            if len(held) == rc.mid_check_steps:
                break
        peek = list(itertools.islice(it, rc.mid_check_batches))
        if (len(held) < rc.mid_check_steps or len(peek) < rc.mid_check_batches
                or self.step != at + len(held) or self._mid_acted() != acted or self._pending):
            log.info("lrwatch: mid-run rate check at step %d given up (lrwatch acted on the "
                     "run meanwhile, or the data ran out)", at)
            self.policy.mid_checked(at, 0, adopted=False)
        else:
            self._mid_shadow(at, start, held, rates, peek)
        del start, held, rates
        yield from peek

    def _mid_shadow(self, at: int, start: Any, held: list[Any], rates: list[Any],
                    peek: list[Any]) -> None:
        """Train and score the shadow, adopt it or not, book the cost, and say so."""
        factor = self.recovery.mid_check_factor
        self._probing = True   # the shadow's steps are not the run's (the step hooks skip them)
        try:
            res = shadow_check(self.model, self.optimizer, self.scheduler, self.scaler, start,
                               held, rates, peek, self._probe_loss, factor,
                               self.policy.mid_check_verdict,
                               clip=self.recovery.clip_grad_norm)
        except Exception:
            self._internal_error("running the mid-run rate check")
            res = None
        finally:
            self._probing = False
        if res is None:
            self.policy.mid_checked(at, 0, adopted=False)
            return
        v = res.verdict
        cost = res.steps + math.ceil(res.forwards * FORWARD_COST - 1e-9)
        self.policy.mid_checked(at, cost, adopted=v.adopt)
        self._late_records.append({"type": "mid_check", "step": self.step, "from_step": at,
                                   "steps": res.steps, "cost_steps": cost,
                                   "lr_factor": factor if v.adopt else 1.0,
                                   "held_out_loss": v.real, "shadow_loss": v.shadow,
                                   "reason": v.reason})
        if v.adopt:
            if self.store is not None:
                self.store.discard_pending()   # snapshots of the steps the shadow replaced
            log.warning("lrwatch: mid-run rate check: the last %d steps again at x%g of the "
                        "rate did better (%s); going on from them at that rate",
                        len(held), factor, v.reason, extra=_EVENT)
            self.exporter.actions.labels("mid_check").inc()
        else:
            log.info("lrwatch: mid-run rate check at step %d: the rate stands (%s)", at,
                     v.reason)
