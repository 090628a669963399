"""LrwatchCallback under Lightning's ``ddp`` strategy: 2 CPU processes, gloo.

Run as a program (Lightning's subprocess launcher re-executes this file for rank 1)::

    python lightning_ddp.py --out DIR [--export rank0|all] [--nan-at STEP] [--steps N]
                            [--lr LR] [--start-check off|auto] [--check-confidence P]

Every rank writes ``DIR/rank{r}.json`` (what its Watcher saw and did, and its final weights);
rank 0 also writes the single-process reference gradient norms on the same global batches.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.request
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lightning.pytorch as pl

from lrwatch.integrations._common import SkipSampler
from lrwatch.integrations.lightning import LrwatchCallback

N, BATCH, LR = 1024, 8, 0.05  # 8 per rank: a global batch of 16


def data() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 8, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return torch.utils.data.TensorDataset(x, y, torch.arange(N))


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2))


class Tiny(pl.LightningModule):
    def __init__(self, nan_at: int | None, lr: float = LR) -> None:
        super().__init__()
        self.net = net()
        self.nan_at, self.lr = nan_at, lr
        self.seen: list[list[int]] = []  # the sample ids of every batch this rank trained on

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, ids = batch
        if torch.is_grad_enabled():   # not the untrained-loss measurement (no_grad)
            self.seen.append(ids.tolist())
        loss = nn.functional.cross_entropy(self.net(x), y)
        if self.global_rank == 1 and self.trainer.global_step + 1 == self.nan_at:
            loss = loss * float("nan")  # rank 1 only; DDP then spreads NaN gradients
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Scrape(pl.Callback):
    """Reads this rank's ``/metrics`` at the end of training, while the server still runs."""

    def __init__(self, cb: LrwatchCallback) -> None:
        self.cb, self.url, self.text = cb, None, None

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.url = self.cb.metrics_url
        if self.url is not None:
            with urllib.request.urlopen(self.url, timeout=10) as r:
                self.text = r.read().decode()


def reference_norms(batches: list[list[int]]) -> list[float]:
    """One process, the global batch of every step (what DDP's averaged gradients equal)."""
    model, ds = net(), data()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out = []
    for ids in batches:
        x, y, _ = ds[torch.tensor(ids)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        out.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
        opt.step()
    return out


def _index_sampler(batch_sampler: Any) -> Any:
    s = batch_sampler.sampler
    return s.sampler if isinstance(s, SkipSampler) else s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--export", default="rank0")
    ap.add_argument("--nan-at", type=int, default=None)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=LR)
    # off by default: its shadow's training_step calls would add to `seen`
    ap.add_argument("--start-check", default="off")
    ap.add_argument("--check-confidence", type=float, default=0.95)
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(a.out)
    events: list[dict[str, Any]] = []

    def keep(sample: Any) -> None:
        events.extend({k: v for k, v in e.items() if k != "engine_state"} for e in sample.events)

    cb = LrwatchCallback(export=a.export, port=0, trace=str(out / "trace.jsonl"), flush_every=5,
                         listeners=[keep],
                         recovery={"guard": "off", "start_check": a.start_check,
                                   "start_check_confidence": a.check_confidence,
                                   "good_after": 5, "min_interval": 5, "skip_batches": 2})
    model = Tiny(a.nan_at, a.lr)
    loader = torch.utils.data.DataLoader(data(), batch_size=BATCH, shuffle=False)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=a.steps,
                         default_root_dir=str(out), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[cb, scrape := Scrape(cb)])
    trainer.fit(model, loader)
    w = cb.watcher
    assert w is not None
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    rank = trainer.global_rank
    result = {
        "rank": rank, "world": w.dist.world, "active": w.dist.active,
        "global_step": trainer.global_step, "watcher_step": w.step,
        "metrics_url": scrape.url, "metrics": scrape.text,
        "events": [e for e in events if e.get("type") in ("rollback", "skip", "stop")],
        "start_checks": [e for e in events if e.get("type") == "start_check"],
        "probe_steps": w.policy.state.probe_steps,
        "rollbacks": w.policy.rollbacks, "skipped_batches": w.skipped_batches,
        "data_position": w.data_position,
        "weights": flat.tolist(), "finite": bool(torch.isfinite(flat).all()),
        "lr": trainer.optimizers[0].param_groups[0]["lr"], "seen": model.seen,
        # This rank's index order for the epoch (DistributedSampler under the SkipSampler).
        "order": list(_index_sampler(trainer.train_dataloader.batch_sampler)),
        "sampler": type(_index_sampler(trainer.train_dataloader.batch_sampler)).__name__,
    }
    seen: list[Any] = [None, None]
    torch.distributed.all_gather_object(seen, model.seen)
    if rank == 0:  # both halves of every global batch, equal sizes: the mean of the two means
        result["reference_norms"] = reference_norms([a + b for a, b in zip(*seen)])
    (out / f"rank{rank}.json").write_text(json.dumps(result, allow_nan=True))
    trainer.strategy.barrier()  # rank 0 (the launcher's process) exits after every rank wrote


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
