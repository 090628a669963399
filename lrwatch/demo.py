"""``lrwatch demo``: a real character-level language model trained with the Watcher on.

The data is the Python standard library's own source code, which every Python installation
ships, so the demo needs no download. The model is a small GRU over bytes; with the defaults it
trains for a few hundred steps in well under a minute on two CPU cores.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TextIO

import torch
from torch import nn

from .errors import ConfigError
from .samples import Sample
from .watch import Watcher

__all__ = ["StdlibText", "CharGRU", "DemoConfig", "DemoConsole", "run_demo", "stdlib_corpus",
           "FAULTS"]

#: Poisoned steps in a row of the fault ``nan-burst``.
BURST = 3

#: Faults ``lrwatch demo --inject`` can inject, with what each does.
FAULTS = {
    "nan": "a poisoned batch makes the forward pass produce NaN at the onset step (the step "
           "is dropped on the device)",
    "nan-burst": "three poisoned batches in a row produce NaN (the first step is dropped, the "
                 "repeat rolls the run back)",
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


def _inject_at(cfg: DemoConfig) -> int:
    return cfg.inject_at if cfg.inject_at is not None else max(1, int(cfg.steps * 0.6))


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


#: The Watcher marks its own log records about rule events and actions with
#: ``extra={"lrwatch_event": True}``. The demo prints those events itself, from the trace's
#: ``events``, one line each and in step order, so while it runs these records are held back;
#: every other lrwatch warning (a taken port, a full disk, an internal error) still goes to stderr.
class _DropEventLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is not None or not getattr(record, "lrwatch_event", False)


class DemoConsole:
    """What the demo prints while it trains: one line per rule event or action, in step order,
    and every ``report_every`` steps a progress line that shows the steps run and the schedule
    position apart (after a rollback the run repeats part of its schedule, so more steps run
    than the schedule has).

    >>> import io
    >>> c = DemoConsole(100, io.StringIO(), report_every=10)
    >>> c.schedule_at[10] = 10
    >>> c.sample(Sample(step=10, values={"loss": 2.0, "lr": 0.1}, events=(
    ...     {"type": "firing", "rule": "nonfinite", "severity": "critical", "step": 8,
    ...      "message": "loss is nan at step 8", "actions": ["rollback"]},
    ...     {"type": "rollback", "rule": "nonfinite", "step": 8, "to_step": 0,
    ...      "lr_factor": 0.1, "warmup": 100, "restart": True})))
    >>> print(c.out.getvalue(), end="")
      !! step 8: nonfinite (critical): loss is nan at step 8 -> rollback
    step    10  schedule  10/100  loss 2.000  acc nan  lr 1.00e-01  grad_norm nan
      >> step 10: restart from step 0 at lr x0.1, warmed up over 100 steps (nonfinite at step 8)
    >>> c.sample(Sample(step=20, values={"loss": 1.5, "lr": 0.1}, events=(
    ...     {"type": "start_check", "step": 10, "lr_factor": 1.0, "reason": "t -3 <= 2.02"},)))
    >>> print(c.out.getvalue().splitlines()[-1])
      >> step 20: start check: the learning rate stands (t -3 <= 2.02)
    """

    def __init__(self, total: int, out: TextIO, *, report_every: int) -> None:
        self.total, self.out, self.report_every = total, out, report_every
        self.last: dict[str, float] = {}
        #: Watcher step -> schedule position, recorded by the loop before each log().
        self.schedule_at: dict[int, int] = {}
        self._shown: set[str] = set()   # rules whose firing was printed (their resolve is too)

    def _print(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def sample(self, s: Sample) -> None:
        """The Watcher's listener: called for every flushed step, in step order."""
        for k in ("loss", "accuracy", "eval_loss", "eval_accuracy", "grad_norm"):
            if k in s.values:
                self.last[k] = s.values[k]
        if "untrained_loss" in s.values:
            self._print(f"untrained loss {s.values['untrained_loss']:.3f} (median of the "
                        f"untouched model's loss on the first 8 batches; the rules judge "
                        f"against it)")
        if "constant_loss" in s.values:
            self._print(f"constant-prediction loss {s.values['constant_loss']:.3f} (the best "
                        f"input-independent output on the same batches; a network well below "
                        f"it is not dead)")
        # What the rules saw at this step comes first, then where training is, then what the
        # Watcher does about it (carried out at the next iteration, after this step).
        dropped = {e.get("step") for e in s.events if e.get("type") == "dropped"}
        for e in s.events:
            if e.get("type") in ("firing", "resolved"):
                self._rule_event(e, e.get("step") in dropped)
        at = self.schedule_at.pop(s.step, None)
        if s.step % self.report_every == 0 or at == self.total:
            self._progress(s, at)
        for e in s.events:
            if e.get("type") not in ("firing", "resolved", "stop"):
                self._action(e, s.step)   # a stop is announced by the Watcher, on stderr

    def _rule_event(self, e: Mapping[str, Any], dropped: bool = False) -> None:
        rule, sev = str(e.get("rule")), e.get("severity")
        if e.get("type") == "firing" and sev in ("critical", "warning"):
            self._shown.add(rule)
            actions = ", ".join(str(a) for a in e.get("actions", ()) if a != "alert") or "report"
            if dropped:   # the step never reached the parameters: nothing to roll back
                actions = "step not applied"
            self._print(f"  !! step {e['step']}: {rule} ({sev}): {e.get('message')} -> "
                        f"{actions}")
        elif e.get("type") == "resolved" and rule in self._shown:
            self._shown.discard(rule)
            self._print(f"  ok step {e['step']}: {rule} resolved")

    def _progress(self, s: Sample, at: int | None) -> None:
        last = self.last
        w = len(str(self.total))
        sched = f"{at:>{w}d}/{self.total}" if at is not None else f"{'?':>{w}s}/{self.total}"
        ev = f"  eval_acc {last['eval_accuracy']:.3f}" if "eval_accuracy" in last else ""
        self._print(f"step {s.step:5d}  schedule {sched}  loss "
                    f"{last.get('loss', math.nan):.3f}  acc {last.get('accuracy', math.nan):.3f}"
                    f"  lr {s.values.get('lr', 0):.2e}  grad_norm "
                    f"{last.get('grad_norm', math.nan):.3f}{ev}")

    def _action(self, e: Mapping[str, Any], step: int) -> None:
        kind, rule = e.get("type"), e.get("rule")
        # Decided at this flush (``step``), for what the rule saw at ``e["step"]``.
        why = (f" ({rule} at step {e.get('step')})" if rule and e.get("step") != step
               else f" ({rule})" if rule else "")
        if kind == "rollback":
            what = "restart from" if e.get("restart") else "rollback to"
            warm = f", warmed up over {e['warmup']} steps" if (e.get("warmup") or 0) > 1 else ""
            text = f"{what} step {e.get('to_step')} at lr x{e.get('lr_factor', 1):g}{warm}"
        elif kind == "skip":
            text = f"undo the steps after step {e.get('to_step')}"
        elif kind == "lr_recover":
            text = (f"healthy again: learning rate x{e.get('factor', 1):g} back over "
                    f"{e.get('steps', '?')} steps")
        elif kind == "dropped":
            # whether a rollback follows is the policy's call: it is printed when it comes
            text = ("the step was not applied (its gradient was not finite or a spike; "
                    "skipped on the device)")
            why = ""
        elif kind == "watch":
            text = "a sudden failure in a healthy run: watched before any rollback"
        elif kind == "recovered":
            text = "the sudden failure passed by itself: no rollback"
        elif kind in ("start_check", "lr_check"):
            name = "start check" if kind == "start_check" else "learning-rate check"
            f = float(e.get("lr_factor", 1.0))
            text = (f"{name}: the learning rate stands" if f == 1.0 else
                    f"{name}: learning rate x{f:g}")
            why = f" ({e['reason']})" if e.get("reason") else ""
        else:
            text = str(kind)
        self._print(f"  >> step {step}: {text}{why}")

    @contextlib.contextmanager
    def quiet_watcher_log(self) -> Iterator[None]:
        """Route lrwatch's log to stderr without the event lines this console prints."""
        logger = logging.getLogger("lrwatch")
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_DropEventLines())
        handler.setLevel(logging.WARNING)
        propagate = logger.propagate
        logger.addHandler(handler)
        logger.propagate = False
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.propagate = propagate


def _adamw(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW, fused where this torch has it for the device: a fused step can be skipped on the
    device, for free, when its gradient is not finite (``RecoveryConfig.guard``)."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)


def _check_fault(cfg: DemoConfig) -> None:
    if cfg.inject is not None and cfg.inject not in FAULTS:
        raise ConfigError(f"unknown fault {cfg.inject!r}; choose one of {sorted(FAULTS)}")
    if cfg.inject and not 1 <= _inject_at(cfg) <= cfg.steps:
        raise ConfigError(f"--inject-at {_inject_at(cfg)} is outside the run's {cfg.steps} "
                          f"steps: the fault would never be injected")
    last = _inject_at(cfg) + BURST - 1
    if cfg.inject == "nan-burst" and last > cfg.steps:   # (the burst poisons BURST steps)
        raise ConfigError(f"--inject nan-burst --inject-at {_inject_at(cfg)} poisons steps "
                          f"{_inject_at(cfg)}-{last}, past the run's {cfg.steps} steps: the "
                          f"repeat that rolls back would never come; give " + (
                              f"--inject-at {cfg.steps - BURST + 1} or less, or more --steps"
                              if cfg.steps >= BURST else f"--steps {BURST} or more"))


def run_demo(cfg: DemoConfig, out: TextIO | None = None) -> dict[str, float]:
    """Train the demo model with a Watcher and print progress from the flushed samples.

    Returns a summary (steps, final loss, eval accuracy, seconds).
    """
    out = out if out is not None else sys.stdout
    _check_fault(cfg)   # before loading anything
    torch.manual_seed(cfg.seed)
    data = StdlibText(cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    model = CharGRU(hidden=cfg.hidden)
    opt = _adamw(model, cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup, cfg.steps))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"lrwatch demo: byte-level GRU ({n_params / 1e6:.2f}M parameters) on "
          f"{len(data.train) / 1e6:.1f} MB of Python standard-library source", file=out)

    if cfg.inject:
        print(f"injecting fault {cfg.inject!r} at step {_inject_at(cfg)}: "
              f"{FAULTS[cfg.inject]}", file=out)

    console = DemoConsole(cfg.steps, out, report_every=max(cfg.flush_every,
                                                          cfg.steps // 15 or 1))
    last = console.last

    watch = Watcher(model, opt, sched, flush_every=cfg.flush_every, port=cfg.port, host=cfg.host,
                    trace=cfg.trace, per_layer=cfg.per_layer, update_ratio=cfg.update_ratio,
                    batch_size=cfg.batch_size, listeners=[console.sample], run_name="demo",
                    recovery={"snapshot_dir": cfg.snapshot_dir}, probe_loss=_batch_loss)
    t0 = time.perf_counter()
    interrupted = False
    with watch, console.quiet_watcher_log():
        try:
            if watch.metrics_url:
                print(f"metrics: {watch.metrics_url}", file=out, flush=True)
            if cfg.trace and watch.trace is not None and watch.trace.ok:   # it opened
                print(f"trace:   {os.path.abspath(cfg.trace)}", file=out, flush=True)
            _train(cfg, watch, model, opt, sched, data, console)
        except KeyboardInterrupt:  # Ctrl-C: close the Watcher and say where the run got to
            interrupted = True
        watch.flush()
        seconds = max(time.perf_counter() - t0, 1e-9)
        status = ("interrupted" if interrupted else "stopped" if watch.should_stop else "done")
        stopped = f" (exit status {watch.exit_status})" if watch.should_stop else ""
        print(f"{status}: {watch.step} steps in {seconds:.1f} s "
              f"({watch.step / seconds:.1f} steps/s); schedule at step {sched.last_epoch}/"
              f"{cfg.steps}; rollbacks {watch.policy.rollbacks}; final eval accuracy "
              f"{last.get('eval_accuracy', float('nan')):.3f}{stopped}", file=out, flush=True)
        if cfg.linger > 0 and watch.metrics_url and not interrupted:
            print(f"serving {watch.metrics_url} for {cfg.linger:.0f} s more (Ctrl-C ends it)",
                  file=out, flush=True)
            try:
                time.sleep(cfg.linger)
            except KeyboardInterrupt:
                pass  # the reader has seen enough: a clean end, not an error
    # 130: the shell's status for a run ended by Ctrl-C (SIGINT).
    exit_status = watch.exit_status or (130 if interrupted else 0)
    return {"steps": float(watch.step), "seconds": seconds, "rollbacks": watch.policy.rollbacks,
            "exit_status": exit_status, "schedule_step": sched.last_epoch, **last}


def _train(cfg: DemoConfig, watch: Watcher, model: nn.Module, opt: torch.optim.Optimizer,
           sched: torch.optim.lr_scheduler.LambdaLR, data: StdlibText,
           console: DemoConsole) -> None:
    """The training loop, with the injected fault; ends at the schedule's last step."""
    evals = data.eval_batches()
    inject_at = _inject_at(cfg)
    injected = False
    burst = set(range(inject_at, inject_at + BURST)) if cfg.inject == "nan-burst" else set()

    def stream() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield data.batch()

    # The schedule position (sched.last_epoch) decides when the run is done: after a rollback
    # the restored scheduler resumes from the snapshot's step.
    for x, y in watch.batches(stream()):
        step = sched.last_epoch + 1
        if step > cfg.steps or watch.step >= 4 * cfg.steps:
            break
        poison = step in burst   # each poisoned once: a rollback does not bring them back
        burst.discard(step)
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
        console.schedule_at[watch.step] = step
        watch.log(**metrics)


def _batch_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The training loss of ``batch``, for the Watcher's measurements (the untrained loss)."""
    x, y = batch
    return nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))


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
