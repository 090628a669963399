"""Overhead of the Lightning and Hugging Face callbacks, A/B interleaved, on the same model.

For each framework three *variants* train the same model from the same initial weights on the
same data for the same number of steps:

``bare``
    The framework with its own logging off (Lightning: ``logger=False``; HF: ``logging_steps``
    larger than the run, ``report_to=[]``).
``own-logging``
    The framework's own per-step monitoring. Lightning: a CSV logger with
    ``log_every_n_steps=1``, ``LearningRateMonitor(logging_interval="step")`` and the total
    gradient norm from ``lightning.pytorch.utilities.grad_norm`` logged in
    ``on_before_optimizer_step`` (the pattern Lightning documents). HF: ``logging_steps=1``
    (loss, grad norm and learning rate every step).
``lrwatch``
    ``bare`` plus ``LrwatchCallback()`` with its defaults (default rules, rollback snapshots,
    ``flush_every=25``) and no HTTP server or trace (those run off the step path).

Method: the variants run in rounds, in an order shuffled per round (seeded), each a full
``fit``/``train`` of ``steps`` optimizer steps; the timed span starts at step ``warm`` (so
framework set-up is excluded) and ends after ``on_train_end`` of the last callback (so lrwatch's
final flush is included). A variant's step time is the median over rounds; its ratio is that
median over ``bare``'s median. Target (issue 5): ``lrwatch`` at most 1.02x ``bare``.

Usage::

    python benchmarks/integrations_overhead.py            # ~5-7 minutes on 2 shared cores
    python benchmarks/integrations_overhead.py --quick    # under 2 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

VARIANTS = ("bare", "own-logging", "lrwatch")


# --- Lightning ---------------------------------------------------------------------------------
# Model sizes: "realistic" is the issue-2 standard (at least ~2M parameters and 10 ms a step on
# these CPUs); "small" is the tiny model, where the fixed per-step cost dominates (for honesty).
SIZES = {"realistic": {"width": 2048, "batch": 128, "n_embd": 256, "n_layer": 4, "seq": 64,
                       "hf_batch": 16},
         "small": {"width": 512, "batch": 64, "n_embd": 128, "n_layer": 2, "seq": 32,
                   "hf_batch": 8}}
SIZE = dict(SIZES["realistic"])


def _lightning_run(variant: str, steps: int, warm: int, workdir: str) -> float:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities import grad_norm

    from lrwatch.integrations.lightning import LrwatchCallback

    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            w = SIZE["width"]
            self.net = nn.Sequential(nn.Linear(256, w), nn.GELU(), nn.Linear(w, w),
                                     nn.GELU(), nn.Linear(w, 10))

        def training_step(self, batch: Any, i: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            if variant == "own-logging":
                self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 1e-3 * s))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            if variant == "own-logging":
                self.log("grad_norm", grad_norm(self.net, norm_type=2)["grad_2.0_norm_total"])

    g = torch.Generator().manual_seed(0)
    b = SIZE["batch"]
    x, y = torch.randn(b * steps, 256, generator=g), torch.randint(0, 10, (b * steps,),
                                                                     generator=g)
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=b)
    timer = _LTimer(warm)
    cbs: list[Any] = []
    kw: dict[str, Any] = {"logger": False}
    if variant == "own-logging":
        cbs.append(pl.callbacks.LearningRateMonitor(logging_interval="step"))
        kw = {"logger": pl.loggers.CSVLogger(workdir), "log_every_n_steps": 1}
    elif variant == "lrwatch":
        cbs.append(LrwatchCallback())
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=workdir,
                         callbacks=[*cbs, timer], **kw)
    trainer.fit(MLP(), dl)
    return timer.per_step(steps)


def _ltimer_base() -> Any:
    import lightning.pytorch as pl
    return pl.Callback


class _LTimer(_ltimer_base()):  # type: ignore[misc]
    def __init__(self, warm: int) -> None:
        self.warm, self.t0, self.t1 = warm, 0.0, 0.0

    def on_train_batch_start(self, trainer: Any, *a: Any) -> None:
        if trainer.global_step == self.warm:
            self.t0 = time.perf_counter()

    def on_train_end(self, *a: Any) -> None:
        self.t1 = time.perf_counter()

    def per_step(self, steps: int) -> float:
        return (self.t1 - self.t0) / (steps - self.warm)


# --- Hugging Face ------------------------------------------------------------------------------
def _hf_run(variant: str, steps: int, warm: int, workdir: str) -> float:
    from transformers import (GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback,
                              TrainingArguments)

    from lrwatch.integrations.transformers import LrwatchCallback

    class Timer(TrainerCallback):
        t0 = t1 = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == warm:
                self.t0 = time.perf_counter()

        def on_train_end(self, *a: Any, **kw: Any) -> None:
            self.t1 = time.perf_counter()

    class Data(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return SIZE["hf_batch"] * steps

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = (i + torch.arange(SIZE["seq"])) % 128
            return {"input_ids": ids, "labels": ids}

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=SIZE["seq"],
                                       n_embd=SIZE["n_embd"], n_layer=SIZE["n_layer"], n_head=4))
    args = TrainingArguments(output_dir=workdir, per_device_train_batch_size=SIZE["hf_batch"],
                             max_steps=steps, learning_rate=1e-3, report_to=[],
                             logging_steps=1 if variant == "own-logging" else 10 * steps,
                             save_strategy="no", use_cpu=True, disable_tqdm=True,
                             lr_scheduler_type="linear", warmup_steps=10)
    timer = Timer()
    cbs: list[Any] = [LrwatchCallback()] if variant == "lrwatch" else []
    trainer = Trainer(model=model, args=args, train_dataset=Data(), callbacks=[*cbs, timer])
    with contextlib.redirect_stdout(io.StringIO()):  # HF prints every log line
        trainer.train()
    return (timer.t1 - timer.t0) / (steps - warm)


FRAMEWORKS: dict[str, Callable[[str, int, int, str], float]] = {
    "lightning": _lightning_run, "transformers": _hf_run}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and rounds (< 2 min)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--frameworks", default="lightning,transformers")
    ap.add_argument("--json", default=None, help="write the full results here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", choices=sorted(SIZES), default="realistic",
                    help="realistic: >= 2M parameters, >= 10 ms a step (the target applies); "
                         "small: a tiny model where fixed per-step costs dominate")
    ns = ap.parse_args(argv)
    SIZE.update(SIZES[ns.size])
    steps = ns.steps or (80 if ns.quick else 200)
    rounds = ns.rounds or (3 if ns.quick else 6)
    warm = min(20, steps // 4)
    steps = max(steps, warm + 10)
    torch.set_num_threads(1)  # one intra-op thread: less scheduler noise on a shared machine
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    rng = random.Random(ns.seed)
    results: dict[str, dict[str, list[float]]] = {}
    for fw in ns.frameworks.split(","):
        run = FRAMEWORKS[fw]
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        with tempfile.TemporaryDirectory() as tmp:
            run("bare", max(warm + 5, 30), warm, tmp)  # warm-up: imports, allocator, threads
            for r in range(rounds):
                order = list(VARIANTS)
                rng.shuffle(order)
                for v in order:
                    times[v].append(run(v, steps, warm, str(Path(tmp) / f"{v}{r}")))
                print(f"{fw} round {r + 1}/{rounds}: " + "  ".join(
                    f"{v} {times[v][-1] * 1e3:.2f} ms" for v in VARIANTS), file=sys.stderr,
                    flush=True)
        results[fw] = times
    print(f"\n{ns.size} models; {steps} steps per run (timed from step {warm}), {rounds} "
          f"interleaved rounds\n")
    print("| framework | variant | median step (ms) | ratio vs bare | paired ratio range |")
    print("|---|---|---:|---:|---:|")
    out: dict[str, Any] = {"steps": steps, "rounds": rounds, "warm": warm, "results": {}}
    for fw, times in results.items():
        base = statistics.median(times["bare"])
        for v in VARIANTS:
            med = statistics.median(times[v])
            paired = [a / b for a, b in zip(times[v], times["bare"])]
            out["results"].setdefault(fw, {})[v] = {"seconds": times[v], "median": med,
                                                    "ratio": med / base}
            print(f"| {fw} | {v} | {med * 1e3:.2f} | {med / base:.3f}x | "
                  f"{min(paired):.3f}-{max(paired):.3f} |")
    for fw in results:
        r = out["results"][fw]["lrwatch"]["ratio"]
        print(f"{fw}: lrwatch {r:.3f}x bare (target <= 1.02x): {'met' if r <= 1.02 else 'NOT met'}")
    if ns.json:
        Path(ns.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
