"""The worker of ``tests/test_rank_traces.py`` (a top-level module, so ``mp.spawn`` can import
it in the child processes)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

import distributed_workers as dw
import lrwatch


def export_all(rank: int, world: int, store: str, out: str) -> None:
    dw.init(rank, world, store)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = lrwatch.Watcher(model, opt, flush_every=2, export="all", trace=Path(out) / "run.jsonl",
                        rules=None)
    for i in range(6):
        g = torch.Generator().manual_seed(10 * rank + i)
        opt.zero_grad()
        loss = model(torch.randn(8, 4, generator=g)).pow(2).mean()
        loss.backward()
        opt.step()
        w.log(loss=loss)
    w.close()
    Path(out, f"done{rank}.json").write_text(json.dumps({"step": w.step}))
    dw.finish()


def subgroups(rank: int, world: int, store: str, out: str, export: str, port: int) -> None:
    """Two subgroups (a two-stage pipeline, each stage its own data-parallel group of one
    rank), one Watcher each on its own group: each group's rank 0 exports. Their ports and
    traces must not collide."""
    dw.init(rank, world, store, timeout_s=60)
    groups = [torch.distributed.new_group([r]) for r in range(world)]   # every rank makes all
    torch.manual_seed(rank)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = lrwatch.Watcher(model, opt, flush_every=2, export=export, port=port,
                        trace=Path(out) / "run.jsonl", rules=None, process_group=groups[rank])
    for i in range(6):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        w.log(loss=float(rank + 1))
    w.flush()
    url = w.metrics_url
    w.close()
    Path(out, f"done{rank}.json").write_text(json.dumps({"url": url}))
    dw.finish()
