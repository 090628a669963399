"""Carrying out the recovery policy's plans on a real run (the torch side of a decision).

:class:`PlanExecutor` is the part of the :class:`~lrwatch.watch.Watcher` that acts: it hands
the policy the run's progress, records each plan in the trace (with the engine state of its
target, which ``lrwatch replay`` restores), and at the next safe point restores snapshots,
scales learning rates, runs a rollback's range test (the range tests themselves are
:class:`~lrwatch.recovery.rate_checks.RateChecks`), ramps, and stops. It also sends what
the plans notify (rule alerts, hooks, and the alerts of lrwatch's own actions) and closes the
sender and the hook at the end of the run. It decides nothing: every choice comes from
:class:`~lrwatch.recovery.policy.RecoveryPolicy`.

It is a mixin over the Watcher's state (``model``, ``optimizer``, ``scheduler``, ``scaler``,
``store`` and its :class:`~lrwatch.recovery.keeper.SnapshotKeeper`, ``engine``, ``policy``,
``recovery``, ``exporter``, ``best`` and its :class:`~lrwatch.best_keeper.BestKeeper`,
``sender``, ``hook``, ``dist``, ``step``, ``data_position``); its own fields are set up by
:meth:`PlanExecutor._setup_executor`, which the Watcher's ``__init__`` calls.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import replace
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

# (the rate keys scale_learning_rate scales in param groups)
from ..actions.rollback import _GROUP_KEYS as LR_GROUP_KEYS, scale_learning_rate
from ..actions.snapshot import Snapshot, restore_state
from .action_alerts import ActionAlerts
from .drop_check import tainted_drops
from .loop_schedule import LiveSchedule
from .rate_checks import RateChecks
from .policy import CONTROL_ACTIONS, EXIT_BUDGET, Plan, Progress, SnapshotInfo, restart_warmup_for
from .replay import ReplayBuffer

__all__ = ["PlanExecutor", "before_failure", "adopt_before_failure"]

log = logging.getLogger("lrwatch")
#: ``extra=`` of the log records that report a rule event or an action (firing, resolved,
#: rollback, skip, reduce_lr, lr_recover, stop): a console that prints the trace's events
#: itself can drop exactly these (``getattr(record, "lrwatch_event", False)``).
_EVENT = {"lrwatch_event": True}


def _gained_keys(optimizer: Any, state: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """Per param group, the learning-rate keys the live group holds and the captured
    ``state``'s optimizer lacks: SWALR's ``swa_lr``, a later scheduler's ``initial_lr``; every
    rate key of a group added since (``add_param_group``: a backbone unfrozen mid-run). A
    restore keeps them as they are, at the scale of before the restore."""
    saved = list(state["optimizer"].get("param_groups", ()))
    return [tuple(k for k in LR_GROUP_KEYS
                  if k in now and (i >= len(saved) or k not in saved[i]))
            for i, now in enumerate(optimizer.param_groups)]


def _scale_gained(optimizer: Any, gained: Sequence[tuple[str, ...]], factor: float) -> None:
    """Scale the ``gained`` keys by ``factor`` (to the restored snapshot's scale), so that
    the cut the snapshot's rates are then scaled by reaches them once, not twice."""
    for group, keys in zip(optimizer.param_groups, gained):
        if keys and factor != 1.0:
            scale_learning_rate(SimpleNamespace(param_groups=[group]),  # type: ignore[arg-type]
                                None, factor, keys)


def before_failure(state: Any, store: Any, distributed: bool) -> list[dict[str, Any]]:
    """For ``Watcher.state_dict``, while a failure waits for its rollback (a watched sudden
    failure, a rollback the cooldown holds; the policy's ``state``, or what stands for it:
    since the sixteenth round at the latest the checkpoint's own step, whose last update only
    the resumed run measures): the snapshots ``store``
    holds on disk (``snapshot_dir``) from before it, by path and checksum, which a run
    resumed from the checkpoint can go back to (its own start, the resumed state, is after
    the failure). Not under ``torch.distributed`` (rank 0's checkpoint names its own files)."""
    since = (state.watching_step if state.watching is not None
             else state.held_step if state.held is not None else None)
    if since is None or store is None or distributed:
        return []
    return [{"step": s.step, "data_position": s.data_position, "path": s.path,
             "checksum": s.checksum, "good": s.good, "lr_scale": s.extra.get("lr_scale", 1.0),
             "engine_state": s.extra.get("engine_state")}
            for s in store.snapshots if s.path and s.step < since]


def adopt_before_failure(store: Any, carried: Sequence[Mapping[str, Any]]) -> None:
    """``Watcher.load_state_dict``: the snapshots :func:`before_failure` carried, where their
    files are still there, go into ``store`` before every snapshot it holds (the resumed
    start); a rollback for that failure goes back to one of them. A file is verified when
    it is loaded: one that changed since fails the rollback, which stops the run."""
    if store is None:
        return
    oldest = min((x.step for x in store.snapshots), default=None)
    for c in sorted(carried, key=lambda c: -int(c["step"])):
        step = int(c["step"])
        if (oldest is not None and step >= oldest) or not os.path.exists(c.get("path") or ""):
            continue
        extra = {"lr_scale": c.get("lr_scale", 1.0), "engine_state": c.get("engine_state")}
        store.snapshots.appendleft(Snapshot(step, int(c["data_position"]), None, 0.0,
                                            path=c["path"], checksum=c.get("checksum"),
                                            good=bool(c.get("good")), extra=extra))
        oldest = step


class PlanExecutor(RateChecks, ActionAlerts):
    """The Watcher's executor of recovery plans (see the module docstring)."""

    # attributes the Watcher provides (declared for readers and type checkers)
    model: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    store: Any
    _snaps: Any   # the SnapshotKeeper (None without recovery)
    engine: Any
    policy: Any
    recovery: Any
    exporter: Any
    best: Any
    _evals: Any   # the BestKeeper over ``best``
    _faults: Any  # the FailOpen that counts and logs internal errors
    sender: Any
    notifier: Any
    hook: Any
    dist: Any
    step: int
    data_position: int
    run_name: str
    _action_alerts: dict[str, Any]
    should_stop: bool
    exit_status: int
    stop_reason: str | None
    _discard_unjudged: Any   # (lrwatch.flushing) steps not judged yet, dropped at a rollback

    def _setup_executor(self, probe_loss: Any, probe: bool) -> None:
        """The executor's own state: nothing carried out or pending yet; the range tests (a
        rollback's ``probe`` when ``probe`` is true, the pre-flight check) and the recent
        batches they reuse."""
        self.should_stop = False
        self.exit_status = 0
        self.stop_reason = None
        self._skip_remaining = 0
        self._pending: list[tuple[Plan, Snapshot | None]] = []
        self._restored_at: int | None = None   # the step of the last rollback or skip
        self._ramped_at: int | None = None     # the step whose boundary the ramp last moved at
        self._action_alerts = {}   # kind -> the firing alert of an action
        self._stop_restored: Any = None   # what a stop restored (adapters re-apply)
        self._probe_loss = probe_loss
        self._probing = False
        self._late_records: list[dict[str, Any]] = []  # events that happened after a flush
        self._recent: deque[Any] | None = (
            deque(maxlen=self.recovery.probe_steps) if probe else None)
        rc = self.recovery
        self._replay = ReplayBuffer(int(rc.replay_mb * 2 ** 20) if rc is not None and rc.replay
                                    else 0)
        self.policy.probe_available = probe

    def _progress(self, step: int | None = None, samples: Sequence[Any] = ()) -> Progress:
        """The run as the policy needs to see it: the step, the snapshots held, and the steps
        of ``samples`` whose non-finite gradient was dropped."""
        snaps = [SnapshotInfo(x.step, x.good, x.pinned)
                 for x in (self.store.snapshots if self.store is not None else ())]
        dropped = [s.step for s in samples if s.values.get("grad_dropped", 0.0) >= 0.5]
        tainted = tainted_drops(self.model, dropped, self.dist)   # (BatchNorm took a NaN in)
        return Progress(self.step if step is None else step, snaps,
                        [d for d in dropped if d not in tainted], tainted)

    def _plan(self, events: Sequence[Any], progress: Progress) -> list[Plan]:
        """The policy's plans for one flush; when they end a probation (the run got past its
        rollback and stayed quiet), the rollback's alert is resolved: the run is healthy again."""
        was_on_probation = self.policy.state.probation_until is not None
        self.policy.scheduled = self.scheduler is not None   # it may be attached late
        self.policy.auto_warmup = restart_warmup_for(
            getattr(self.optimizer, "param_groups", None) or ())
        plans = self.policy.plan(events, progress)
        if (was_on_probation and self.policy.state.probation_until is None
                and not any(p.action in CONTROL_ACTIONS for p in plans)):
            self._resolve_action_alerts(("rollback", "restart"))
        return plans

    def _act(self, events: Sequence[Any], samples: list[Any]) -> list[Any]:
        """Plan for one flush's rule events and queue the plans; the flush's samples carry
        what was done in the trace (what happened since the last flush first)."""
        records: list[dict[str, Any]] = []
        plans = self._plan(events, self._progress(samples[-1].step if samples else None,
                                                  samples))
        self._queue(plans, records)
        if self._late_records and samples:
            samples[0] = replace(samples[0], events=tuple(self._late_records) + samples[0].events)
            self._late_records = []
        if records and samples:
            # a dropped step is told at its own step, beside the firings it answers
            at = {x.step: i for i, x in enumerate(samples)}
            for rec in [r for r in records if r["type"] == "dropped" and r["step"] in at]:
                i = at[rec["step"]]
                samples[i] = replace(samples[i], events=samples[i].events + (rec,))
                records.remove(rec)
            if records:
                samples[-1] = replace(samples[-1], events=samples[-1].events + tuple(records))
        if self._pending and self.engine is not None:
            # Restore the detectors' view of the run at the target now, so replay (which reads
            # the engine state from the event) and live stay identical.
            for _, target in self._pending:
                if target is not None and target.extra.get("engine_state") is not None:
                    self._restore_engine(target.extra["engine_state"])
        return samples

    def _queue(self, plans: Sequence[Plan], records: list[dict[str, Any]]) -> None:
        """Send notifications now; queue control plans for the next safe point, recording each
        in the trace (with the engine state of its target, which replay restores)."""
        for p in plans:
            if p.action in ("alert", "resolve", "hook"):
                self._notify(p)
                continue
            target = None
            if p.target is not None and self.store is not None:
                target = next((x for x in reversed(self.store.snapshots)
                               if x.step == p.target), None)
                if target is None:   # the policy chose from what we listed: cannot happen
                    p = Plan("stop", p.rule, p.step, "the snapshot to go back to is gone",
                             EXIT_BUDGET, event=p.event)
            rec: dict[str, Any] = {"type": p.action, "rule": p.rule, "step": p.step}
            if target is not None:
                rec["to_step"] = target.step
                rec["engine_state"] = target.extra.get("engine_state")
            if p.action == "rollback":
                rec["lr_factor"] = p.lr_factor
                if p.replay_drop is not None:
                    rec["replay_drop"] = list(p.replay_drop)
                if p.warmup:
                    rec["warmup"] = p.warmup
                if p.restart:
                    rec["restart"] = True
                if p.probe:
                    rec["probe"] = True   # the measured factor follows in a "probe" event
            if p.action == "lr_recover":
                rec.update(factor=p.lr_factor, steps=p.warmup)
            if p.reason:
                rec["reason"] = p.reason
            if p.params.get("restore"):
                rec["restore"] = p.params["restore"]
                if p.params["restore"] == "best":
                    self._evals.settle()   # the evaluations this flush read count
                    rec["message"] = self._evals.note()
            records.append(rec)
            self.exporter.actions.labels(p.action).inc()
            if p.action == "lr_recover":   # the policy ramps the rate back; nothing to restore
                log.warning("lrwatch: step %d: %s", self.step, p.describe(0, 0), extra=_EVENT)
                continue
            if p.action in ("dropped", "watch", "recovered"):   # nothing to carry out
                log.warning("lrwatch: step %d: %s%s", p.step, f"{p.rule}: " if p.rule else "",
                            p.describe(0, 0), extra=_EVENT)
                continue
            self._pending.append((p, target))

    def _restore_engine(self, state: Mapping[str, Any]) -> None:
        engine = self.engine
        assert engine is not None
        before = engine.active
        engine.load_state_dict(state)
        after = engine.active
        for name, f in before.items():
            if name not in after:
                self.exporter.set_rule_state(name, f.severity, False)
                if "alert" in f.actions:
                    self._notify(Plan("resolve", name, f.step, event=f))

    def _notify(self, d: Plan) -> None:
        # carried by the notifier the daemon uses too (lrwatch/actions/notify.py); the Watcher's
        # sender and hook are public attributes a caller may replace, so it carries the current
        self.notifier.alerts, self.notifier.hook = self.sender, self.hook
        if d.action == "alert":
            self.notifier.fire(d.event)
        elif d.action == "resolve":
            self.notifier.resolve(d.event)
        elif d.action == "hook":
            self.notifier.run_hook(d.event)

    def _safe_point(self) -> bool:
        """Carry out pending training-control plans: the step is complete here.

        Returns whether anything was carried out."""
        acted = bool(self._pending)
        if acted:   # the restored state's own step runs at the ramp's first rate
            self._ramped_at = self.step
        while self._pending:
            p, target = self._pending.pop(0)
            try:
                if p.action in ("rollback", "skip"):
                    self._rollback(p, target)
                elif p.action == "reduce_lr":
                    scale_learning_rate(self.optimizer, self.scheduler, p.lr_factor)
                    log.warning("lrwatch: %s: learning rate x%g at step %d", p.rule,
                                p.lr_factor, self.step, extra=_EVENT)
                elif p.action == "stop":
                    self._stop(p)
            except Exception:
                self._internal_error(f"carrying out {p.action} for {p.rule}")
                if p.action in ("rollback", "skip"):
                    self._stop(Plan("stop", p.rule, p.step, f"{p.action} failed", EXIT_BUDGET))
        return acted

    def _applied_since(self, target: Snapshot) -> int:
        """The optimizer steps since ``target`` that the ``GradScaler`` did not skip: a loop
        that steps its per-step scheduler only on those (the scale did not drop) steps it
        once per applied step, and in a window mostly skipped (an fp16 run's first steps)
        counting every step read it as per-epoch, kept ahead by the steps replayed."""
        skipped = self._snaps.scaler_skips - int(target.extra.get("scaler_skips", 0))
        return self.step - target.step - max(0, skipped)

    def _rollback(self, p: Plan, target: Snapshot | None) -> None:
        assert target is not None and self.store is not None
        live = LiveSchedule(self.optimizer, self.scheduler, LR_GROUP_KEYS)
        # every rank restores, or none does (a rank that cannot stops, and so must the others)
        state = self.dist.all_or_none(target.load, f"loading the snapshot of step {target.step}")
        gained = _gained_keys(self.optimizer, state)
        restore_state(state, self.model, self.optimizer, self.scheduler, self.scaler)
        # steps trained since the flush that decided this, not judged yet (``flush_lag=1``):
        # the trajectory they belong to is abandoned, so the rules never see them
        self._discard_unjudged()
        self._restored_at = self.step
        # per epoch: where the loop is
        if live.keep(state, self._applied_since(target), self.step - target.step):
            live.put_back(self.optimizer, self.scheduler)
            now = self.policy.lr_scale if p.from_scale is None else p.from_scale
            self._to_planned_scale(SimpleNamespace(extra={"lr_scale": now}))  # type: ignore
        else:
            self._to_planned_scale(target, gained, p.from_scale)
        if p.action == "rollback" and p.probe:
            p = self._probe(p, target.step)
        if p.action == "rollback":
            self.store.discard_pending()
            # newer known-good ones too: the rollback abandoned their trajectory (kept, the
            # next failure would go back to one of them instead of further back)
            self.store.discard_after(target.step)
            self._skip_remaining += p.skip_batches
            self.exporter.rollbacks.inc()
            agree = (lambda n: min(self.dist.gather(n))) if self.dist.active else None
            said = p.describe(self.recovery.max_rollbacks,  # type: ignore[union-attr]
                              self.policy.rollbacks)
            said += self._replay.begin(target.step, p.replay_drop, agree)
            log.warning("lrwatch: %s at step %d: %s", p.rule, p.step, said, extra=_EVENT)
            kind = "restart" if p.restart else "rollback"
            self._fire_action_alert(
                kind, "warning", p.rule, p.step,
                f"{p.rule} at step {p.step}: {kind} to step {p.target}, "
                f"learning rate x{p.lr_factor:g}", said,
                {"to_step": str(p.target), "cut": f"{p.lr_factor:g}",
                 "rollbacks": str(self.policy.rollbacks),
                 "max_rollbacks": str(self.recovery.max_rollbacks),  # type: ignore[union-attr]
                 "reason": p.reason})
        else:
            self._replay.forget()
            self.store.discard_pending(after_step=target.step)
            self.exporter.skipped_steps.inc(max(1, self.step - target.step))
            log.warning("lrwatch: %s at step %d: undid steps %d..%d", p.rule, p.step,
                        target.step + 1, self.step, extra=_EVENT)
        self._snaps.forget_awaiting()

    def _to_planned_scale(self, restored: Snapshot, gained: Sequence[tuple[str, ...]] = (),
                          carried: float | None = None) -> None:
        """The learning rates of a snapshot just restored carry the scale of its time; bring
        them to the scale the policy planned (for a skip or a stop: today's). Rate keys the
        groups gained since (:func:`_gained_keys`) carry ``carried`` (default: today's)."""
        then = float(restored.extra.get("lr_scale", 1.0))
        _scale_gained(self.optimizer, gained,
                      then / (self.policy.lr_scale if carried is None else carried))
        rel = self.policy.lr_scale / then
        if rel != 1.0:
            scale_learning_rate(self.optimizer, self.scheduler, rel)

    def _hold(self, batch: Any) -> None:
        """Keep a batch ``batches()`` yields for a replay (and a range test)."""
        if self._recent is not None:
            self._recent.append(batch)
        if self._replay.max_bytes > 0 and self.store is not None:
            oldest = min((x.step for x in self.store.snapshots if not x.pinned), default=None)
            self._replay.hold(self.step + 1, batch, oldest)

    def _ramp_step(self) -> None:
        """One step of the policy's learning-rate ramp (warm-up after a restart, or the
        return of the rate after a one-off fault), once per trained step: a boundary that
        trained nothing (a batch of the skip window; the first one of a run resumed from a
        checkpoint written after this step's boundary) leaves the ramp where it is."""
        if self._ramped_at == self.step:
            return
        self._ramped_at = self.step
        f = self.policy.ramp_step()
        if f is None:
            return
        try:
            scale_learning_rate(self.optimizer, self.scheduler, f)
        except Exception:
            self.policy.cancel_ramp(undo=f)
            self._internal_error("ramping the learning rate")

    def _stop(self, d: Plan) -> None:
        if self.should_stop:
            return
        self.should_stop = True
        self.exit_status = d.exit_status or 3
        self.stop_reason = d.reason or f"rule {d.rule} fired at step {d.step}"
        where = ""
        restore = d.params.get("restore")
        if restore == "best":
            self._stop_restored, said = self._evals.restore_for_stop()
            where = "; " + said
            # Restored: nothing more to restore. None kept: stop as without the parameter.
            restore = None if self._stop_restored is None else "none"
        good = self.store.latest_good() if self.store is not None else None
        if good is not None and (restore == "last_good" or (restore is None
                                                             and d.exit_status == 4)):
            # The run could not be healed: leave it at its last known-good state rather than
            # the diverged one, so the final snapshot is worth resuming from.
            try:
                state = self.dist.all_or_none(good.load,
                                              f"loading the snapshot of step {good.step}")
                gained = _gained_keys(self.optimizer, state)
                restore_state(state, self.model, self.optimizer, self.scheduler, self.scaler)
                # at the rate the run was at (the final snapshot is tagged with it)
                self._to_planned_scale(good, gained)
                where = f"; restored the known-good state of step {good.step}"
            except Exception:
                self._internal_error("restoring the last known-good state before stopping")
        if self._snaps is not None:
            snap = self._snaps.take(self.step, self.data_position)
            if snap is not None:
                where += f"; final snapshot at step {snap.step}" + (
                    f" in {snap.path}" if snap.path else " (in memory)")
        # One line, on the logger (with no handler configured, Python's last-resort handler
        # still prints it to stderr).
        log.error("lrwatch: stopping the run at step %d: %s%s", self.step, self.stop_reason,
                  where, extra=_EVENT)
        budget = d.exit_status == EXIT_BUDGET and "budget" in (d.reason or "")
        self._fire_action_alert(
            "budget_spent" if budget else "stop", "critical", d.rule, self.step,
            f"the run stopped at step {self.step}: {self.stop_reason}",
            f"{self.stop_reason}{where}",
            {"reason": self.stop_reason, "exit_status": str(self.exit_status),
             "rollbacks": str(self.policy.rollbacks)})
