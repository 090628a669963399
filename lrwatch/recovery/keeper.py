"""The Watcher's snapshot bookkeeping: when to snapshot, and what goes with each snapshot.

:class:`SnapshotKeeper` holds the :class:`~lrwatch.actions.snapshot.SnapshotStore` of a run
with recovery, and around it what the store does not know about the run:

- the pinned first snapshot (the state the run starts from, known good by definition), taken
  again after the pre-flight learning-rate check;
- what each snapshot records besides the training state: the policy's learning-rate scale, the
  steps the ``GradScaler`` skipped so far (a rollback reads a scheduler's cadence against the
  steps applied since its target), and
  the rules engine's state as judged at the snapshot's step (``lrwatch replay`` restores it,
  so replay and live agree). A snapshot taken before its step is judged waits for the flush;
- promotion to known good while no training-control rule fires, and the newest known-good
  snapshot from before a failure not answered yet kept from trimming (a ``for:`` window
  longer than ``keep`` snapshot intervals);
- under ``torch.distributed``, one snapshot interval for all ranks, adapted from the slowest
  rank's figures, so every rank snapshots (and rolls back to) the same steps; and one verdict
  on host memory, from every rank's :class:`~lrwatch.actions.host_memory.MemoryReport`, so
  every rank skips the same snapshots (and start checks) when the copies would not fit.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from ..actions.host_memory import MemoryReport, local_report
from ..actions.snapshot import Snapshot, SnapshotStore
from ..samples import Sample
from .policy import (CONTROL_ACTIONS, RecoveryConfig, RecoveryPolicy, SnapshotInfo,
                     unanswered_onset)

__all__ = ["SnapshotKeeper", "steps_not_held_everywhere"]

log = logging.getLogger("lrwatch")


class SnapshotKeeper:
    """Snapshots of the training state (``model``, ``optimizer``, ``scheduler``, ``scaler``)
    tied to the rules ``engine`` and the recovery ``policy`` (see the module docstring)."""

    def __init__(self, recovery: RecoveryConfig, *, engine: Any, policy: RecoveryPolicy,
                 model: Any, optimizer: Any, scheduler: Any, scaler: Any,
                 on_error: Any, deferred_schedule: bool) -> None:
        rc = recovery
        self.store = SnapshotStore(keep=rc.keep, directory=rc.snapshot_dir,
                                   good_after=rc.good_after, budget=rc.budget,
                                   min_interval=rc.min_interval, max_interval=rc.max_interval,
                                   on_error=on_error, deferred_schedule=deferred_schedule)
        self.engine = engine
        self.policy = policy
        self._state = (model, optimizer, scheduler, scaler)
        self._awaiting_engine: dict[int, Snapshot] = {}   # step -> snapshot not yet judged
        self._seconds: list[float] = []   # capture times since the last flush
        self.scaler_skips = 0   # steps the GradScaler skipped so far (the step path counts)

    def rebind_scheduler(self, scheduler: Any) -> None:
        """Snapshots capture (and restore into) ``scheduler`` from now on."""
        model, optimizer, _, scaler = self._state
        self._state = (model, optimizer, scheduler, scaler)

    def extra(self) -> dict[str, Any]:
        """What a snapshot records besides the training state."""
        return {"lr_scale": self.policy.lr_scale, "scaler_skips": self.scaler_skips}

    def take(self, step: int, data_position: int) -> Snapshot | None:
        """A snapshot now, due or not (the final one of a stopped run)."""
        return self.store.take(step, data_position, *self._state, extra=self.extra())

    def take_first(self, step: int, data_position: int) -> None:
        """The state we start from is the first rollback target: known good by definition."""
        first = self.store.take(step, data_position, *self._state, good=True,
                                extra=self.extra(), pinned=True)
        if first is not None:
            first.extra["engine_state"] = self.engine.state_dict()

    def retake_first(self, step: int, data_position: int) -> None:
        """The run's starting point (the pinned snapshot a restart goes back to) is now the
        state at ``step``, with the checked rate (the pre-flight check: still step 0; the
        start check: the shadow it adopted): replace the one taken before the check."""
        for old in sorted({s.step for s in self.store.snapshots if s.pinned}):
            self.store.drop_pinned(old)
        self.take_first(step, data_position)

    def drop_first(self) -> None:
        """Forget the pinned snapshot without taking another (a resumed state that is not
        finite is no run's start: nothing to go back to)."""
        for old in sorted({s.step for s in self.store.snapshots if s.pinned}):
            self.store.drop_pinned(old)

    def take_due(self, step: int, data_position: int, *, restored: bool = False) -> None:
        """A snapshot if the store's schedule says one is due at ``step``; ``restored``: a
        rollback or skip put the run back at this boundary (the state is its target's)."""
        if not self.store.due(step):
            return
        snap = self.take(step, data_position)
        if snap is None:
            return
        self._seconds.append(snap.seconds)
        if self.engine.last_step == snap.step or restored:
            # The flush that judged this step came first (log() flushes, then takes the
            # snapshot): the engine's state now is the one at the snapshot. After a rollback
            # the detectors were put back with the run, so theirs is its state too (no later
            # flush judges this step: what was trained since the target is abandoned).
            snap.extra["engine_state"] = self.engine.state_dict()
        else:
            self._awaiting_engine[snap.step] = snap

    def judged(self, step: int) -> None:
        """The engine has judged ``step``: a snapshot of that step gets the engine's state, and
        while no training-control rule fires the snapshots old enough become known good."""
        snap = self._awaiting_engine.pop(step, None)
        if snap is not None:
            snap.extra["engine_state"] = self.engine.state_dict()
        eng = self.engine
        self.store.keep_before = unanswered_onset(
            eng.open_onsets(), eng.rules, eng.firing_onsets(), self.policy.state.watching_onset)
        if not any(set(f.actions) & set(CONTROL_ACTIONS) for f in self.engine.active.values()):
            promoted = self.store.promote(step)
            if promoted:
                self.policy.promoted(SnapshotInfo(p.step, True, p.pinned) for p in promoted)

    def forget_awaiting(self) -> None:
        """A rollback or skip abandoned the trajectory those snapshots were waiting on."""
        self._awaiting_engine.clear()

    def took_seconds(self) -> float:
        """The longest capture since the last call (0.0 if none), for the ranks to agree on."""
        took = max(self._seconds, default=0.0)
        self._seconds.clear()
        return took

    def memory_report(self) -> MemoryReport:
        """This rank's memory and the bytes of one copy of its state, for the ranks to agree."""
        return local_report(*self._state[:2])

    def agree_memory(self, reports: Sequence[MemoryReport | None]) -> None:
        """Every rank's reports, gathered: the store decides on them from now on (kept as they
        were when some rank sent none)."""
        if reports and all(isinstance(r, MemoryReport) for r in reports):
            self.store.memory_reports = list(reports)   # type: ignore[arg-type]

    def held_steps(self) -> list[int]:
        """The steps of the snapshots this rank holds, for the ranks to agree on."""
        return [s.step for s in self.store.snapshots]

    def agree_held(self, held: Sequence[Sequence[int] | None]) -> None:
        """Every rank's :meth:`held_steps`, gathered: forget the snapshots some rank does not
        hold (its capture failed, or its store trimmed another one), so that a rollback finds
        the same target on every rank (kept as they are when some rank sent none)."""
        drop = steps_not_held_everywhere(held)
        for step in self.store.drop(drop):
            self._awaiting_engine.pop(step, None)
            log.info("lrwatch: snapshot at step %d dropped: another rank does not hold it", step)

    def adapt(self, slowest: float, merged: Sequence[Sample]) -> None:
        """Every rank adapts the snapshot interval from the same (slowest) figures, so all of
        them snapshot at the same steps and a rollback finds the same step everywhere."""
        times = [s.values["step_time_seconds"] for s in merged if "step_time_seconds" in s.values]
        if slowest > 0 and times:
            self.store.adapt(slowest, sorted(times)[len(times) // 2])


def steps_not_held_everywhere(held: Sequence[Sequence[int] | None]) -> set[int]:
    """The snapshot steps some rank holds and another does not (nothing when some rank sent
    no list).

    >>> sorted(steps_not_held_everywhere([[0, 10, 32], [10, 54], [10, 32, 54]]))
    [0, 32, 54]
    """
    if not held or any(h is None for h in held):
        return set()
    sets = [set(h) for h in held]   # type: ignore[arg-type]
    return set.union(*sets) - set.intersection(*sets)
