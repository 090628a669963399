"""The data side of a watched loop: the batches lrwatch hands out, and what it measures on them.

:class:`DataSide` is a mixin of :class:`lrwatch.watch.Watcher`: :meth:`~DataSide.batches`
wraps the user's iterable and carries out lrwatch's decisions between batches (the skip
window after a rollback, the replay after a sudden failure, the end after a ``stop``), and
before the first step it measures the untrained and constant-prediction losses
(:mod:`lrwatch.untrained`) and runs the pre-flight learning-rate check when it is due.
Adapters whose framework draws the data call :meth:`~DataSide.skip_batch`,
:meth:`~DataSide.remember_batch`, :meth:`~DataSide.measure_untrained`,
:meth:`~DataSide.start_check_batch` and :meth:`~DataSide.start_check_boundary` themselves.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any, Iterable, Iterator, TypeVar

from .actions.host_memory import copies_fit, reports_fit
from .actions.snapshot import capture_state
from .recovery.lr_find import NO_RATES, rates_settable
from .recovery.probe import FORWARD_COST
from .recovery.shadow import ObservedStart, group_rates, shadow_check
from .mid_check_side import MidCheckSide
from .start_gate import StartGate
from .untrained import OutputShapes, measure_constant_loss, measure_untrained_loss

__all__ = ["DataSide"]

log = logging.getLogger("lrwatch")
_EVENT = {"lrwatch_event": True}   # as the executor's: a rule event or an action

T = TypeVar("T")


class DataSide(StartGate, MidCheckSide):
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
    outputs: Any
    recorder: Any
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
    _unjudged_steps: bool
    _going_back: bool
    _land: Any
    _safe_point: Any
    _restore_engine: Any
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
        why = failed
        if why is None and (len(held) < steps or len(peek) < k or self.step != steps
                            or self.should_stop or self.policy.state.rollbacks):
            why = ("too few batches" if len(held) < steps or len(peek) < k else
                   "the run stopped" if self.should_stop else
                   "lrwatch rolled the run back meanwhile" if self.policy.state.rollbacks else
                   f"{self.step} logged steps on its first {steps} batches, not one per batch")
        why = self._agreed_reason(why)
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
        got = self.dist.gather(why)
        if why is not None or all(w is None for w in got):
            return why
        return next(f"rank {r}: {w}" for r, w in enumerate(got) if w is not None)

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
        if res is None:
            self.policy.start_checked(cost)
            return
        self.policy.start_checked(cost)
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
        return steps + math.ceil((forwards + self._gate_forwards) * FORWARD_COST - 1e-9)

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
