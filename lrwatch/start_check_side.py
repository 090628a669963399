"""The start check's torch side (``RecoveryConfig.start_check``): a mixin of
:class:`lrwatch.data_side.DataSide`, so of the Watcher.

:meth:`StartCheckSide._start_check` wraps the batches :meth:`~lrwatch.data_side.DataSide.batches`
hands out: it keeps the state before the first step (a CPU copy), yields the first
``start_check_steps`` batches (trained on as usual, their rates noted), draws the
``start_check_batches`` after them, and hands all of it to
:func:`~lrwatch.recovery.shadow.shadow_check` (after the gate, :mod:`lrwatch.start_gate`): the
shadow trains from the start state on the same batches at ``restart_lr_factor`` of the rates,
both are scored on the drawn batches, and the run goes on from the shadow where it did better.
Adapters whose framework draws the data feed the same check through
:meth:`~StartCheckSide.start_check_batch` and :meth:`~StartCheckSide.start_check_boundary`.
Whether the check can run, and what it costs, are decided in
:mod:`lrwatch.recovery.start_check` (pure); under ``torch.distributed`` every rank runs it or
none does.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Iterator, TypeVar

from .actions.host_memory import copies_fit, reports_fit
from .actions.snapshot import capture_state
from .recovery.lr_find import NO_RATES, rates_settable
from .recovery.probe import FORWARD_COST
from .recovery.shadow import ObservedStart, group_rates, shadow_check
from .recovery.start_check import check_cost, first_reason, skip_reason
from .start_gate import StartGate

__all__ = ["StartCheckSide"]

log = logging.getLogger("lrwatch")
_EVENT = {"lrwatch_event": True}   # as the executor's: a rule event or an action

T = TypeVar("T")


class StartCheckSide(StartGate):
    """The start check's batches, states and shadow (a mixin; the Watcher provides the rest)."""

    # provided by the Watcher and its other parts
    step: int
    _boundary_kind: str | None
    _probe_loss: Any
    policy: Any
    model: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    recovery: Any
    store: Any
    exporter: Any
    dist: Any
    should_stop: bool
    _probing: bool
    _late_records: list[Any]
    _observed: ObservedStart | None
    _pending: list[Any]
    engine: Any
    flush: Any
    _safe_point: Any
    _restore_engine: Any
    _retake_initial_snapshot: Any

    def _start_check(self, it: Iterator[T]) -> Iterator[T]:
        """Yield the first ``start_check_steps`` batches (trained on as usual), then run the
        start check (``RecoveryConfig.start_check``; :mod:`lrwatch.recovery.shadow`) on them
        and the next ``start_check_batches``, which are yielded after it, then the rest."""
        rc = self.recovery
        if not rates_settable(self.optimizer):   # (the same on every rank)
            self._skip_start_check(NO_RATES)
            yield from it
            return
        fits, why = self._copies_fit(2)   # the start, the run at 10
        if not fits:
            self._skip_start_check(why, warn=True)
            yield from it
            return
        start, failed = None, None
        try:
            start = capture_state(self.model, self.optimizer, self.scheduler, self.scaler)
        except Exception:
            self._internal_error("saving the start state for the start check")
            if not self.dist.active:
                self.policy.start_checked(0)
                yield from it
                return
            failed = "its start state could not be saved"   # the other ranks wait to agree
        held: list[Any] = []
        rates: list[Any] = []
        for batch in it:
            rates.append(group_rates(self.optimizer))
            held.append(batch)
            yield batch
            if len(held) == rc.start_check_steps:
                break
        peek = list(itertools.islice(it, rc.start_check_batches))
        self._run_start_check(start, held, rates, peek, failed)
        del start, held, rates
        yield from peek
        yield from it

    def _run_start_check(self, start: Any, held: list[Any], rates: list[Any],
                         peek: list[Any], failed: str | None = None) -> None:
        rc = self.recovery
        steps, k = rc.start_check_steps, rc.start_check_batches
        if failed is None:
            failed = skip_reason(len(held), len(peek), self.step, steps, k, self.should_stop,
                                 bool(self.policy.state.rollbacks))
        why = self._agreed_reason(failed)
        if why is not None:
            self._skip_start_check(why)
            return
        self._shadow_check(start, held, rates, peek)

    def _agreed_reason(self, why: str | None) -> str | None:
        """This rank's reason to skip the start check, or under ``torch.distributed`` the
        first one any rank gives (the check's collectives need every rank, so all of them
        run it or none does); ``None``: every rank can run it."""
        if not self.dist.active:
            return why
        return first_reason(why, self.dist.gather(why))

    def _copies_fit(self, copies: int) -> tuple[bool, str]:
        """Whether the start check's copies fit in host memory; under ``torch.distributed``
        decided on every rank's gathered reports, so that all ranks check or none does."""
        if not self.dist.active:
            return copies_fit(self.model, self.optimizer, copies)
        reports = self.store.memory_reports if self.store is not None else None
        return reports_fit(reports, copies) if reports else (True, "")

    def _skip_start_check(self, why: str, warn: bool = False) -> None:
        (log.warning if warn else log.info)("lrwatch: start check skipped (%s)", why)
        self._observed = None
        self.policy.start_checked(0)
        self._forget_gate()

    def _shadow_check(self, start: Any, held: list[Any], rates: list[Any], peek: list[Any],
                      run_state: Any = None, peek_rates: list[Any] | None = None) -> None:
        """Judge the run's own steps first, then train the shadow, score both, book the cost,
        adopt or not, and say so.

        The rules see the run's first steps before the check: when they already call for a
        rollback, restart or stop, that is carried out instead (a restart is what adopting
        the shadow would do, cheaper), and an adopted shadow never answers for the steps of
        the run it replaced (their firings would restart it once more). An adopted shadow
        starts the detectors afresh from the run's start, as a restart does."""
        try:
            self.flush()
        except Exception:
            self._internal_error("judging the run's first steps before the start check")
        if self._pending or self.should_stop:
            self._skip_start_check("the rules acted on the run's first steps")
            self._safe_point()
            return
        if self._start_gate_closed(held, start):
            return
        factor, steps = self.recovery.restart_lr_factor, self.recovery.start_check_steps
        self._probing = True   # the shadow's steps are not the run's (the step hooks skip them)
        try:
            res = shadow_check(self.model, self.optimizer, self.scheduler, self.scaler, start,
                               held, rates, peek, self._probe_loss, factor,
                               lambda r, s: self.policy.start_checked(0, r, s),
                               process_group=self.dist.group if self.dist.active else None,
                               run_state=run_state, held_out_rates=peek_rates or (),
                               clip=self.recovery.clip_grad_norm)
        except Exception:
            self._internal_error("running the start check")
            res = None
        finally:
            self._probing = False
        cost = self._start_check_cost(res)
        self.policy.start_checked(cost)
        if res is not None:
            self._start_check_done(res, cost, factor, steps)

    def _start_check_done(self, res: Any, cost: int, factor: float, steps: int) -> None:
        """The check ran: adopt the shadow where it did better (the detectors start afresh
        from the run's start, the start snapshot is taken again), say so, and record it."""
        v = res.verdict
        record: dict[str, Any] = {"type": "start_check", "step": self.step,
                                  "steps": res.steps, "cost_steps": cost,
                                  "lr_factor": factor if v.adopt else 1.0,
                                  "held_out_loss": v.real, "shadow_loss": v.shadow,
                                  "reason": v.reason}
        if v.adopt:
            engine_state = self._start_engine_state()
            if engine_state is not None and self.engine is not None:
                self._restore_engine(engine_state)   # replay restores it from the record
                record["engine_state"] = engine_state
            if self.store is not None:
                self.store.discard_pending()   # snapshots of the run's own first steps
            self._retake_initial_snapshot()
            log.warning("lrwatch: start check: a restart at x%g of the rate did better over "
                        "the first %d steps (%s); going on from it at that rate", factor,
                        steps, v.reason, extra=_EVENT)
            self.exporter.actions.labels("start_check").inc()
        else:
            log.info("lrwatch: start check: the configured rate stands (%s)", v.reason)
        self._late_records.append(record)

    def _start_check_cost(self, res: Any) -> int:
        """The start check's cost in steps: the shadow's steps, its held-out forwards and
        the gate's own (where it measured the untouched network at the check)."""
        steps, forwards = (res.steps, res.forwards) if res is not None else (0, 0)
        return check_cost(steps, forwards + self._gate_forwards, FORWARD_COST)

    def _start_engine_state(self) -> Any:
        """The detectors' state at the run's start (the pinned snapshot's), or ``None``."""
        pinned = [x for x in (self.store.snapshots if self.store is not None else ())
                  if x.pinned]
        return pinned[0].extra.get("engine_state") if pinned else None

    # --- the start check where the framework draws the data ------------------------------
    def start_check_batch(self, batch: Any) -> None:
        """Hand over a training batch before the run trains on it, for the start check
        (``RecoveryConfig.start_check``), in adapters whose framework draws the data
        (:meth:`batches` does it itself). Call it once per batch, after the step boundary's
        :meth:`log` and :meth:`start_check_boundary`; it keeps the first
        ``start_check_steps + start_check_batches`` batches, the state before the first step
        and (at the boundary) the run after ``start_check_steps`` steps, as CPU copies."""
        obs = self._observed
        if obs is None:
            if (self._boundary_kind == "batches" or self._probe_loss is None
                    or not self.policy.start_check_due(self.step)):
                return
            fits, why = self._copies_fit(3)   # the start, step 10, now
            if not fits:
                self._skip_start_check(why, warn=True)
                return
            try:
                obs = self._observed = ObservedStart(capture_state(
                    self.model, self.optimizer, self.scheduler, self.scaler))
            except Exception:
                self._internal_error("saving the start state for the start check")
                if not self.dist.active:
                    self.policy.start_checked(0)
                    return
                obs = self._observed = ObservedStart({}, failed="its start state could not "
                                                     "be saved")
            self._listen_early()   # the gate compares the first steps with the start state
        held = len(obs.batches) + len(obs.held_out)
        if held != self.step and obs.failed is None:   # accumulation: hold no more
            self._observed_failed(obs, f"{held + 1} batches over the first {self.step + 1} "
                                  "steps, not one per step")
            return
        obs.add(batch, group_rates(self.optimizer))

    def _observed_failed(self, obs: ObservedStart, why: str) -> None:
        """This rank cannot run the start check the framework's data feeds: skip it now, or
        under ``torch.distributed`` at the check's step, where every rank agrees
        (:meth:`_agreed_reason`) and none is left alone in the check's collectives."""
        if not self.dist.active:
            self._skip_start_check(why)
            return
        obs.failed = obs.failed or why
        if obs.run_state is None:
            obs.run_state = {}   # nothing to score: the check is skipped at its step

    def start_check_boundary(self) -> None:
        """At the step boundary of an adapter that calls :meth:`start_check_batch`: keep the
        run's state after the first ``start_check_steps`` steps, and once the next
        ``start_check_batches`` have been trained on, run the check on them (the run as it
        was before them against the shadow; an adopted shadow also trains on them, at the
        new rate, as the run would have done)."""
        obs, rc = self._observed, self.recovery
        if obs is None:
            return
        steps, k = rc.start_check_steps, rc.start_check_batches
        if self.should_stop or self.policy.state.rollbacks:
            self._skip_start_check("the run stopped" if self.should_stop else
                                   "lrwatch rolled the run back meanwhile")
        elif obs.run_state is None and self.step >= steps:
            if self.step != steps or len(obs.batches) != steps:
                self._observed_failed(obs, f"{len(obs.batches)} batches over the first "
                                      f"{self.step} logged steps, not one per step")
                return
            try:
                obs.run_state = capture_state(self.model, self.optimizer, self.scheduler,
                                              self.scaler)
            except Exception:
                self._internal_error("saving the run's state for the start check")
                self._observed_failed(obs, "its state could not be saved")
        elif obs.run_state is not None and self.step >= steps + k:
            why = obs.failed
            if why is None and (self.step != steps + k or len(obs.held_out) != k):
                why = f"{len(obs.held_out)} batches over {k} steps, not one per step"
            why = self._agreed_reason(why)
            if why is not None:
                self._skip_start_check(why)
                return
            self._observed = None
            self._shadow_check(obs.start, obs.batches, obs.rates, obs.held_out,
                               obs.run_state, obs.held_out_rates)
