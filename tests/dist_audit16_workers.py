"""Worker processes for tests/test_distributed_audit16.py (real gloo groups on CPU)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lrwatch
from lrwatch.errors import LrwatchError
from dist_audit15_workers import _ddp_sgd, _flat, _sgd_step
from distributed_workers import _global_batch, _mine, finish, init
from flag_rules import NONFINITE_ROLLBACK_RULE, flag_rule, flag_rules

#: How each rank's Watcher differs from rank 0's in :func:`watchers_deciding_apart`.
APART = {
    # the same rule names, another threshold: the rule fires on rank 0 only
    "threshold": lambda rank: {"above": 0.5 if rank == 0 else 5.0},
    # replay on rank 0 only: after the same rollback, rank 0 trains more batches
    "replay": lambda rank: {"recovery": {"replay": rank == 0}},
    # a probe_loss on rank 0 only: rank 0 runs the start check's collectives alone
    "probe_loss": lambda rank: {"probe": rank == 0},
    # the same everywhere: trains, rolls back alike
    "same": lambda rank: {},
}


def watchers_deciding_apart(rank: int, world: int, store: str, out: str, case: str) -> None:
    """Every rank builds a Watcher whose flushes are paced alike (same ``flush_every``, the
    same rule names) but that decides apart (:data:`APART`), then trains 30 batches, rank
    ``world - 1``'s loss NaN at batch 14 and a flag logged from batch 14 on. The Watcher
    must refuse to be built, on every rank alike, naming the setting; before the fix the
    ranks trained, one rolled back (or replayed, or ran the start check) alone, and the next
    collective waited until its timeout."""
    init(rank, world, store, timeout_s=20)
    model, opt = _ddp_sgd()
    how = APART[case](rank)
    rule = flag_rule("flag", "poison").replace("above: 0.5", f"above: {how.get('above', 0.5)}")
    rules = Path(out, f"rules{rank}.yml")
    rules.write_text(flag_rules(rule, NONFINITE_ROLLBACK_RULE))

    def probe(m: nn.Module, b: int) -> torch.Tensor:
        x, y = _global_batch(b)
        return nn.functional.mse_loss(m(_mine(x, rank, world)), _mine(y, rank, world))

    recovery = {"good_after": 5, "min_interval": 5, "cooldown": 0, "guard": "off",
                "snapshot_dir": str(Path(out, f"snaps{rank}")), "replay_mb": 64.0 + rank,
                **how.get("recovery", {})}
    outcome: dict[str, Any] = {}
    try:
        w = lrwatch.Watcher(model, opt, rules=str(rules), flush_every=4, recovery=recovery,
                            probe_loss=probe if how.get("probe", True) else None)
    except lrwatch.ConfigError as exc:
        outcome["error"] = str(exc)
    else:
        seen = 0
        for b in w.batches(iter(range(30))):
            seen += 1
            w.log(loss=_sgd_step(model, opt, b, rank, world, nan=b == 14 and rank == world - 1),
                  poison=float(b >= 14))
        w.close()
        outcome.update(rollbacks=w.policy.rollbacks, seen=seen)
    outcome["weights"] = repr(_flat(model))
    Path(out, f"rank{rank}.json").write_text(json.dumps(outcome))
    finish()


def error_inside_with(rank: int, world: int, store: str, out: str) -> None:
    """Every rank trains in a ``with Watcher(...)`` block; the last rank's code raises at
    batch 9 (between two flushes). That rank must leave with its own error at once (its
    ``__exit__`` starts no collective), so the others, in their next DDP all-reduce, see it
    gone. Before the fix its ``__exit__`` ran ``close()``, whose final flush gathered: it
    waited for the others (in DDP's all-reduce, not in lrwatch's gather) until the
    collective timeout, and raised gloo's timeout instead of the error."""
    init(rank, world, store, timeout_s=20)
    model, opt = _ddp_sgd()
    error = None
    try:
        with lrwatch.Watcher(model, opt, flush_every=4) as w:
            for b in range(30):
                if rank == world - 1 and b == 9:
                    raise ValueError("the user's error on the last rank")
                w.log(loss=_sgd_step(model, opt, b, rank, world, nan=False))
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    Path(out, f"rank{rank}.json").write_text(json.dumps({"error": error, "step": w.step}))
    os._exit(0)   # (no finish(): the group is broken; the results are written)


def build_error_on_one_rank(rank: int, world: int, store: str, out: str) -> None:
    """The last rank's rule file is missing (a path that exists on the first node only):
    its Watcher raises a ConfigError before the Watcher's first collective. Every rank must
    raise one (the others naming that rank and its error), so that a loop that goes on
    without lrwatch where it cannot be built goes on alike on every rank. Before the fix the
    other ranks waited in that collective (the last rank, training on, was in DDP's
    all-reduce) until the collective timeout."""
    init(rank, world, store, timeout_s=20)
    model, opt = _ddp_sgd()
    rules = Path(out, "rules.yml") if rank < world - 1 else Path(out, "missing", "rules.yml")
    if rank < world - 1:
        rules.write_text(flag_rules(NONFINITE_ROLLBACK_RULE))
    error, w = None, None
    try:
        w = lrwatch.Watcher(model, opt, rules=str(rules), flush_every=4)
    except LrwatchError as exc:   # go on without lrwatch
        error = f"{type(exc).__name__}: {exc}"
    for b in range(12):
        loss = _sgd_step(model, opt, b, rank, world, nan=False)
        if w is not None:
            w.log(loss=loss)
    if w is not None:
        w.close()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"error": error,
                                                         "weights": repr(_flat(model))}))
    finish()


def watcher_group_narrower_than_the_model(rank: int, world: int, store: str, out: str) -> None:
    """The model is trained over every rank (DDP over the world, then FSDP2 over a mesh of
    every rank), and each rank's Watcher is given a group of that rank alone: it must refuse,
    naming the model's ranks. Before the fix each Watcher judged its own rank: a flag logged
    on the last rank rolled that replica back five times and left the others alone, and the
    replicas' weights ended apart, without a word. Then the DDP model again, watched over
    ``model.process_group``: it trains, and both ranks roll back alike."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    init(rank, world, store, timeout_s=20)
    alone = [dist.new_group([r]) for r in range(world)][rank]   # (every rank builds every group)
    rules = Path(out, f"rules{rank}.yml")
    rules.write_text(flag_rules(flag_rule("flag", "poison")))
    errors: list[str] = []
    model, opt = _ddp_sgd()
    torch.manual_seed(3)
    sharded = fully_shard(nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 1)))
    sharded_opt = torch.optim.SGD(sharded.parameters(), lr=0.05)
    for m, o, group in ((model, opt, alone), (sharded, sharded_opt, alone),
                        (model, opt, model.process_group)):
        try:
            w = lrwatch.Watcher(m, o, rules=str(rules), flush_every=4, process_group=group,
                                recovery={"good_after": 5, "min_interval": 5, "cooldown": 0,
                                          "guard": "off", "sudden_hold": 0})
        except lrwatch.ConfigError as exc:
            errors.append(str(exc))
            continue
        for b in w.batches(iter(range(30))):
            w.log(loss=_sgd_step(m, o, b, rank, world, nan=False),
                  poison=2.0 * (b >= 14 and rank == world - 1))   # (the mean: 1)
        w.close()
        errors.append(f"trained, {w.policy.rollbacks} rollbacks")
    Path(out, f"rank{rank}.json").write_text(json.dumps({"errors": errors,
                                                         "weights": repr(_flat(model))}))
    finish()


def run_name_on_rank_0_only(rank: int, world: int, store: str, out: str) -> None:
    """``run_name`` given on rank 0 only (a name a tracker hands rank 0, such as a wandb
    run's), ``export="all"``: every rank must report rank 0's name. Before the fix the other
    ranks took rank 0's random id, which rank 0 itself did not use: two runs in Prometheus."""
    from prometheus_client import generate_latest

    init(rank, world, store, timeout_s=20)
    model, opt = _ddp_sgd()
    w = lrwatch.Watcher(model, opt, flush_every=4, export="all",
                        run_name="night-run" if rank == 0 else None)
    for b in range(4):
        w.log(loss=_sgd_step(model, opt, b, rank, world, nan=False))
    w.close()
    info = [line for line in generate_latest(w.registry).decode().splitlines()
            if line.startswith("lrwatch_run_info{")]
    Path(out, f"rank{rank}.json").write_text(json.dumps({"name": w.run_name, "info": info}))
    finish()


def hsdp_norm(rank: int, world: int, store: str, out: str) -> None:
    """HSDP: ``fully_shard`` over a 2-D mesh (replicate 2 x shard 1, so every rank holds
    its own replica of one whole shard). The recorded gradient norm must equal a single
    process's on the same global batch; before the fix every rank's sum of squares was added
    and the norm read sqrt(2) times too high."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    init(rank, world, store, timeout_s=20)
    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    torch.manual_seed(3)
    ref = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 1))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    torch.manual_seed(3)
    model = fully_shard(nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 1)),
                        mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    got: list[Any] = []
    refs = []
    w = lrwatch.Watcher(model, opt, flush_every=2, listeners=[got.append])
    for b in range(6):
        x, y = _global_batch(b)
        ref_opt.zero_grad()
        nn.functional.mse_loss(ref(x), y).backward()
        refs.append(float(torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])))
        ref_opt.step()
        w.log(loss=_sgd_step(model, opt, b, rank, world, nan=False))
    w.close()
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "norms": [s.values["grad_norm"] for s in got], "refs": refs,
        "placements": str(next(model.parameters()).placements)}))
    finish()
