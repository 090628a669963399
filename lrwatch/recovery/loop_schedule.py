"""A schedule the loop steps at its own cadence (per epoch), kept where the loop is across a
rollback.

A rollback restores the scheduler's state with the model's: right for a scheduler stepped with
every optimizer step, whose steps since the snapshot are trained again (the replayed batches,
or new ones, each followed by its ``scheduler.step()``). A scheduler the loop steps once per
epoch (``StepLR``, ``CosineAnnealingLR`` over epochs, ``ReduceLROnPlateau`` on a validation
loss) is stepped at the end of the loop's epoch, which no rollback replays: restored to the
snapshot's epoch, it stayed one epoch behind the loop for the rest of the run for every epoch
end the rollback went back across (a `StepLR` halving per epoch ended the run at twice its
rate). Such a scheduler keeps its state and the rates it set, as the loop left them; the
rollback's cut applies to them as to restored ones.

Which cadence a scheduler has is read off the rollback itself (:func:`follows_loop`): how many
times it was stepped since the snapshot against how many optimizer steps were applied (those
a ``GradScaler`` skipped left out: a loop may step its per-step scheduler only on the others),
and, where it was stepped more often than that, against every step taken.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch

__all__ = ["follows_loop", "LiveSchedule"]


def follows_loop(sched_steps: int, opt_steps: int, all_steps: int | None = None) -> bool:
    """Whether a scheduler stepped ``sched_steps`` times over ``opt_steps`` optimizer steps
    applied (of ``all_steps`` taken, the ``GradScaler``'s skipped ones included; default:
    none skipped) follows the loop's own cadence rather than the steps: stepped at least
    once, and at most half as often as the optimizer applied a step (a per-step scheduler
    that missed a few steps is not). One stepped more often than the steps applied steps
    with them all, skipped ones included, or follows the loop: the latter where it was
    stepped at most half as often as all the steps (an epoch end in a window the scaler
    skipped entirely: the rollback would otherwise lose that epoch's stepping).

    >>> follows_loop(1, 4), follows_loop(0, 4), follows_loop(4, 4), follows_loop(3, 4)
    (True, False, False, False)
    >>> follows_loop(1, 0, 4), follows_loop(2, 2, 4), follows_loop(4, 2, 4)
    (True, False, False)
    """
    if all_steps is None:
        all_steps = opt_steps
    return 0 < sched_steps and (2 * sched_steps <= opt_steps
                                or opt_steps < sched_steps and 2 * sched_steps <= all_steps)


def _counter(state: Any) -> int | None:
    """The step count in a scheduler's ``state_dict`` (``last_epoch``; a ``ChainedScheduler``:
    its first scheduler's)."""
    if not isinstance(state, Mapping):
        return None
    n = state.get("last_epoch")
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    inner = state.get("_schedulers")
    return _counter(inner[0]) if isinstance(inner, list) and inner else None


class LiveSchedule:
    """The scheduler's state before a rollback's restore, and the rates it gives the groups
    (each group's rate the one it set last, ``_last_lr``; the other rate keys as they are)."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any,
                 keys: Sequence[str]) -> None:
        self.state: Any = None
        self.rates: list[dict[str, Any]] = []
        self.kind = type(scheduler).__qualname__
        try:
            self.state = copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None
        except Exception:   # (a scheduler of one's own without one: restored as before)
            self.state = None
        if _counter(self.state) is not None:
            # the rate each group has by the schedule: the one the scheduler set last, not
            # the group's "lr" now (a rate bomb, the loop's own change mid-epoch)
            last = self.state.get("_last_lr")
            groups = optimizer.param_groups
            if not (isinstance(last, list) and len(last) == len(groups)):
                self.state = None   # (no rates to go by: restored as before)
                return
            self.rates = [{**{k: copy.deepcopy(g[k]) for k in keys if k in g and k != "lr"},
                           "lr": copy.deepcopy(lr)} for g, lr in zip(groups, last)]

    def keep(self, restored: Mapping[str, Any], opt_steps: int,
             all_steps: int | None = None) -> bool:
        """Whether to keep this state instead of ``restored``'s (a snapshot's state) after
        ``opt_steps`` optimizer steps applied since it, of ``all_steps``: see
        :func:`follows_loop`."""
        if restored.get("scheduler_type") not in (None, self.kind):
            return False   # (another scheduler's state, from before a swap: not loaded)
        now, then = _counter(self.state), _counter(restored.get("scheduler"))
        return now is not None and then is not None and follows_loop(now - then, opt_steps, all_steps)

    def put_back(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        """The scheduler's state and the groups' rates as they were (a tensor rate in place)."""
        scheduler.load_state_dict(self.state)
        for group, rates in zip(optimizer.param_groups, self.rates):
            for key, value in rates.items():
                if isinstance(group.get(key), torch.Tensor) and isinstance(value, torch.Tensor):
                    with torch.no_grad():
                        group[key].copy_(value)
                else:
                    group[key] = value
