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

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .curve import LRCurve, RangeTest, geometric_rates, preflight_factor
from .lr_find import BatchLoss, SavedTraining, _cycle, _dist_mean, lr_find, run_range_test
from .policy import RecoveryConfig

__all__ = ["probe_rate", "ProbeResult", "configured_rate", "check_rate"]


@dataclass
class ProbeResult:
    measured: float | None   # the restart rate / the failed rate
    steps: int
    failed_lr: float
    curve: LRCurve


def configured_rate(optimizer: torch.optim.Optimizer, scheduler: Any, scale: float) -> float:
    """Group 0's rate at scale 1: the scheduler's base rate (which carries ``scale``), else
    the optimizer's current rate."""
    base = getattr(scheduler, "base_lrs", None) if scheduler is not None else None
    lr = float(base[0]) if base else float(optimizer.param_groups[0]["lr"])
    return lr / scale if scale > 0 else lr


def probe_rate(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
               scaler: Any, batches: Sequence[Any], batch_loss: BatchLoss,
               config: RecoveryConfig, failed_lr: float, process_group: Any = None,
               reduce: Callable[[float], float] | None = None) -> ProbeResult:
    """Run the range test below ``failed_lr`` and put everything back."""
    test = RangeTest(geometric_rates(failed_lr / config.probe_span, failed_lr,
                                     config.probe_steps),
                     beta=0.7, fraction=config.probe_fraction)
    saved = SavedTraining.capture(model, optimizer, scheduler, scaler)
    try:
        curve = run_range_test(model, optimizer, _cycle(list(batches)), batch_loss, test,
                               scaler=scaler,
                               reduce=reduce if reduce is not None else _dist_mean(process_group))
    finally:
        saved.restore(model, optimizer, scheduler, scaler)
    measured = None if curve.suggestion is None else curve.suggestion / failed_lr
    return ProbeResult(measured, curve.steps, failed_lr, curve)


def check_rate(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
               scaler: Any, batches: Sequence[Any], batch_loss: BatchLoss, lr: float,
               steps: int, process_group: Any = None) -> tuple[float | None, LRCurve]:
    """The pre-flight check (``RecoveryConfig.lr_check``): a ``steps``-step range test from
    ``lr / 1000`` to ``10 lr`` on ``batches`` with everything restored after it, and the
    factor to start the run at (:func:`~lrwatch.recovery.curve.preflight_factor`; ``None``:
    keep ``lr``)."""
    curve = lr_find(model, optimizer, list(batches), batch_loss=batch_loss, scheduler=scheduler,
                    scaler=scaler, min_lr=lr / 1000.0, max_lr=lr * 10.0, num_steps=steps,
                    process_group=process_group)
    return preflight_factor(curve, lr), curve
