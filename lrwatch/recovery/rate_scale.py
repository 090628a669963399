"""The run's learning-rate scale under the recovery policy: a mixin of
:class:`lrwatch.recovery.policy.RecoveryPolicy`, whose state it keeps. Pure: no torch, no I/O.

A rollback cuts the rate (:meth:`RateScale._rollback_cut`: a restart's tenth, a sudden
failure's milder cut with the bad batches left out of the replay, a repeated failure's
compounding cut) and opens a probation episode (:meth:`RateScale._open_episode`); a restart's
warm-up and the rate's recovery after a passed probation are ramps, one factor per step
(:meth:`RateScale.ramp_step`). The plans themselves are the policy's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from .config import RecoveryConfig

if TYPE_CHECKING:   # (policy.py imports this module)
    from .policy import Decision, PolicyState, SnapshotInfo

__all__ = ["RateScale"]


class RateScale:
    """The rate's scale, its ramps and cuts, and the rollback episodes (a mixin; the policy
    provides the rest)."""

    # provided by the policy
    state: PolicyState
    config: RecoveryConfig | None
    auto_warmup: int
    _sudden_now: bool
    _suspects: tuple[int, int] | None

    @property
    def lr_scale(self) -> float:
        return self.state.lr_scale

    # --- progress ----------------------------------------------------------------------------
    def promoted(self, snapshots: Iterable[SnapshotInfo]) -> None:
        """Snapshots became known good: one after the start means the run proved healthy."""
        if any(not s.pinned for s in snapshots):
            self.state.ever_healthy = True

    def ramp_step(self) -> float | None:
        """The factor for this step of a ramp (warm-up or recovery), or ``None``."""
        st = self.state
        if not st.ramp:
            return None
        f = st.ramp.pop(0)
        st.lr_scale *= f
        return f

    def restart_warmup(self) -> float | None:
        """The ``recovery_warmup`` value of the step being recorded: 1.0 while lrwatch's own
        warm-up after a restart is under way, 0.0 after it, ``None`` in a run that was never
        restarted. The training pack's never-learned and dead-network rules stand down on it
        (a loss that stays flat while lrwatch holds the rate low is no verdict on the rate).

        >>> from lrwatch.recovery.policy import (Progress, RecoveryConfig, RecoveryPolicy,
        ...                                      SnapshotInfo)
        >>> pol = RecoveryPolicy(RecoveryConfig(restart_warmup=3))
        >>> pol.restart_warmup() is None
        True
        >>> from types import SimpleNamespace as E
        >>> _ = pol.plan([E(rule="nonfinite", step=5, kind="firing", actions=("rollback",))],
        ...              Progress(5, [SnapshotInfo(0, True, pinned=True)]))
        >>> [(pol.restart_warmup(), pol.ramp_step() is not None) for _ in range(3)]
        [(1.0, True), (1.0, True), (0.0, False)]
        """
        st = self.state
        if not st.restarts:
            return None
        return 1.0 if st.ramp and st.ramp_restart else 0.0

    def cancel_ramp(self, undo: float | None = None) -> None:
        """The executor could not apply a ramp step (``undo``: the factor it failed to apply):
        stop ramping; the rate stays where it is."""
        if undo:
            self.state.lr_scale /= undo
        self.state.ramp = []

    # --- the cut of a rollback -------------------------------------------------------------
    def _rollback_cut(self, d: Decision, restart: bool
                      ) -> tuple[float, int, str | None, Any]:
        """The rollback's rate cut, warm-up, reason and batches to leave out of a replay: a
        restart (the rate was too high from the start), a sudden failure of a healthy run (a
        bad batch: the rate kept), or a failure that repeats (the cut compounds)."""
        st, rc = self.state, self.config
        assert rc is not None
        reason, replay_drop = d.reason, None
        if restart:
            cut = rc.restart_lr_factor * rc.lr_factor ** st.rollback_repeats
            warmup = (rc.restart_warmup if isinstance(rc.restart_warmup, int)
                      else self.auto_warmup)
            why = ("diverged before any state after the start proved healthy: the learning "
                   "rate is too high, not a passing fault")
            reason = f"{reason}; {why}" if reason else why
        elif st.rollback_repeats == 0 and self._sudden_now:
            cut, warmup = rc.sudden_lr_factor, 0
            if rc.replay and self._suspects is not None:
                replay_drop = self._suspects
            why = ("a sudden failure in a healthy run, most likely a bad batch: "
                   f"the rate x{cut:g}")
            reason = f"{reason}; {why}" if reason else why
        else:
            cut = rc.lr_factor ** (1 + st.rollback_repeats)
            warmup = 0
            if st.rollback_repeats and not reason:
                reason = (f"failed again {st.rollback_repeats} time(s) before getting past "
                          "the last failure: the cut compounds")
        return cut, warmup, reason, replay_drop

    def _open_episode(self, step: int, target: SnapshotInfo, cut: float,
                      restart: bool) -> None:
        """Book the rollback into its episode (the rollbacks of one probation) and start the
        probation it opens."""
        st, rc = self.state, self.config
        assert rc is not None
        if st.on_probation(step):
            st.episode_rollbacks += 1
            st.episode_cut *= cut
        else:
            st.episode_rollbacks, st.episode_cut, st.episode_restart = 1, cut, restart
        if st.lr_recovered:
            st.persistent = True    # it failed again after the rate came back: keep the cut
        st.probation_from = step
        st.probation_until = 2 * step - target.step + rc.good_after
