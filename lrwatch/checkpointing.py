"""The Watcher's checkpoint: what :meth:`Checkpointing.state_dict` saves (counters, the
recovery policy, the detectors, the best evaluation) and how
:meth:`Checkpointing.load_state_dict` resumes a run from it.

:class:`Checkpointing` is a mixin over the Watcher's state (``step``, ``data_position``,
``policy``, ``engine``, ``best``, ``store``, ``_snaps``, ``dist``, ``model``, ``_closed``)
and its ``_resume_at``, ``_unjudged`` and ``_judge_samples`` (:mod:`lrwatch.flushing`).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any, Callable, Mapping

from .actions.snapshot import all_finite
from .errors import ConfigError
from .recovery.executor import adopt_before_failure, before_failure
from .recovery.policy import open_failure
from .samples import Sample
from .trace import encode_sample, parse_record

__all__ = ["Checkpointing"]

log = logging.getLogger("lrwatch")


class Checkpointing:
    """The Watcher's ``state_dict`` and ``load_state_dict`` (see the module docstring)."""

    # attributes the Watcher provides (declared for readers and type checkers)
    step: int
    data_position: int
    skipped_batches: int
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
    _unjudged: Callable[[], list[Sample]]
    _judge_samples: Callable[[list[Sample], bool], list[Sample]]
    _last_flush: tuple[int, int, tuple[str, ...]] | None

    def state_dict(self) -> dict[str, Any]:
        """Counters and detector state, so a resumed run keeps its rules and rollback budget.

        The detectors' state is the one of the last flush judged: steps not flushed yet, or
        whose flush is still in flight (``flush_lag=1``), are not in it (landing one here
        could plan a rollback the checkpoint would not carry out, and under torch.distributed
        would need every rank, where a framework may call this on rank 0 alone). A failure
        waiting for its rollback names the snapshots on disk from before it (resumable).

        The steps not judged yet go with it as trace records (``"unjudged"``; this waits for
        the device once), and the resumed Watcher judges them first: a failure among them is
        not lost with the process. Not under torch.distributed, where judging needs every
        rank's rows. The snapshots on disk from before those steps go with it too, as for a
        failure waiting for its rollback. Written right after the flush that judged its own
        step (``flush_lag=0``; with ``flush_lag=1`` that flush is in flight and goes with it
        unjudged), the rules that began firing on that flush's steps go with it
        (``"fired_late"``): the last step's update shows only in the resumed run's samples,
        so the resumed state is not known good, whichever the flush lag. With ``snapshot_dir``
        the snapshots on disk from before the checkpoint's step go with it in any case (its
        last update is measured only by the resumed run's samples)."""
        unjudged = [] if self.dist.active else [encode_sample(x) for x in self._unjudged()]
        late = self._fired_late(unjudged)
        return {"step": self.step, "data_position": self.data_position,
                "skipped_batches": self.skipped_batches,
                "skip_remaining": self._skip_remaining, "ramped_at": self._ramped_at,
                "policy": self.policy.state_dict(),
                "engine": self.engine.state_dict() if self.engine is not None else None,
                "best": self.best.state_dict() if self.best is not None else None,
                "before_failure": before_failure(self._failure_since(unjudged, late),
                                                 self.store, self.dist.active),
                "unjudged": unjudged, "fired_late": late}

    def _fired_late(self, unjudged: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The rules that began firing on the steps of the flush that judged the checkpoint's
        own step, with nothing after it (what a checkpoint with ``flush_lag=1`` carries
        unjudged instead); ``None`` where none did. Not under torch.distributed, as for the
        steps not judged."""
        last = self._last_flush
        if unjudged or self.dist.active or last is None or last[1] != self.step or not last[2]:
            return None
        return {"from": last[0], "to": last[1], "rules": list(last[2])}

    def _failure_since(self, unjudged: list[dict[str, Any]],
                       late: Mapping[str, Any] | None = None) -> Any:
        """The policy's state for :func:`before_failure`, with the earliest step a failure
        not rolled back yet may have begun: the first step not judged yet (a failure there
        is judged by the resumed run) or of the flush that fired ``late``, and the onset of
        a training-control rule whose ``for:`` window is under way, or of a rule that feeds
        one through ``when:`` whose window is under way or that fires while a veto holds the
        control rule back (it may fire after the resume: the snapshots on disk from before
        it go with the checkpoint; :func:`open_failure`); at the latest, the checkpoint's own
        step: its last update shows only in the resumed run's samples, so the snapshots on disk
        from before it always go with the checkpoint (references to files the store keeps; a
        failure no rule saw before the checkpoint goes back to one of them)."""
        st = self.policy.state
        eng = self.engine
        opened = open_failure(eng.open_onsets(), eng.rules, eng.firing_onsets()) if (
            eng is not None) else None
        since = [st.watching_step if st.watching is not None else None,
                 st.held_step if st.held is not None else None,
                 unjudged[0]["step"] if unjudged else None, opened,
                 late["from"] if late else None, self.step]
        return SimpleNamespace(watching=True, watching_step=min(x for x in since if x is not None),
                               held=None, held_step=None)

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
        if self.engine is not None and state.get("engine") is not None:
            # first: a state saved under other rules raises before anything else is loaded
            self.engine.load_state_dict(state["engine"])
        self.step = int(state["step"])
        self.data_position = int(state.get("data_position", 0))
        # (not in a checkpoint before the seventeenth round's audit: counted from 0 there)
        self.skipped_batches = int(state.get("skipped_batches", 0))
        self._skip_remaining = int(state.get("skip_remaining", 0))
        self._ramped_at = state.get("ramped_at")   # this step's ramp step already taken
        policy = dict(state.get("policy", {}))
        for key in ("lr_scale", "ramp"):   # kept beside the policy before version 0.x
            if key in state and key not in policy:
                policy[key] = state[key]
        policy["resumed_at"] = self.step
        self.policy.load_state_dict(policy)
        if self.best is not None and state.get("best"):
            self.best.load_state_dict(state["best"])
        # the trace goes on from the checkpoint
        kept = self._resume_at(self.step)
        if self._snaps is not None:
            self._resume_start(state)
        late, self._late_records = self._late_records, []
        carried = [] if self.dist.active else [parse_record(r) for r in state.get("unjudged") or ()]
        if carried:   # what the predecessor had not judged: its plans go to the first boundary
            late += self._judge_carried(carried)
        elif state.get("fired_late"):
            fired = state["fired_late"]
            self._not_known_good(list(fired["rules"]), int(fired["from"]), int(fired["to"]))
        if self.engine is not None:   # replay loads the detectors' state from here
            late.insert(0, {"type": "resume", "step": self.step, "trace_lines": kept,
                            "engine_state": self.engine.state_dict()})
        self._late_records = late

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

    def _judge_carried(self, carried: list[Sample]) -> list[dict[str, Any]]:
        """Judge the steps the checkpoint had not judged, before the resumed run's first (not
        written again: the trace keeps the lines up to the checkpoint as the predecessor
        wrote them, or lacks them); what was decided on them besides the firings, for the
        trace's next line. Where a rule began firing on one of them, the resumed state came
        out of a failure the rules saw too late: it is no known-good start (a rollback to it
        would undo nothing) until ``good_after`` quiet steps promote it, as any snapshot of
        a step not judged yet."""
        judged = self._judge_samples(carried, emit=False)
        decided = [dict(e) for x in judged for e in x.events
                   if e.get("type") not in ("firing", "resolved")]
        first = self._resume_snapshot()
        if first is None:
            return decided
        first.extra["engine_state"] = self.engine.state_dict()   # judged through its step now
        fired = sorted({str(e.get("rule")) for x in judged for e in x.events
                        if e.get("type") == "firing"})
        self._not_known_good(fired, carried[0].step, carried[-1].step)
        return decided

    def _resume_snapshot(self) -> Any:
        """The pinned snapshot of the resumed state, or ``None``."""
        if self.store is None:
            return None
        return next((x for x in self.store.snapshots if x.pinned and x.step == self.step),
                    None)

    def _not_known_good(self, fired: list[str], first_step: int, last_step: int) -> None:
        """``fired`` began firing on steps ``first_step``-``last_step``, which the checkpoint
        had not judged, or judged in the flush it was written right after: the resumed state
        came out of a failure the rules saw late (the last step's update shows only in the
        next samples). It is no known-good start (a rollback to it would undo nothing) until
        ``good_after`` quiet steps promote it, as any snapshot of a step not judged yet."""
        first = self._resume_snapshot()
        if not fired or first is None or not first.good:
            return
        first.good = False
        log.warning("lrwatch: %s began firing on steps %d-%d, which the checkpoint had not "
                    "judged when it was written, or judged right before it: the resumed state "
                    "(step %d) is not known good until %d quiet steps pass, and a rollback "
                    "before then stops the run instead of going back to it (it would undo "
                    "nothing); resume from an earlier checkpoint to go back before the failure",
                    ", ".join(fired), first_step, last_step, self.step, self.store.good_after)
