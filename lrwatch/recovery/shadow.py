"""The start check's shadow run (torch side of ``RecoveryConfig.start_check``).

After the run's first steps, :func:`shadow_check` scores the run on held-out batches, trains
a shadow from the run's start state on the same batches at ``factor`` x the rates the run used,
scores it on the same held-out batches, and hands both lists of losses to ``decide`` (the
policy's pure :func:`~lrwatch.recovery.start_check.compare`). When the verdict is to adopt,
the model and optimizer keep the shadow's weights and state, the scheduler and the RNG are
the run's, and every rate is scaled by ``factor`` (the schedule keeps its shape); otherwise
everything is put back as it was. States are kept as CPU copies (:func:`capture_state`), so
the check costs no accelerator memory beyond the run's own. Under ``torch.distributed``
every rank trains its shadow on its own batches and each held-out loss is averaged over the
ranks, so all of them take the same decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch

from ..actions.rollback import scale_learning_rate
from ..actions.snapshot import _set_rng_state, capture_state, cpu_copy, restore_state, settle
from .lr_find import (BatchLoss, _dist_mean, agreed_loss, reference_loss, set_group_rates,
                      train_step)
from .start_check import StartVerdict

__all__ = ["ObservedStart", "ShadowResult", "shadow_check", "group_rates", "same_batches"]


@dataclass
class ShadowResult:
    verdict: StartVerdict
    steps: int       # shadow steps trained
    forwards: int    # held-out forwards (both models)


@dataclass
class ObservedStart:
    """The start check's material when the framework draws the data (the Lightning and
    ``transformers`` callbacks): the start state, the first batches with the rates they were
    trained at, the run after them, then the held-out batches as the run meets them."""

    start: Mapping[str, Any]
    batches: list[Any] = field(default_factory=list)
    rates: list[Any] = field(default_factory=list)
    run_state: Mapping[str, Any] | None = None
    held_out: list[Any] = field(default_factory=list)
    held_out_rates: list[Any] = field(default_factory=list)
    #: why this rank cannot run the check (under ``torch.distributed`` it still goes on to
    #: the check's step, where every rank agrees to skip it); no batch is held from then on
    failed: str | None = None

    def add(self, batch: Any, rates: list[Any]) -> None:
        if self.failed is not None:
            return
        if self.run_state is None:
            self.batches.append(batch)
            self.rates.append(rates)
        else:
            self.held_out.append(batch)
            self.held_out_rates.append(rates)


def group_rates(optimizer: torch.optim.Optimizer) -> list[Any]:
    """The rate of every parameter group now (a tensor rate is copied, not read: no sync)."""
    return [g["lr"].detach().clone() if isinstance(g["lr"], torch.Tensor) else float(g["lr"])
            for g in optimizer.param_groups]


def _set_rates(optimizer: torch.optim.Optimizer, rates: Sequence[Any], factor: float) -> None:
    set_group_rates(optimizer, [lr * factor for lr in rates])


def _grad_sync(model: torch.nn.Module, group: Any) -> Callable[[], None] | None:
    """What averages the shadow's gradients over the ranks (``group``; ``None``: the world, as
    for the held-out losses), or ``None`` where nothing must: no process group, or a wrapper that does it (DDP) or shards them (FSDP, DTensor
    parameters). The framework callbacks hand the Watcher the module inside the DDP wrapper,
    so its shadow steps would otherwise leave every rank with weights of its own."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
        return None
    for m in model.modules():
        if isinstance(m, DistributedDataParallel) or type(m).__name__.startswith(
                ("FullyShardedDataParallel", "FSDP")):
            return None
    params = [p for p in model.parameters() if p.requires_grad]
    if any(type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor" for p in params):
        return None
    world = dist.get_world_size(group)

    def sync() -> None:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, group=group)
                p.grad.div_(world)
    return sync


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: Any,
           batches: Sequence[Any], rates: Sequence[Sequence[Any]], factor: float,
           batch_loss: BatchLoss, agree: Callable[[float], float],
           sync: Callable[[], None] | None = None, clip: float | None = None) -> int:
    """The shadow's steps; stops at a non-finite loss (the shadow is then not adopted). The
    loss is agreed over the ranks, so that all of them stop at the same step."""
    model.train()
    done = 0
    for batch, lrs in zip(batches, rates):
        _set_rates(optimizer, lrs, factor)
        loss = train_step(model, optimizer, scaler, batch_loss, batch, sync, clip)
        done += 1
        if not math.isfinite(agree(float(loss.detach()))):   # a one-off check: it may sync
            break
    optimizer.zero_grad(set_to_none=True)
    return done


def shadow_check(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 scaler: Any, start: Mapping[str, Any], batches: Sequence[Any],
                 rates: Sequence[Sequence[Any]], held_out: Sequence[Any],
                 batch_loss: BatchLoss, factor: float,
                 decide: Callable[[list[float], list[float]], StartVerdict | None],
                 process_group: Any = None, run_state: Mapping[str, Any] | None = None,
                 held_out_rates: Sequence[Sequence[Any]] = (),
                 clip: float | None = None) -> ShadowResult | None:
    """Run the check (see the module docstring). ``start``: :func:`capture_state` of the run
    before its first step; ``rates[i]``: the groups' rates batch ``i`` was trained at.
    Returns ``None`` when ``decide`` gives no verdict (the run is then as it was).

    ``run_state`` (adapters whose framework draws the data, so that the held-out batches are
    known only once the run has trained on them): the run as it was after ``batches``, scored
    in place of the live model; an adopted shadow then also trains on ``held_out`` at
    ``held_out_rates`` x ``factor`` (what the run would have done after adopting it at once).
    ``clip``: the shadow clips its gradients' total norm to it, as the run does."""
    agree = _dist_mean(process_group) or (lambda x: x)
    batch_loss = agreed_loss(batch_loss, agree)
    modes = [(m, m.training) for m in model.modules()]
    lrs_now = group_rates(optimizer)
    now = capture_state(model, optimizer, scheduler, scaler)
    adopted, verdict, steps = False, None, 0
    try:
        if run_state is not None:
            restore_state(run_state, model, optimizer, scheduler, scaler)
        real = [agree(reference_loss(model, batch_loss, b)) for b in held_out]
        restore_state(start, model, optimizer, scheduler, scaler)
        sync = _grad_sync(model, process_group)
        steps = _train(model, optimizer, scaler, batches, rates, factor, batch_loss, agree,
                       sync, clip)
        shadow = [agree(reference_loss(model, batch_loss, b)) for b in held_out]
        if steps < len(batches):
            shadow = [math.inf] * len(held_out)
        verdict = decide(real, shadow)
        if verdict is not None and verdict.adopt and run_state is not None:
            more = _train(model, optimizer, scaler, held_out, held_out_rates, factor,
                          batch_loss, agree, sync, clip)
            steps += more
            if more < len(held_out):    # it blew up on them after all: keep the run
                verdict = replace(verdict, adopt=False,
                                  reason=verdict.reason + "; the shadow then failed on the "
                                  "held-out batches")
        if verdict is not None and verdict.adopt:
            _adopt(optimizer, scheduler, now, lrs_now, factor)
            adopted = True
    finally:
        if not adopted:
            restore_state(now, model, optimizer, scheduler, scaler)
        for m, training in modes:
            m.train(training)
    if verdict is None:
        return None
    return ShadowResult(verdict, steps, 2 * len(held_out))


def _adopt(optimizer: torch.optim.Optimizer, scheduler: Any, now: Mapping[str, Any],
           lrs_now: Sequence[Any], factor: float) -> None:
    """Go on from the shadow: its weights and optimizer state, with the run's schedule
    position and RNG (``now``, the run's state before the check) and the run's rates
    (``lrs_now``) scaled by ``factor``."""
    settle(now)
    if scheduler is not None and now.get("scheduler") is not None:
        scheduler.load_state_dict(cpu_copy(now["scheduler"]))
    _set_rates(optimizer, lrs_now, 1.0)
    _set_rng_state(now["rng"])
    scale_learning_rate(optimizer, scheduler, factor)


def same_batches(a: Any, b: Any) -> bool:
    """Whether two batches (or lists of them: tensors, and dicts, lists and tuples of them)
    hold the same values: the untrained loss's batches against the ones the run trained on
    first, where an adapter drew them by a second pass over the loader (one-off host reads,
    at the start check)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.shape == b.shape and a.dtype == b.dtype
                and bool(torch.equal(a, b.to(a.device))))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same_batches(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_batches(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:
        return False
