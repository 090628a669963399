"""Worker processes for tests/test_distributed_audit15.py (real gloo groups on CPU)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
import torch
from torch import nn

import lrwatch
from distributed_workers import _global_batch, _mine, finish, init
from flag_rules import NONFINITE_ROLLBACK



def _ddp_sgd() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(3)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 1)))
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _sgd_step(model: nn.Module, opt: torch.optim.Optimizer, b: int, rank: int, world: int,
              nan: bool) -> torch.Tensor:
    x, y = _global_batch(b)
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(_mine(x, rank, world)), _mine(y, rank, world))
    if nan:
        loss = loss * float("nan")
    loss.backward()
    opt.step()
    return loss.detach()


def _flat(model: nn.Module) -> list[float]:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()


def replay_of_the_last_batch(rank: int, world: int, store: str, out: str, n: int,
                             flush_every: int, flush_lag: int) -> None:
    """DDP over ``n`` batches, the last one's loss NaN on the last rank, ``replay: True``:
    the final weights must equal those of the same DDP run without that batch (the rollback
    is carried out at the end of the data, and the batches since its snapshot trained again).
    Both runs in one process group: the clean one first, without a Watcher."""
    init(rank, world, store, timeout_s=60)
    nan_at = n - 1
    clean, copt = _ddp_sgd()
    for b in range(n):
        if b != nan_at:
            _sgd_step(clean, copt, b, rank, world, nan=False)
    model, opt = _ddp_sgd()
    rules = Path(out, f"rules{rank}.yml")
    rules.write_text(NONFINITE_ROLLBACK)
    w = lrwatch.Watcher(model, opt, rules=str(rules), flush_every=flush_every,
                        flush_lag=flush_lag,
                        recovery={"good_after": 5, "min_interval": 5, "cooldown": 0,
                                  "replay": True, "guard": "off"})
    seen: list[int] = []
    for b in w.batches(iter(range(n))):
        seen.append(b)
        w.log(loss=_sgd_step(model, opt, b, rank, world, nan=b == nan_at and rank == world - 1))
    w.close()
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "rollbacks": w.policy.rollbacks, "seen": seen, "stopped": w.should_stop,
        "equal": _flat(model) == _flat(clean), "weights": repr(_flat(model))}))
    finish()


def join_with_batches(rank: int, world: int, store: str, out: str) -> None:
    """Uneven data under ``Join(throw_on_early_termination=True)`` through ``watch.batches()``
    with ``flush_lag=1``: the last rank has 12 batches, the others 20, and a flush is in
    flight when the last rank's data runs out (step 12). That rank must not judge it there
    (a gather of its own, met by the others' ``Join`` all-reduce): every rank stops at the
    same step with ``Join``'s error, and ``close()`` judges it on every rank."""
    from torch.distributed.algorithms.join import Join

    init(rank, world, store, timeout_s=30)
    model, opt = _ddp_sgd()
    w = lrwatch.Watcher(model, opt, flush_every=4, flush_lag=1)
    error = None
    try:
        with Join([model], throw_on_early_termination=True):
            for b in w.batches(iter(range(12 if rank == world - 1 else 20))):
                w.log(loss=_sgd_step(model, opt, b, rank, world, nan=False))
    except RuntimeError as exc:
        error = f"{type(exc).__name__}: {exc}"
    w.close()
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "error": error, "step": w.step, "flushes": w.flushes, "weights": repr(_flat(model))}))
    finish()


def _ddp_zero(lr: float = 0.01, bucket_view: bool = False
              ) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    torch.manual_seed(3)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 1)))
    return model, ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam,
                                          lr=lr, parameters_as_bucket_view=bucket_view)


def zero_rollback(rank: int, world: int, store: str, out: str, n: int, nan_at: int,
                  bucket_view: bool) -> None:
    """DDP with ``ZeroRedundancyOptimizer`` (Adam, its state sharded over the ranks) over
    ``n`` batches, batch ``nan_at``'s loss NaN on the last rank, ``replay: True``: every rank
    rolls back to its own shard's snapshot and trains the batches since again, so the final
    weights equal those of the same run without that batch. ``bucket_view``: the parameters
    are views into ZeRO's flat buckets (``parameters_as_bucket_view=True``)."""
    init(rank, world, store, timeout_s=60)
    clean, copt = _ddp_zero(bucket_view=bucket_view)
    for b in range(n):
        if b != nan_at:
            _sgd_step(clean, copt, b, rank, world, nan=False)
    model, opt = _ddp_zero(bucket_view=bucket_view)
    rules = Path(out, f"rules{rank}.yml")
    rules.write_text(NONFINITE_ROLLBACK)
    w = lrwatch.Watcher(model, opt, rules=str(rules), flush_every=4,
                        recovery={"good_after": 5, "min_interval": 5, "cooldown": 0,
                                  "replay": True, "guard": "off"})
    for b in w.batches(iter(range(n))):
        w.log(loss=_sgd_step(model, opt, b, rank, world, nan=b == nan_at and rank == world - 1))
    w.close()
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "rollbacks": w.policy.rollbacks, "stopped": w.should_stop, "step": w.step,
        "equal": _flat(model) == _flat(clean), "weights": repr(_flat(model))}))
    finish()


def zero_shard_on_another_layout(rank: int, world: int, store: str, out: str) -> None:
    """A ZeRO snapshot restored where its shard does not belong: rank 0's on rank 1 (the
    ranks' snapshots swapped), and one of the 2-rank layout into a ZeRO on a group of one
    rank (a run resumed on another world size). Each is refused with an error that names it,
    and the live state is left as it was."""
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from lrwatch.actions.snapshot import capture_state, restore_state

    init(rank, world, store, timeout_s=60)
    model, opt = _ddp_zero()
    for b in range(3):
        _sgd_step(model, opt, b, rank, world, nan=False)
    mine = capture_state(model, opt)
    got: list[Any] = [None] * world
    dist.all_gather_object(got, mine)
    errors = []
    def live() -> list[torch.Tensor]:
        return [v.clone() for s in opt.optim.state.values() for v in s.values()
                if isinstance(v, torch.Tensor)] + [p.detach().clone() for p in model.parameters()]

    for b in range(3, 5):   # (the live state moves on from the snapshot)
        _sgd_step(model, opt, b, rank, world, nan=False)
    before = live()
    try:
        restore_state(got[(rank + 1) % world], model, opt)
    except ValueError as exc:
        errors.append(str(exc))
    after = live()
    groups = [dist.new_group([r]) for r in range(world)]   # (every rank builds every group)
    alone = groups[rank]
    torch.manual_seed(3)
    solo = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 1))
    solo_opt = ZeroRedundancyOptimizer(solo.parameters(), optimizer_class=torch.optim.Adam,
                                       lr=0.01, process_group=alone)
    try:
        restore_state(mine, solo, solo_opt)
    except ValueError as exc:
        errors.append(str(exc))
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "errors": errors, "kept": all(torch.equal(a, b) for a, b in zip(before, after))}))
    finish()


def zero_range_tests(rank: int, world: int, store: str, out: str) -> None:
    """DDP with ``ZeroRedundancyOptimizer`` and ``probe_loss``: the start check and
    ``lr_check`` capture and restore the run's state (each rank its shard) and run on every
    rank; before the fix the start state could not be captured and both were skipped."""
    import logging

    from prometheus_client import generate_latest

    init(rank, world, store, timeout_s=60)
    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    logging.getLogger("lrwatch").addHandler(Keep(logging.INFO))
    logging.getLogger("lrwatch").setLevel(logging.INFO)
    model, opt = _ddp_zero()

    def probe(m: nn.Module, b: int) -> torch.Tensor:
        x, y = _global_batch(b)
        return nn.functional.mse_loss(m(_mine(x, rank, world)), _mine(y, rank, world))

    w = lrwatch.Watcher(model, opt, flush_every=4, probe_loss=probe,
                        recovery={"lr_check": "auto", "guard": "off"})
    for b in w.batches(iter(range(40))):
        w.log(loss=_sgd_step(model, opt, b, rank, world, nan=False))
    w.close()
    errors = [line for line in generate_latest(w.registry).decode().splitlines()
              if line.startswith("lrwatch_internal_errors_total")]
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "checks": [m for m in said if "start check" in m or "learning-rate check" in m],
        "errors": errors, "weights": repr(_flat(model))}))
    finish()
