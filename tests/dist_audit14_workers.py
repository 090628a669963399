"""Worker processes for tests/test_distributed_audit14.py (real gloo groups on CPU)."""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lrwatch
from distributed_workers import _global_batch, _mine, finish, init


def _ddp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 1)))


def _result(out: str, rank: int, w: lrwatch.Watcher, model: nn.Module,
            events: list[Any]) -> None:
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "actions": events, "step": w.step, "stopped": w.should_stop,
        # repr: NaN weights compare equal too
        "weights": repr(flat.tolist())}))


def snapshot_unreadable_on_one_rank(rank: int, world: int, store: str, out: str) -> None:
    """Snapshots on disk; before a NaN batch (step 22, last rank) the last rank's snapshot
    files are overwritten, so its rollback cannot load its snapshot while the others can.
    Every rank must take the same way: all roll back or all stop, no rank left training
    alone (a hang: the collective timeout fails the test)."""
    init(rank, world, store, timeout_s=30)
    model = _ddp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    snaps = Path(out, "snapshots")
    w = lrwatch.Watcher(model, opt, flush_every=5,
                        recovery={"guard": "off", "good_after": 5, "min_interval": 5,
                                  "snapshot_dir": str(snaps)})
    events: list[Any] = []
    w.add_listener(lambda s: events.extend([e["type"], e["step"], e.get("to_step")]
                                           for e in s.events
                                           if e.get("type") in ("rollback", "stop")))
    last = rank == world - 1

    def stream() -> Any:
        for step in range(40):
            x, y = _global_batch(step)
            yield _mine(x, rank, world), _mine(y, rank, world)

    for x, y in w.batches(stream()):
        if last and w.step == 21:
            for f in glob.glob(str(snaps / f"*.rank{rank}.pt")):
                Path(f).write_bytes(b"not a snapshot")
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if last and w.step == 22:
            loss = loss * float("nan")
        loss.backward()
        opt.step()
        w.log(loss=loss)
    _result(out, rank, w, model, events)
    w.close()
    finish()


_STOP_RESTORING_BEST = """version: 1
rules:
  - name: eval_accuracy_low
    metric: eval_accuracy
    detector: threshold
    params: {below: 0.5}
    severity: critical
    actions: [alert, {stop: {restore: best}}]
"""


def best_unreadable_on_one_rank(rank: int, world: int, store: str, out: str) -> None:
    """DDP keeping the best evaluated state on disk (an agreed evaluation: 0.9 at step 6,
    0.2 at step 12, where a rule stops the run with ``restore: best``); the last rank's
    best-eval file is overwritten before the stop. The ranks must stop with the same
    weights: every rank puts the best back, or none does."""
    init(rank, world, store, timeout_s=30)
    model = _ddp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    snaps, rules = Path(out, "snapshots"), Path(out, f"rules{rank}.yml")
    rules.write_text(_STOP_RESTORING_BEST)
    w = lrwatch.Watcher(model, opt, flush_every=5, rules=str(rules), keep_best="eval_accuracy",
                        recovery={"guard": "off", "snapshot_dir": str(snaps)})
    events: list[Any] = []
    w.add_listener(lambda s: events.extend([e["type"], e["step"], e.get("message")]
                                           for e in s.events if e.get("type") == "stop"))
    for step in range(30):
        if w.should_stop:
            break
        x, y = _global_batch(step)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(_mine(x, rank, world)), _mine(y, rank, world))
        loss.backward()
        opt.step()
        evals = {6: {"eval_accuracy": 0.9}, 12: {"eval_accuracy": 0.2}}.get(w.step + 1, {})
        w.log(loss=loss, **evals)
        if rank == world - 1 and w.step == 9:
            Path(snaps, f"best-eval.rank{rank}.pt").write_bytes(b"not a state")
    _result(out, rank, w, model, events)
    w.close()
    finish()


def watcher_outside_its_group(rank: int, world: int, store: str, out: str) -> None:
    """A subgroup of rank 0 alone; every rank builds a Watcher on it (the last rank is not a
    member: torch hands it ``GroupMember.NON_GROUP_MEMBER``). The member trains as usual;
    the other must get an error that names the mistake."""
    import torch.distributed as dist

    init(rank, world, store, timeout_s=30)
    group = dist.new_group([0])
    torch.manual_seed(0)
    model = nn.Linear(12, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    error, steps = None, 0
    try:
        w = lrwatch.Watcher(model, opt, flush_every=2, process_group=group)
        for step in range(4):
            x, y = _global_batch(step)
            w.log(loss=_mse(model, opt, x, y))
        w.close()
        steps = w.step
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    Path(out, f"rank{rank}.json").write_text(json.dumps({"error": error, "step": steps}))
    finish()


def _mse(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
         y: torch.Tensor) -> torch.Tensor:
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss


def watchers_built_apart(rank: int, world: int, store: str, out: str) -> None:
    """Every rank builds a Watcher, the last with another ``flush_every``, then another
    with no rules, then one like the others': the first two must raise a ConfigError on
    every rank (not pair one rank's flush with another's and wait until the collective
    timeout), the third trains."""
    init(rank, world, store, timeout_s=30)
    model = _ddp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    last = rank == world - 1
    errors = []
    for kw in ({"flush_every": 4 if last else 5}, {"rules": None if last else "training"}, {}):
        try:
            w = lrwatch.Watcher(model, opt, **{"flush_every": 5, **kw})
        except lrwatch.ConfigError as exc:
            errors.append(str(exc))
            continue
        for step in range(12):
            x, y = _global_batch(step)
            w.log(loss=_mse(model, opt, _mine(x, rank, world), _mine(y, rank, world)))
        w.close()
        errors.append(f"trained {w.step} steps")
    Path(out, f"rank{rank}.json").write_text(json.dumps({"errors": errors}))
    finish()
