"""The Watcher's checkpoint: what :meth:`Checkpointing.state_dict` saves (counters, the
recovery policy, the detectors, the best evaluation) and how
:meth:`Checkpointing.load_state_dict` resumes a run from it.

:class:`Checkpointing` is a mixin over the Watcher's state (``step``, ``data_position``,
``policy``, ``engine``, ``best``, ``store``, ``_snaps``, ``dist``, ``model``, ``_closed``)
and its ``_resume_at`` (:mod:`lrwatch.flushing`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

from .actions.snapshot import all_finite
from .errors import ConfigError
from .recovery.executor import adopt_before_failure, before_failure

__all__ = ["Checkpointing"]

log = logging.getLogger("lrwatch")


class Checkpointing:
    """The Watcher's ``state_dict`` and ``load_state_dict`` (see the module docstring)."""

    # attributes the Watcher provides (declared for readers and type checkers)
    step: int
    data_position: int
    policy: Any
    engine: Any
    best: Any
    store: Any
    dist: Any
    model: Any
    _snaps: Any
    _closed: bool
    _skip_remaining: int
    _ramped_at: int | None
    _late_records: list[Any]
    _resume_at: Callable[[int], int]

    def state_dict(self) -> dict[str, Any]:
        """Counters and detector state, so a resumed run keeps its rules and rollback budget.

        The detectors' state is the one of the last flush judged: steps not flushed yet, or
        whose flush is still in flight (``flush_lag=1``), are not in it (landing one here
        could plan a rollback the checkpoint would not carry out, and under torch.distributed
        would need every rank, where a framework may call this on rank 0 alone). A failure
        waiting for its rollback names the snapshots on disk from before it (resumable)."""
        return {"step": self.step, "data_position": self.data_position,
                "skip_remaining": self._skip_remaining, "ramped_at": self._ramped_at,
                "policy": self.policy.state_dict(),
                "engine": self.engine.state_dict() if self.engine is not None else None,
                "best": self.best.state_dict() if self.best is not None else None,
                "before_failure": before_failure(self.policy.state, self.store, self.dist.active)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`, once the model and optimizer hold their resumed
        state: the state they hold now becomes the run's start (the snapshot a restart goes
        back to), with the rate's scale and the detectors' state just loaded (a failure from
        before it rolls back to a snapshot the checkpoint named, or stops the run).

        Raises :class:`~lrwatch.errors.ConfigError` on a closed Watcher (its trace, hooks and
        server are gone): load before ``close()``, or build a new Watcher and load into that."""
        if self._closed:
            raise ConfigError("load_state_dict() on a closed Watcher: its trace, hooks and "
                              "server are gone, and loading would open its trace again. "
                              "Build a new Watcher for the resumed run and call its "
                              "load_state_dict(), or load before close()")
        self.step = int(state["step"])
        self.data_position = int(state.get("data_position", 0))
        self._skip_remaining = int(state.get("skip_remaining", 0))
        self._ramped_at = state.get("ramped_at")   # this step's ramp step already taken
        policy = dict(state.get("policy", {}))
        for key in ("lr_scale", "ramp"):   # kept beside the policy before version 0.x
            if key in state and key not in policy:
                policy[key] = state[key]
        policy["resumed_at"] = self.step
        self.policy.load_state_dict(policy)
        if self.engine is not None and state.get("engine") is not None:
            self.engine.load_state_dict(state["engine"])
        if self.best is not None and state.get("best"):
            self.best.load_state_dict(state["best"])
        # the trace goes on from the checkpoint; replay loads the detectors' state from here
        kept = self._resume_at(self.step)
        if self.engine is not None:
            self._late_records.append({"type": "resume", "step": self.step, "trace_lines": kept,
                                       "engine_state": self.engine.state_dict()})
        if self._snaps is not None:
            self._resume_start(state)

    def _resume_start(self, state: Mapping[str, Any]) -> None:
        """The resumed state becomes the run's first snapshot (it was taken before the
        policy's scale was known); the snapshots the checkpoint named go before it."""
        if all_finite(self.model):
            self._snaps.retake_first(self.step, self.data_position)
        else:   # a checkpoint written after a failure its flush had not judged yet
            self._snaps.drop_first()
            log.warning("lrwatch: the resumed weights are not all finite (the checkpoint "
                        "was written after a failure lrwatch had not judged yet): there is "
                        "no state to roll back to, so a rollback will stop the run; resume "
                        "from an earlier checkpoint")
        adopt_before_failure(self.store, state.get("before_failure") or ())
