"""The Watcher's side of the best evaluated state: fed from ``log()``, decided at the flush,
put back by ``restore_best()`` and by a stop's ``restore: best``.

:class:`BestKeeper` stands between the Watcher and its
:class:`~lrwatch.actions.best.BestState` (which decides and keeps; ``None`` with
``keep_best=False``, and then every call here does nothing). It knows the model being trained
(the model as it is at a ``log()`` call is the evaluated one: evaluation runs between steps),
says in one sentence what a stop restored, and fails open: a failure while keeping or
restoring is reported through ``on_error`` and training goes on.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Sequence

import torch

from .actions.best import BestEval, BestState

__all__ = ["BestKeeper"]

log = logging.getLogger("lrwatch")


class BestKeeper:
    """``state`` (or ``None``) for ``model``; ``on_error(what)`` reports a failure from
    inside its ``except`` block (the Watcher counts and logs it)."""

    def __init__(self, state: BestState | None, model: torch.nn.Module,
                 on_error: Callable[[str], None]) -> None:
        self.state = state
        self.model = model
        self.on_error = on_error

    @property
    def record(self) -> BestEval | None:
        """The best evaluation decided so far, or ``None``."""
        return self.state.record if self.state is not None else None

    def metric_for(self, names: Iterable[str]) -> str | None:
        """The watched metric if ``log()`` was given it (see ``BestState.metric_for``)."""
        return self.state.metric_for(names) if self.state is not None else None

    def offer(self, step: int, value: torch.Tensor | float) -> None:
        """An evaluation of the model as it is now."""
        assert self.state is not None
        try:
            self.state.offer(step, value, self.model.state_dict)
        except Exception:
            self.state.discard_pending()
            self.on_error("keeping the best evaluated state")

    def pending_values(self) -> list[Any]:
        """The device values of evaluations waiting for the flush (their one transfer)."""
        return self.state.pending_values() if self.state is not None else []

    def decide(self, values: Sequence[float]) -> None:
        """Judge the waiting evaluations from their host values."""
        assert self.state is not None
        try:
            self.state.decide_at_flush(values)
        except Exception:
            self.on_error("keeping the best evaluated state")

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
        if self.state is None or self.state.record is None:
            return None, self.note()
        try:
            restored = self.state.restore(self.model)
        except Exception:
            self.on_error("restoring the best evaluated state before stopping")
            return None, "restoring the best evaluated state failed, so none was restored"
        return restored, self.note()
