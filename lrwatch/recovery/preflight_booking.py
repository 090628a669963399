"""The pre-flight checks' bookkeeping of :class:`~lrwatch.recovery.policy.RecoveryPolicy`:
whether the learning-rate check and the start check are due, and their cost booked against
the run's budget like a probe. Pure (no torch); the executor runs the checks."""

from __future__ import annotations

from typing import Any, Sequence

from .start_check import StartVerdict, compare


class PreflightBooking:
    """Mixed into the policy: reads ``self.config`` (a ``RecoveryConfig`` or ``None``) and
    books into ``self.state`` (its ``PolicyState``: ``lr_checked``, ``start_checked``,
    ``probes``, ``probe_steps``), which ``state_dict`` carries."""

    config: Any
    state: Any

    def lr_check_due(self, step: int) -> bool:
        """Whether the pre-flight range test should run now: asked for, not run yet, and the
        run has not started (a resumed run keeps the rate it was checked at)."""
        rc = self.config
        return (rc is not None and rc.lr_check == "auto" and not self.state.lr_checked
                and step == 0)

    def lr_checked(self, steps: int) -> None:
        """The executor ran the pre-flight test (``steps`` of it): booked like a probe, against
        the run's budget, and never run again (``state_dict`` keeps it)."""
        st = self.state
        st.lr_checked = True
        if steps:
            st.probes += 1
            st.probe_steps += steps

    def start_check_due(self, step: int) -> bool:
        """Whether the start check should be set up now: asked for, not done yet, and the run
        has not started (a resumed run keeps the rate it has)."""
        rc = self.config
        return (rc is not None and rc.start_check == "auto" and not self.state.start_checked
                and step == 0)

    def start_checked(self, cost: int, real: Sequence[float] | None = None,
                      shadow: Sequence[float] | None = None) -> StartVerdict | None:
        """The executor ran the start check (``cost`` steps' worth, booked against the budget
        like a probe) or gave it up (``real`` None). Returns the verdict: adopt the shadow or
        keep the run. Never run again (``state_dict`` keeps it)."""
        st, rc = self.state, self.config
        st.start_checked = True
        if cost:
            st.probes += 1
            st.probe_steps += cost
        if rc is None or real is None or shadow is None:
            return None
        return compare(real, shadow, rc.start_check_confidence)
