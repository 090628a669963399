"""LrwatchCallback in a ``transformers.Trainer`` under DDP: 2 CPU processes, gloo, torchrun.

Run as::

    torchrun --nproc_per_node=2 --master_port=PORT hf_ddp.py --out DIR [--export rank0|all]
        [--nan-at STEP] [--steps N]

A 1-layer GPT-2 made from a config (no download) learns counting sequences made in code. Every
rank writes ``DIR/rank{r}.json`` (what its Watcher saw and did, its final weights, the sample ids
it trained on); rank 0 also writes single-process reference gradient norms on the same global
batches and the Trainer's own loss log.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.request
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from lrwatch.integrations._common import SkipSampler
from lrwatch.integrations.transformers import LrwatchCallback

LR, BATCH, CLIP = 3e-3, 4, 1.0  # 4 per rank


class Seqs(torch.utils.data.Dataset):
    """Counting sequences mod 32 from a random start; ``idx`` says which sample it is."""

    def __init__(self, n: int = 512) -> None:
        g = torch.Generator().manual_seed(0)
        self.starts = torch.randint(0, 32, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = (self.starts[i] + torch.arange(16)) % 32
        labels = ids.clone()
        labels[0] = -100  # 15 predicted tokens, however the Trainer counts them
        return {"input_ids": ids, "labels": labels, "idx": torch.tensor(i)}


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in ("input_ids", "labels", "idx")}


class Counted(GPT2LMHeadModel):
    """GPT-2 that records the sample ids of every training forward (and can poison one)."""

    def forward(self, input_ids: Any = None, labels: Any = None, idx: Any = None,
                **kw: Any) -> Any:
        out = super().forward(input_ids=input_ids, labels=labels, **kw)
        if self.training and torch.is_grad_enabled() and idx is not None:  # not a measurement
            self.seen.append(idx.tolist())
            if self.poison_now:
                out.loss = out.loss * float("nan")
        return out


def make_model() -> Counted:
    torch.manual_seed(0)
    m = Counted(GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                           bos_token_id=0, eos_token_id=0))
    m.seen, m.poison_now = [], False
    return m


class PoisonOnRank1(TrainerCallback):
    def __init__(self, model: Counted, at: int | None) -> None:
        self.model, self.at = model, at

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.model.poison_now = args.process_index == 1 and state.global_step + 1 == self.at


class Scrape(TrainerCallback):
    """Reads this rank's ``/metrics`` at the end of training (listed before lrwatch's callback,
    which stops the server in its own ``on_train_end``)."""

    def __init__(self, cb: LrwatchCallback) -> None:
        self.cb, self.url, self.text = cb, None, None

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.url = self.cb.metrics_url
        if self.url is not None:
            with urllib.request.urlopen(self.url, timeout=10) as r:
                self.text = r.read().decode()


def reference_norms(batches: list[list[int]]) -> list[float]:
    """One process, the global batch of every step, the Trainer's AdamW and clipping."""
    model, ds = make_model(), Seqs()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    out = []
    for ids in batches:
        b = collate([ds[i] for i in ids])
        opt.zero_grad()
        GPT2LMHeadModel.forward(model, input_ids=b["input_ids"], labels=b["labels"]).loss.backward()
        out.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
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
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=LR)
    # off by default: its shadow's forwards would add to `seen`
    ap.add_argument("--start-check", default="off")
    ap.add_argument("--check-confidence", type=float, default=0.95)
    # a checkpoint every that many steps; a run resumed from a checkpoint folder
    ap.add_argument("--save-steps", type=int, default=0)
    ap.add_argument("--resume", default=None)
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
    model = make_model()
    args = TrainingArguments(
        output_dir=str(out / "hf"), per_device_train_batch_size=BATCH, learning_rate=a.lr,
        max_steps=a.steps, logging_steps=5, report_to=[], use_cpu=True,
        save_strategy="steps" if a.save_steps else "no", save_steps=a.save_steps or 500,
        ddp_backend="gloo", disable_tqdm=True, seed=0, lr_scheduler_type="constant",
        max_grad_norm=CLIP, weight_decay=0.0, remove_unused_columns=False,
        dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=Seqs(), data_collator=collate,
                      callbacks=[scrape := Scrape(cb), cb, PoisonOnRank1(model, a.nan_at)])
    trainer.train(resume_from_checkpoint=a.resume)
    w = cb.watcher
    assert w is not None
    rank, world = dist.get_rank(), dist.get_world_size()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    result = {
        "rank": rank, "world": world, "process_index": args.process_index,
        "watcher_world": w.dist.world, "active": w.dist.active,
        "global_step": trainer.state.global_step, "watcher_step": w.step,
        "metrics_url": scrape.url, "metrics": scrape.text,
        "events": [e for e in events if e.get("type") in ("rollback", "skip", "stop")],
        "start_checks": [e for e in events if e.get("type") == "start_check"],
        "probe_steps": w.policy.state.probe_steps,
        "rollbacks": w.policy.rollbacks, "skipped_batches": w.skipped_batches,
        "data_position": w.data_position,
        "weights": flat.tolist(), "finite": bool(torch.isfinite(flat).all()),
        "lr": trainer.optimizer.param_groups[0]["lr"], "seen": model.seen,
        "log_history": trainer.state.log_history,
        # The global index order of the epoch: accelerate's BatchSamplerShard deals the batches
        # of this order round-robin to the ranks (the SkipSampler sits under it).
        "order": list(_index_sampler(trainer.callback_handler.train_dataloader
                                     .batch_sampler.batch_sampler)),
    }
    seen: list[Any] = [None] * world
    dist.all_gather_object(seen, model.seen)
    if rank == 0:
        result["reference_norms"] = reference_norms([sum(b, []) for b in zip(*seen)])
    (out / f"rank{rank}.json").write_text(json.dumps(result, allow_nan=True))
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
