"""Worker processes for tests/test_distributed_audit15.py (real gloo groups on CPU)."""

from __future__ import annotations

import json
from pathlib import Path
import torch
from torch import nn

import lrwatch
from distributed_workers import _global_batch, _mine, finish, init

_NONFINITE_ROLLBACK = """version: 1
rules:
  - name: nonfinite
    metric: loss
    detector: nonfinite
    severity: critical
    actions: [rollback]
"""


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
    rules.write_text(_NONFINITE_ROLLBACK)
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
