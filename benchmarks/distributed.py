"""Cost of lrwatch's one collective per flush, against the DDP step time.

Spawns gloo process groups of 2 and 4 CPU ranks that train the same DDP model with the Watcher
on (default settings: ``flush_every=25``), times every ``Watcher._agree`` call (the gather and
the combination of all ranks' rows: the only extra communication lrwatch adds) and every
training step, and reports

    overhead = (median agree time per flush) / (flush_every x median DDP step time)

Each timed call starts after a barrier, so the time is the gather and the combination, not the
wait for a straggling rank (which DDP's own all-reduce would wait for anyway).

Target: at most 1% at the default flush interval. Run:

    python benchmarks/distributed.py [--quick] [--worlds 2 4] [--json OUT]

Ratios are measured inside each run, so a noisy machine shifts both sides alike; the absolute
times on a 2-core machine with 4 ranks are oversubscribed and say so in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lrwatch  # noqa: E402


def _model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))


def _worker(rank: int, world: int, store: str, out: str, steps: int, width: int,
            batch: int, flush_every: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = nn.parallel.DistributedDataParallel(_model(width))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    w = lrwatch.Watcher(model, opt, flush_every=flush_every)
    agree_times: list[float] = []
    original = w._agree

    def timed(samples: Any) -> Any:
        # Wait for the slowest rank first: that skew is not lrwatch's cost (without lrwatch the
        # ranks would wait for each other in the next DDP all-reduce anyway).
        dist.barrier()
        t0 = time.perf_counter()
        try:
            return original(samples)
        finally:
            agree_times.append(time.perf_counter() - t0)

    w._agree = timed  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(rank)
    step_times: list[float] = []
    for step in range(steps):
        x = torch.randn(batch, 256, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        w.log(loss=loss)
        step_times.append(time.perf_counter() - t0)
    w.close()
    params = sum(p.numel() for p in model.parameters())
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"agree": agree_times, "steps": step_times, "params": params}))
    dist.barrier()  # leave together: the file store must outlive every rank's last collective
    dist.destroy_process_group()
    # DDP's reducer may still hold the group, and its gloo threads torn down during interpreter
    # finalization can abort the process; the results are written, so skip finalization.
    sys.stdout.flush()
    os._exit(0)


def run(world: int, steps: int, width: int, batch: int, flush_every: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, os.path.join(d, "store"), d, steps, width, batch,
                                flush_every), nprocs=world)
        res = [json.loads(Path(d, f"rank{r}.json").read_text()) for r in range(world)]
    warm = steps // 5  # skip start-up
    step = statistics.median(t for r in res for t in r["steps"][warm:])
    # A flush containing the warm-up (first) call is skipped too.
    agree = statistics.median(t for r in res for t in r["agree"][1:-1] or r["agree"])
    return {"world": world, "params": res[0]["params"], "flush_every": flush_every,
            "step_ms": step * 1e3, "agree_ms": agree * 1e3,
            "overhead": agree / (flush_every * step), "flushes": len(res[0]["agree"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (about a minute)")
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--flush-every", type=int, default=25)
    ap.add_argument("--width", type=int, default=1024, help="hidden width (1024: ~1.3M params)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()
    steps = 150 if args.quick else 400
    rows = []
    print(f"cores: {os.cpu_count()}; gloo on CPU; {steps} steps per run", flush=True)
    for world in args.worlds:
        print(f"running {world} ranks ...", file=sys.stderr, flush=True)
        rows.append(run(world, steps, args.width, args.batch, args.flush_every))
    print("\n| ranks | params | DDP step (ms) | collective per flush (ms) | flush_every | "
          "overhead | target <= 1% |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ok = "yes" if r["overhead"] <= 0.01 else "no"
        note = " (oversubscribed: more ranks than cores)" if r["world"] > (os.cpu_count() or 1) \
            else ""
        print(f"| {r['world']}{note} | {r['params'] / 1e6:.2f}M | {r['step_ms']:.1f} | "
              f"{r['agree_ms']:.2f} | {r['flush_every']} | {100 * r['overhead']:.2f}% | {ok} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
