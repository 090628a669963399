"""The Watcher's range tests on a real run: a rollback's measured rate (:meth:`RateChecks._probe`,
``recovery.probe="auto"``) and the pre-flight check of the configured rate on the first batches
(:meth:`RateChecks._lr_check`, ``recovery.lr_check="auto"``). Each runs on the live model and
optimizer from their current state, puts them back exactly, and hands what it measured to the
:class:`~lrwatch.recovery.policy.RecoveryPolicy`, which decides.

A mixin of :class:`~lrwatch.recovery.executor.PlanExecutor` over the Watcher's state
(``model``, ``optimizer``, ``scheduler``, ``scaler``, ``policy``, ``recovery``, ``exporter``,
``dist``, ``step``, ``data_position`` and the executor's ``_recent``, ``_probe_loss``,
``_probing``, ``_late_records``, ``_snaps``).
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Callable, Iterator

from ..actions.rollback import scale_learning_rate
from .lr_find import NO_RATES, rates_settable
from .policy import Plan
from .probe import check_cost, check_rate, configured_rate, probe_rate

__all__ = ["RateChecks"]

log = logging.getLogger("lrwatch")
_EVENT = {"lrwatch_event": True}   # (as the executor's: a record that reports an action)
#: Why a range test was skipped for an optimizer whose every group is at rate 0.
NO_POSITIVE_RATE = "every parameter group's learning rate is 0: there is no rate to test"


class RateChecks:
    """The range tests of the Watcher's executor (see the module docstring)."""

    # attributes the Watcher and the executor provide (declared for readers and checkers)
    model: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    policy: Any
    recovery: Any
    exporter: Any
    dist: Any
    step: int
    data_position: int
    _recent: Any
    _probe_loss: Any
    _probing: bool
    _late_records: list[dict[str, Any]]
    _snaps: Any
    _internal_error: Callable[[str], None]   # the Watcher's: counted and logged, not raised

    def _positive_rate(self) -> float | None:
        """The configured rate a range test scales (``configured_rate``), or ``None`` when
        there is none to test: no rate to set, or every group's rate at 0."""
        if not rates_settable(self.optimizer):
            return None
        lr = configured_rate(self.optimizer, self.scheduler, self.policy.lr_scale)
        return lr if lr > 0 else None

    def _probe(self, p: Plan, at: int) -> Plan:
        """Measure the rate for ``p`` with a range test from the restored state; the policy
        takes the measured rate (or its fixed factor when the test cannot run)."""
        assert self.recovery is not None and self._probe_loss is not None
        before = self.policy.lr_scale
        measured, steps, failed = None, 0, None
        # (no batch seen yet, or no rate to set: the fixed factor stands in)
        have = bool(self._recent) and self._positive_rate() is not None
        if self.dist.active:   # every rank tests or none: the test's steps are collectives
            have = all(self.dist.gather(have))
        if have:
            failed = configured_rate(self.optimizer, self.scheduler, before) * p.probe_from
            self._probing = True
            try:
                res = probe_rate(self.model, self.optimizer, self.scheduler, self.scaler,
                                 list(self._recent), self._probe_loss, self.recovery, failed,
                                 process_group=self.dist.group if self.dist.active else None)
                measured, steps = res.measured, res.steps
            except Exception:
                self._internal_error("probing the learning rate")
            finally:
                self._probing = False
        real = self.policy.probed(p, measured, steps)
        rel = self.policy.lr_scale / before
        if rel != 1.0:
            scale_learning_rate(self.optimizer, self.scheduler, rel)
        self.exporter.actions.labels("probe").inc()
        self._late_records.append({"type": "probe", "rule": p.rule, "step": self.step,
                                   "from_step": at, "steps": steps, "failed_lr": failed,
                                   "lr_factor": real.lr_factor, "reason": real.reason})
        return real

    def _lr_check(self, it: Iterator[Any]) -> Iterator[Any]:
        """The pre-flight range test on the first ``lr_check_steps`` batches of ``it``; those
        batches are then trained on as usual (the returned iterator yields them first)."""
        assert self.recovery is not None and self._probe_loss is not None
        lr = self._positive_rate()
        if lr is None:
            why = NO_RATES if not rates_settable(self.optimizer) else NO_POSITIVE_RATE
            self.policy.lr_checked(0)
            log.info("lrwatch: learning-rate check skipped: %s", why)
            self._late_records.append({"type": "lr_check", "step": self.step, "steps": 0,
                                       "cost_steps": 0, "lr_factor": 1.0, "reason": why})
            return it
        first = list(itertools.islice(it, self.recovery.lr_check_steps))
        factor, steps, cost, why = None, 0, 0, "no batch to test on"
        if first:
            self._probing = True
            try:
                factor, curve = check_rate(
                    self.model, self.optimizer, self.scheduler, self.scaler, first,
                    self._probe_loss, lr, self.recovery.lr_check_steps,
                    process_group=self.dist.group if self.dist.active else None,
                    clip=self.recovery.clip_grad_norm)
                steps, cost = curve.steps, check_cost(curve)
                why = ("the loss of a fixed batch rose above its starting level at a rate up "
                       "to the configured one" if factor is not None else
                       "no rise above the starting level at rates up to the configured one")
            except Exception:
                self._internal_error("checking the learning rate before the first step")
                why = "the range test failed; the configured rate stands"
            finally:
                self._probing = False
        self.policy.lr_checked(cost)
        if factor is not None:
            scale_learning_rate(self.optimizer, self.scheduler, factor)
            self._retake_initial_snapshot()
            log.warning("lrwatch: learning-rate check: in a %d-step range test the loss of a "
                        "fixed batch rose above its starting level at rates up to the "
                        "configured %.3g; starting at %.3g (x%.3g)",
                        steps, lr, lr * factor, factor, extra=_EVENT)
            self.exporter.actions.labels("lr_check").inc()
        else:
            log.info("lrwatch: learning-rate check (%d steps): the configured rate %.3g "
                     "stands", steps, lr)
        self._late_records.append({"type": "lr_check", "step": self.step, "steps": steps,
                                   "cost_steps": cost, "lr": lr,
                                   "lr_factor": factor if factor is not None else 1.0,
                                   "reason": why})
        return itertools.chain(first, it)

    def _retake_initial_snapshot(self) -> None:
        """The run's starting point (the pinned snapshot a restart goes back to) now has the
        checked rate: replace the one taken before the check."""
        if self._snaps is not None:
            self._snaps.retake_first(self.step, self.data_position)
