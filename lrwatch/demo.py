"""``lrwatch demo``: a real character-level language model trained with the Watcher on.

The data is the Python standard library's own source code, which every Python installation
ships, so the demo needs no download. The model is a small GRU over bytes; with the defaults it
trains for a few hundred steps in well under a minute on two CPU cores.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TextIO

import torch
from torch import nn

from .samples import Sample
from .watch import Watcher

__all__ = ["StdlibText", "CharGRU", "DemoConfig", "run_demo", "stdlib_corpus", "FAULTS"]

#: Faults ``lrwatch demo --inject`` can inject, with what each does.
FAULTS = {
    "nan": "a poisoned batch makes the forward pass produce NaN at the onset step",
    "blowup": "one step with a learning rate 1000x too high throws the weights far off",
    "lr-bug": "the scheduler's base learning rates are multiplied by 100 (a bad config reload)",
}


def stdlib_corpus(max_bytes: int = 2_000_000) -> bytes:
    """Source of the standard library's top-level modules, in a fixed (sorted) order."""
    root = Path(os.__file__).resolve().parent
    chunks: list[bytes] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:  # pragma: no cover - a Python without its sources
        raise RuntimeError(f"no standard-library sources found under {root}")
    return b"\n".join(chunks)[:max_bytes]


class StdlibText:
    """Byte-level next-character batches over the stdlib corpus, with a held-out tail.

    Batches come from a seeded generator, so a run (and a rollback's replay of it) is
    reproducible.
    """

    def __init__(self, seq_len: int = 64, batch_size: int = 32, max_bytes: int = 2_000_000,
                 holdout: float = 0.05, seed: int = 0) -> None:
        data = torch.frombuffer(bytearray(stdlib_corpus(max_bytes)), dtype=torch.uint8).long()
        cut = int(len(data) * (1 - holdout))
        self.train, self.valid = data[:cut], data[cut:]
        self.seq_len, self.batch_size = seq_len, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def _batch(self, data: torch.Tensor, gen: torch.Generator,
               batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(data) - self.seq_len - 1, (batch_size,), generator=gen)
        idx = starts[:, None] + torch.arange(self.seq_len + 1)
        chunk = data[idx]
        return chunk[:, :-1], chunk[:, 1:]

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._batch(self.train, self.gen, self.batch_size)

    def eval_batches(self, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(1234)  # the same held-out batches every time
        return [self._batch(self.valid, gen, self.batch_size) for _ in range(n)]


class CharGRU(nn.Module):
    """Embedding -> GRU -> linear head over 256 byte values."""

    def __init__(self, hidden: int = 256, embed: int = 64, layers: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, embed)
        self.rnn = nn.GRU(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(x))
        return self.head(out)


@dataclass
class DemoConfig:
    steps: int = 300
    batch_size: int = 32
    seq_len: int = 64
    hidden: int = 256
    lr: float = 3e-3
    warmup: int = 30
    eval_every: int = 50
    flush_every: int = 10
    port: int | None = 0
    host: str = "127.0.0.1"
    trace: str | None = "lrwatch-demo.trace.jsonl"
    seed: int = 0
    linger: float = 0.0
    update_ratio: bool = True
    per_layer: bool = True
    inject: str | None = None
    inject_at: int | None = None  # default: 60% into the run
    snapshot_dir: str | None = None


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def run_demo(cfg: DemoConfig, out: TextIO | None = None) -> dict[str, float]:
    """Train the demo model with a Watcher and print progress from the flushed samples.

    Returns a summary (steps, final loss, eval accuracy, seconds).
    """
    out = out if out is not None else sys.stdout
    torch.manual_seed(cfg.seed)
    data = StdlibText(cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    model = CharGRU(hidden=cfg.hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup, cfg.steps))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"lrwatch demo: byte-level GRU ({n_params / 1e6:.2f}M parameters) on "
          f"{len(data.train) / 1e6:.1f} MB of Python standard-library source", file=out)

    if cfg.inject is not None and cfg.inject not in FAULTS:
        raise ValueError(f"unknown fault {cfg.inject!r}; choose one of {sorted(FAULTS)}")
    inject_at = cfg.inject_at if cfg.inject_at is not None else max(1, int(cfg.steps * 0.6))
    if cfg.inject:
        print(f"injecting fault {cfg.inject!r} at step {inject_at}: {FAULTS[cfg.inject]}",
              file=out)

    last: dict[str, float] = {}
    report_every = max(cfg.flush_every, cfg.steps // 15 or 1)

    def progress(s: Sample) -> None:
        for k in ("loss", "accuracy", "eval_loss", "eval_accuracy", "grad_norm"):
            if k in s.values:
                last[k] = s.values[k]
        for e in s.events:
            if e.get("type") == "firing" and e.get("severity") in ("critical", "warning"):
                print(f"  !! step {e['step']}: {e['rule']} ({e['severity']}): {e.get('message')}"
                      f" -> {', '.join(e.get('actions', [])) or 'report'}", file=out, flush=True)
            elif e.get("type") in ("rollback", "skip", "reduce_lr", "stop"):
                extra = (f" to step {e['to_step']}, lr x{e.get('lr_factor', 1)}"
                         if "to_step" in e else "")
                print(f"  >> {e['type']}{extra} ({e['rule']})", file=out, flush=True)
        if s.step % report_every == 0 or s.step == cfg.steps:
            ev = (f"  eval_acc {last['eval_accuracy']:.3f}" if "eval_accuracy" in last else "")
            print(f"step {s.step:5d}/{cfg.steps}  loss {last.get('loss', float('nan')):.3f}  "
                  f"acc {last.get('accuracy', float('nan')):.3f}  lr {s.values.get('lr', 0):.2e}  "
                  f"grad_norm {last.get('grad_norm', float('nan')):.3f}{ev}", file=out, flush=True)

    watch = Watcher(model, opt, sched, flush_every=cfg.flush_every, port=cfg.port, host=cfg.host,
                    trace=cfg.trace, per_layer=cfg.per_layer, update_ratio=cfg.update_ratio,
                    batch_size=cfg.batch_size, listeners=[progress], run_name="demo",
                    recovery={"snapshot_dir": cfg.snapshot_dir})
    if watch.metrics_url:
        print(f"metrics: {watch.metrics_url}", file=out, flush=True)
    if cfg.trace:
        print(f"trace:   {os.path.abspath(cfg.trace)}", file=out, flush=True)
    evals = data.eval_batches()
    injected = False

    def stream() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield data.batch()

    t0 = time.perf_counter()
    with watch:
        # The schedule position (sched.last_epoch) decides when the run is done: after a
        # rollback the restored scheduler resumes from the snapshot's step.
        for x, y in watch.batches(stream()):
            step = sched.last_epoch + 1
            if step > cfg.steps or watch.step >= 4 * cfg.steps:
                break
            poison = False
            if cfg.inject and not injected and step == inject_at:
                injected = True
                if cfg.inject == "nan":
                    poison = True
                elif cfg.inject == "blowup":
                    for g in opt.param_groups:
                        g["lr"] *= 1000.0  # LambdaLR recomputes it from base_lrs next step
                elif cfg.inject == "lr-bug":
                    sched.base_lrs = [b * 100.0 for b in sched.base_lrs]
                    for g in opt.param_groups:
                        g["lr"] *= 100.0
            logits = model(x)
            if poison:
                logits = logits + float("nan")
            loss = nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                acc = (logits.argmax(-1) == y).float().mean()
            metrics: dict[str, torch.Tensor] = {"loss": loss.detach(), "accuracy": acc}
            if step % cfg.eval_every == 0 or step == cfg.steps:
                metrics.update(_evaluate(model, evals))
            watch.log(**metrics)
        watch.flush()
        seconds = time.perf_counter() - t0
        status = "stopped" if watch.should_stop else "done"
        print(f"{status}: {watch.step} steps in {seconds:.1f} s "
              f"({watch.step / seconds:.1f} steps/s); schedule at step {sched.last_epoch}/"
              f"{cfg.steps}; rollbacks {watch.policy.rollbacks}; final eval accuracy "
              f"{last.get('eval_accuracy', float('nan')):.3f}", file=out, flush=True)
        if watch.should_stop:
            print(f"stop reason: {watch.stop_reason} (exit status {watch.exit_status})",
                  file=out, flush=True)
        if cfg.linger > 0 and watch.metrics_url:
            print(f"serving {watch.metrics_url} for {cfg.linger:.0f} s more", file=out, flush=True)
            time.sleep(cfg.linger)
    return {"steps": float(watch.step), "seconds": seconds, "rollbacks": watch.policy.rollbacks,
            "exit_status": watch.exit_status, "schedule_step": sched.last_epoch, **last}


def _evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]
              ) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        losses, accs = [], []
        for x, y in batches:
            logits = model(x)
            losses.append(nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1)))
            accs.append((logits.argmax(-1) == y).float().mean())
    model.train()
    return {"eval_loss": torch.stack(losses).mean(), "eval_accuracy": torch.stack(accs).mean()}
