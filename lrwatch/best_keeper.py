"""The Watcher's side of the best evaluated state: fed from ``log()``, decided at the flush,
put back by ``restore_best()`` and by a stop's ``restore: best``.

:class:`BestKeeper` stands between the Watcher and its
:class:`~lrwatch.actions.best.BestState` (which decides and keeps; ``None`` with
``keep_best=False``, and then every call here does nothing). It knows the model being trained
(the model as it is at a ``log()`` call is the evaluated one: evaluation runs between steps),
says in one sentence what a stop restored, and fails open: a failure while keeping or
restoring is reported through ``on_error`` and training goes on.

A best must never come from a step a rollback abandons. The evaluations a flush reads are
decided once that flush's plans are known (:meth:`BestKeeper.judged`, then
:meth:`BestKeeper.settle`): a rollback or skip drops them when one is of a step after its
target (one pending copy holds the winner only, so they go together), and the evaluations
of steps after the flush that planned it -- the step trained while a lagged flush was in
flight (``flush_lag=1``), an evaluation logged before the safe point -- are dropped there
(:meth:`BestKeeper.abandon`). A number logged then waits for the flush like a tensor (it
would be kept at once). Not covered: a best decided at an earlier flush (or a number judged
at once) on a step that a rollback planned later goes back past; the state keeps no history
to go back to.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Sequence

import torch

from .actions.best import BestEval, BestState, model_state

__all__ = ["BestKeeper"]

log = logging.getLogger("lrwatch")


class BestKeeper:
    """``state`` (or ``None``) for ``model``; ``on_error(what)`` reports a failure from
    inside its ``except`` block (the Watcher counts and logs it); ``all_or_none(call, what)``
    (``RankContext.all_or_none``): under torch.distributed, ``call()`` raising on every rank
    where it raised on any, so that a stop puts the best back on every rank or on none."""

    def __init__(self, state: BestState | None, model: torch.nn.Module,
                 on_error: Callable[[str], None],
                 all_or_none: Callable[[Callable[[], Any], str], Any] | None = None) -> None:
        self.state = state
        self.model = model
        self.on_error = on_error
        self.all_or_none = all_or_none or (lambda call, what: call())
        self._steps: list[int] = []   # the steps of the evaluations pending
        self._read: Sequence[float] | None = None   # their host values, read by a flush

    @property
    def record(self) -> BestEval | None:
        """The best evaluation decided so far, or ``None``."""
        return self.state.record if self.state is not None else None

    def metric_for(self, names: Iterable[str]) -> str | None:
        """The watched metric if ``log()`` was given it (see ``BestState.metric_for``)."""
        return self.state.metric_for(names) if self.state is not None else None

    def offer(self, step: int, value: torch.Tensor | float, hold: bool = False) -> None:
        """An evaluation of the model as it is now; ``hold``: a rollback may still abandon
        its step (a flush in flight, or a rollback waiting for its safe point), so a number
        waits for the flush as a tensor does instead of being judged at once."""
        assert self.state is not None
        if hold and not isinstance(value, torch.Tensor):
            value = torch.tensor(float(value))
        try:
            self.state.offer(step, value, lambda: model_state(self.model))
        except Exception:
            self.abandon()
            self.on_error("keeping the best evaluated state")
            return
        self._steps = self._steps + [step] if self.state.pending else []

    def pending_values(self) -> list[Any]:
        """The device values of evaluations waiting for the flush (their one transfer)."""
        return self.state.pending_values() if self.state is not None else []

    def decide(self, values: Sequence[float]) -> None:
        """Judge the waiting evaluations from their host values."""
        assert self.state is not None
        self._steps, self._read = [], None
        try:
            self.state.decide_at_flush(values)
        except Exception:
            self.on_error("keeping the best evaluated state")

    def judged(self, values: Sequence[float]) -> None:
        """A flush read the waiting evaluations' host values: they are decided by
        :meth:`settle`, once the flush's plans are known."""
        self._read = values

    def settle(self, back_to: int | None = None) -> None:
        """Decide the evaluations a flush read (:meth:`judged`), or drop them when the flush
        planned going back to step ``back_to`` and one of them is of a later step."""
        values, self._read = self._read, None
        if values is None:
            return
        if back_to is not None and any(s > back_to for s in self._steps):
            self.abandon()
        else:
            self.decide(values)

    def abandon(self) -> None:
        """Drop the evaluations not decided yet: the trajectory of their steps is abandoned."""
        self._steps, self._read = [], None
        if self.state is not None:
            self.state.discard_pending()

    def restore(self) -> BestEval | None:
        """Load the kept state into the model (``restore_best()``); a warning if none is kept."""
        if self.state is None:
            return None
        restored = self.state.restore(self.model)
        if restored is None:
            log.warning("lrwatch: restore_best(): no best evaluated state is kept")
        return restored

    def note(self) -> str:
        """What a ``restore: best`` stop restored, for the log and the trace."""
        rec = self.record
        if rec is None:
            return "no best evaluated state was kept, so none was restored"
        return f"restored {rec.describe()}"

    def restore_for_stop(self) -> tuple[BestEval | None, str]:
        """Put the best evaluated state back before stopping: what was restored (``None``
        when nothing was) and what was done, for the log."""
        if self.state is None:
            return None, self.note()
        state = self.state
        try:   # (every rank loads, one without a best too: the agreement is collective)
            restored = state.restore(self.model, load=lambda: self.all_or_none(
                state.load, "loading the best evaluated state"))
        except Exception:
            self.on_error("restoring the best evaluated state before stopping")
            return None, "restoring the best evaluated state failed, so none was restored"
        return restored, self.note()
