"""Learning-rate surgery for rollbacks: scale the optimizer *and* the scheduler consistently.

Restoring a scheduler's state and then multiplying only ``param_groups[i]["lr"]`` is not enough:
closed-form schedulers (``LambdaLR``, ``CosineAnnealingLR`` with ``base_lrs``, ``OneCycleLR``
with ``max_lr``) recompute the learning rate from their base values at the next ``step()`` and
would silently undo the change. So every place a schedule keeps a learning rate is scaled.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["scale_learning_rate"]

# Keys in optimizer param groups that hold learning rates (torch's own schedulers write these).
_GROUP_KEYS = ("lr", "initial_lr", "max_lr", "min_lr", "swa_lr")   # swa_lr: SWALR's target
# Scheduler attributes that hold per-group learning rates.
_SCHED_ATTRS = ("base_lrs", "_last_lr", "max_lrs", "min_lrs", "eta_min")


def _scale(value: Any, factor: float) -> Any:
    if isinstance(value, torch.Tensor):
        with torch.no_grad():
            value.mul_(factor)  # tensor LRs (capturable) are scaled in place on their device
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value * factor
    if isinstance(value, list):
        return [_scale(v, factor) for v in value]
    return value


def scale_learning_rate(optimizer: torch.optim.Optimizer, scheduler: Any, factor: float,
                        group_keys: tuple[str, ...] = _GROUP_KEYS) -> None:
    """Multiply every learning rate the optimizer and scheduler hold by ``factor``.

    Handles param-group keys (``group_keys``: ``lr``, ``initial_lr``, ``max_lr``, ``min_lr``,
    and ``swa_lr``, the rate ``SWALR`` anneals to), the scheduler's
    ``base_lrs``/``_last_lr``/``max_lrs``/``min_lrs``/``eta_min`` and the schedulers nested in
    ``SequentialLR``/``ChainedScheduler``, so the schedule continues, scaled.

    >>> import torch
    >>> p = torch.nn.Parameter(torch.zeros(1))
    >>> opt = torch.optim.SGD([p], lr=1.0)
    >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    >>> scale_learning_rate(opt, sched, 0.5)
    >>> opt.step(); sched.step()
    >>> opt.param_groups[0]["lr"]
    0.25
    """
    for group in optimizer.param_groups:
        for key in group_keys:
            if key in group:
                group[key] = _scale(group[key], factor)
    seen: set[int] = set()
    stack = [scheduler] if scheduler is not None else []
    while stack:
        sched = stack.pop()
        if id(sched) in seen:
            continue
        seen.add(id(sched))
        for attr in _SCHED_ATTRS:
            if hasattr(sched, attr) and getattr(sched, attr) is not None:
                setattr(sched, attr, _scale(getattr(sched, attr), factor))
        stack.extend(getattr(sched, "_schedulers", []) or [])
