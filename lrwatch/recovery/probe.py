"""The range test a rollback runs from the restored state (torch side of a ``probe`` plan).

The policy plans a rollback with ``probe=True`` when its fixed factor would be a guess; the
executor restores the snapshot, then calls :func:`probe_rate`: a short range test (default
15 steps, rates from the failed rate / ``probe_span`` up to the failed rate) on recent
batches, after which every piece of state is put back exactly (:class:`SavedTraining`). The
measured rate, as a multiple of the failed one, goes back to the policy
(:meth:`~lrwatch.recovery.policy.RecoveryPolicy.probed`). Under ``torch.distributed`` the loss
of every step is averaged over the ranks, so all of them stop at the same step and measure the
same rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .curve import DEFAULT_FRACTION, LRCurve, RangeTest, geometric_rates, preflight_factor
from .lr_find import (BatchLoss, SavedTraining, _cycle, _dist_mean, agreed_loss, leading_rate,
                      run_range_test)
from .policy import RecoveryConfig

__all__ = ["probe_rate", "ProbeResult", "configured_rate", "check_rate", "check_cost",
           "FORWARD_COST"]


@dataclass
class ProbeResult:
    measured: float | None   # the restart rate / the failed rate
    steps: int
    failed_lr: float
    curve: LRCurve


def configured_rate(optimizer: torch.optim.Optimizer, scheduler: Any, scale: float) -> float:
    """Group 0's rate at scale 1: the scheduler's base rate (which carries ``scale``), else
    the optimizer's current rate; for a group 0 frozen at rate 0, the rate of the first group
    with one (the group a range test's rates are: ``leading_rate``)."""
    base = getattr(scheduler, "base_lrs", None) if scheduler is not None else None
    lr = float(base[0]) if base else float(optimizer.param_groups[0]["lr"])
    if not lr > 0:
        lr = leading_rate(optimizer, scheduler)[1]
    return lr / scale if scale > 0 else lr


def probe_rate(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
               scaler: Any, batches: Sequence[Any], batch_loss: BatchLoss,
               config: RecoveryConfig, failed_lr: float, process_group: Any = None,
               reduce: Callable[[float], float] | None = None) -> ProbeResult:
    """Run the range test below ``failed_lr`` and put everything back."""
    test = RangeTest(geometric_rates(failed_lr / config.probe_span, failed_lr,
                                     config.probe_steps),
                     beta=0.7, fraction=config.probe_fraction)
    reduce = reduce if reduce is not None else _dist_mean(process_group)
    if reduce is not None:   # a probe_loss failing on one rank stops the test on every rank
        batch_loss = agreed_loss(batch_loss, reduce)
    saved = SavedTraining.capture(model, optimizer, scheduler, scaler)
    try:
        curve = run_range_test(model, optimizer, _cycle(list(batches)), batch_loss, test,
                               scaler=scaler, reduce=reduce, clip=config.clip_grad_norm,
                               scheduler=scheduler)
    finally:
        saved.restore(model, optimizer, scheduler, scaler)
    measured = None if curve.suggestion is None else curve.suggestion / failed_lr
    return ProbeResult(measured, curve.steps, failed_lr, curve)


#: A forward pass without a backward, in training steps: a third (the backward costs about
#: two forwards in FLOPs). Measured on the family suite's CPU tasks it is 0.04-0.22 of a
#: step (``benchmarks/recovery_preflight.py --cost``), so booking a third is on the safe side.
FORWARD_COST = 1.0 / 3.0


def check_cost(curve: LRCurve) -> int:
    """What a pre-flight test cost in training steps: its steps plus its reference forwards
    at :data:`FORWARD_COST`, rounded up (booked against the run's budget)."""
    forwards = int(curve.extra.get("forwards", 0))
    return curve.steps + math.ceil(forwards * FORWARD_COST - 1e-9)


def check_rate(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
               scaler: Any, batches: Sequence[Any], batch_loss: BatchLoss, lr: float,
               steps: int, process_group: Any = None,
               clip: float | None = None) -> tuple[float | None, LRCurve]:
    """The pre-flight check (``RecoveryConfig.lr_check``): a ``steps``-step range test from
    ``lr / 1000`` to ``10 lr`` on ``batches``, scored on the first batch's loss after every
    step (one extra forward each: the curve then follows the model, not the differences
    between batches), with everything restored after it, and the factor to start the run at
    (:func:`~lrwatch.recovery.curve.preflight_factor`; ``None``: keep ``lr``)."""
    batches = list(batches)
    test = RangeTest(geometric_rates(lr / 1000.0, lr * 10.0, steps), beta=0.9,
                     fraction=DEFAULT_FRACTION)
    reduce = _dist_mean(process_group)
    if reduce is not None:   # a probe_loss failing on one rank stops the test on every rank
        batch_loss = agreed_loss(batch_loss, reduce)
    saved = SavedTraining.capture(model, optimizer, scheduler, scaler)
    try:
        curve = run_range_test(model, optimizer, _cycle(batches), batch_loss, test,
                               scaler=scaler, reduce=reduce, reference=batches[0], clip=clip,
                               scheduler=scheduler)
    finally:
        saved.restore(model, optimizer, scheduler, scaler)
    return preflight_factor(curve, lr), curve
