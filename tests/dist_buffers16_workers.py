"""Worker processes for the distributed test of tests/actions/test_training_audit16.py:
buffers registered with ``persistent=False`` under DDP (real gloo groups on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

import lrwatch
from distributed_workers import _global_batch, _mine, finish, init
from flag_rules import NONFINITE_ROLLBACK
from run_mean import RunMean


def _ddp() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(3)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(12, 16), RunMean(16), nn.Tanh(), nn.Linear(16, 1)),
        broadcast_buffers=False)   # (each rank keeps its own running mean)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _step(model: nn.Module, opt: torch.optim.Optimizer, b: int, rank: int, world: int,
          nan: bool) -> torch.Tensor:
    x, y = _global_batch(b)
    x = _mine(x, rank, world).clone()
    if nan:
        x[0, 0] = float("nan")
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), _mine(y, rank, world))
    loss.backward()
    opt.step()
    return loss.detach()


def loose_buffer_rollback(rank: int, world: int, store: str, out: str, n: int,
                          nan_at: int) -> None:
    """DDP over ``n`` batches, batch ``nan_at``'s input NaN on the last rank (its running
    mean NaN, every rank's weights NaN through the all-reduce), ``replay: True``: every rank
    rolls back to its own snapshot, its own running mean included, and ends as the run
    without that batch."""
    init(rank, world, store, timeout_s=60)
    clean, copt = _ddp()
    for b in range(n):
        if b != nan_at:
            _step(clean, copt, b, rank, world, nan=False)
    model, opt = _ddp()
    rules = Path(out, f"rules{rank}.yml")
    rules.write_text(NONFINITE_ROLLBACK)
    w = lrwatch.Watcher(model, opt, rules=str(rules), flush_every=4,
                        recovery={"good_after": 5, "min_interval": 5, "cooldown": 0,
                                  "replay": True, "guard": "off", "start_check": "off"})
    for b in w.batches(iter(range(n))):
        w.log(loss=_step(model, opt, b, rank, world,
                         nan=b == nan_at and rank == world - 1 and not w.policy.rollbacks))
    w.close()
    avg, ref = model.module[1].avg, clean.module[1].avg
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "rollbacks": w.policy.rollbacks, "finite": bool(torch.isfinite(avg).all()),
        "avg_equal": torch.equal(avg, ref), "avg": avg.tolist(),
        "weights_equal": all(torch.equal(a, b) for a, b in
                             zip(model.parameters(), clean.parameters()))}))
    finish()


def loose_buffer_best(rank: int, world: int, store: str, out: str, n: int, best_at: int) -> None:
    """DDP over ``n`` batches, each rank its own running mean, an evaluation every rank agrees
    on every 3 batches, best at batch ``best_at``, the best state on disk (a file per rank):
    ``restore_best()`` puts back the best batch's weights and this rank's own running mean
    of then."""
    init(rank, world, store, timeout_s=60)
    model, opt = _ddp()
    w = lrwatch.Watcher(model, opt, rules=None, flush_every=8, keep_best="eval_loss",
                        recovery={"snapshot_dir": str(Path(out, "snaps")),
                                  "start_check": "off"})
    kept: tuple[list[torch.Tensor], torch.Tensor] | None = None
    for b in w.batches(iter(range(n))):
        loss = _step(model, opt, b, rank, world, nan=False)
        if b % 3 == 2:
            if b == best_at:
                kept = ([p.detach().clone() for p in model.parameters()],
                        model.module[1].avg.clone())
            w.log(loss=loss, eval_loss=torch.tensor(0.5 + abs(b - best_at) / 10))
        else:
            w.log(loss=loss)
    w.close()
    assert kept is not None
    moved = not torch.equal(model.module[1].avg, kept[1])
    record = w.restore_best()
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "where": Path(record.where).name if record else None, "moved": moved,
        "avg_equal": torch.equal(model.module[1].avg, kept[1]),
        "avg": model.module[1].avg.tolist(),
        "weights_equal": all(torch.equal(a, b) for a, b in zip(model.parameters(), kept[0]))}))
    finish()
