"""The mid-run rate check's decisions (issue 13, sixteenth round): when it is due, and whether
a shadow at a lower rate did better. Pure (no torch); the executor trains the shadow
(:mod:`lrwatch.recovery.shadow`, as for the start check) and carries the verdict out.

A rate a few times too high often neither blows up nor stalls in a way a rule can read: the
loss falls to a level set by the rate (the noise of the steps keeps the weights bouncing
across a valley they cannot settle in), then jitters there. On blind set AK the deep-kernel
regression at 3x and 10x its tuned rate ended its 300 steps 0.06-0.7 above its healthy
median's held-out loss (0.46; out of its band) with no rule firing (docs/recovery.md, "The
mid-run rate check"). From the run's state a few dozen steps in, a copy trained on the same
batches at a fraction of the rate settles lower at once in that regime, and does worse where
the run is still making progress at its own rate (a tuned run), which a few held-out batches
tell apart.

The check runs at step ``mid_check_first``, then at twice the step the last one ran from (100,
200, 400, ...: a long run pays for a few checks, not one per window), only in runs without a
learning-rate scheduler (a schedule anneals the run itself, as with the stall cut), not during
a restart's warm-up or a rollback's probation, and not once the run has been stopped. Each
check is booked against the run's budget like the start check: its shadow's steps and its
held-out forwards.
"""

from __future__ import annotations

from typing import Any, Sequence

from .start_check import StartVerdict, compare

__all__ = ["MidCheckBooking"]


class MidCheckBooking:
    """Mixed into :class:`~lrwatch.recovery.policy.RecoveryPolicy`: reads ``self.config``
    (a ``RecoveryConfig`` or ``None``), ``self.scheduled`` and books into ``self.state``
    (``mid_checks``, ``mid_adopted``, ``mid_check_next``, ``probes``, ``probe_steps``), which ``state_dict``
    carries."""

    config: Any
    state: Any
    scheduled: bool

    def mid_check_step(self) -> int | None:
        """The step the next mid-run check is due at, or ``None`` where none is asked for."""
        rc = self.config
        if rc is None or rc.mid_check != "auto":
            return None
        return self.state.mid_check_next or rc.mid_check_first

    def mid_check_due(self, step: int) -> bool:
        """Whether a mid-run check should start at ``step`` (its shadow starts from the state
        after ``step`` steps): due by the schedule, in a run without a scheduler, not while a
        warm-up ramp runs, a probation lasts, a sudden failure is watched or after a stop.

        >>> from lrwatch.recovery.config import RecoveryConfig
        >>> from lrwatch.recovery.policy import RecoveryPolicy
        >>> pol = RecoveryPolicy(RecoveryConfig(mid_check="auto", mid_check_first=40))
        >>> [s for s in (39, 40, 41, 79, 80) if pol.mid_check_due(s)]
        [40, 41, 79, 80]
        >>> pol.mid_checked(40, 8, adopted=False); pol.mid_check_step()
        80
        >>> pol.scheduled = True; pol.mid_check_due(100)
        False
        """
        at = self.mid_check_step()
        st = self.state
        return (at is not None and step >= at and not self.scheduled and not st.ramp
                and not st.on_probation(step) and st.watching is None and not st.stopped)

    def mid_check_verdict(self, real: Sequence[float], shadow: Sequence[float]
                          ) -> StartVerdict:
        """Adopt the shadow when its held-out losses are lower than the run's by
        ``mid_check_margin`` of the run's with the start check's confidence (a one-sided
        paired t-test, :func:`~lrwatch.recovery.start_check.compare`)."""
        return compare(real, shadow, self.config.start_check_confidence,
                       self.config.mid_check_margin)

    def mid_checked(self, step: int, cost: int, adopted: bool) -> None:
        """The executor ran the check that started at ``step`` (``cost`` steps' worth, booked
        against the budget like a probe; 0 where it gave it up): the next one is due at twice
        that step."""
        st = self.state
        st.mid_checks += 1
        st.mid_check_next = 2 * max(step, 1)
        if adopted:
            st.mid_adopted += 1
        if cost:
            st.probes += 1
            st.probe_steps += cost
