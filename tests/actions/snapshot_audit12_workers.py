"""Worker processes for tests/actions/test_snapshot_audit12.py (a real gloo group)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import lrwatch


def shared_snapshot_dir(rank: int, world: int, store: str, out: str, fail_at: int) -> None:
    """DDP ranks of one machine with one ``snapshot_dir``, each with its own random stream
    (so their snapshots differ: RNG states, as CUDA's always do, or an FSDP rank's shards);
    a NaN loss on the last rank at step ``fail_at`` asks every rank for a rollback, which must
    find its own snapshot on disk."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 1)))
    torch.manual_seed(1 + rank)   # each rank its own random stream (dropout, augmentation)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    w = lrwatch.Watcher(model, opt, flush_every=5,
                        recovery={"guard": "off", "good_after": 10, "min_interval": 5,
                                  "max_interval": 5, "start_check": "off",
                                  "snapshot_dir": str(Path(out, "snapshots"))})
    events: list[dict[str, Any]] = []
    w.add_listener(lambda s: events.extend(e for e in s.events
                                           if e.get("type") in ("rollback", "stop")))
    for step in range(60):
        g = torch.Generator().manual_seed(500 + step)
        x, y = torch.randn(16, 12, generator=g), torch.randn(16, 1, generator=g)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if rank == world - 1 and w.step + 1 == fail_at:
            loss = loss * float("nan")
        loss.backward()
        opt.step()
        w.log(loss=loss)
    w.close()
    assert w.store is not None
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "actions": [(e["type"], e["step"], e.get("to_step")) for e in events],
        "exit_status": w.exit_status, "step": w.step, "fallbacks": w.store.fallbacks,
        "on_disk": all(s.path is not None for s in w.store.snapshots),
        "files": sorted(os.listdir(Path(out, "snapshots")))}))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
