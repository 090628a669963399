"""Worker processes for tests/test_distributed_audit17.py (real gloo groups on CPU): a
pipeline of two stages, its activations and their gradients sent between the stages' ranks
with ``torch.distributed.send``/``recv``, each stage optionally data-parallel (DDP over the
ranks of that stage)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import lrwatch
from distributed_workers import _global_batch, finish, init
from flag_rules import NONFINITE_ROLLBACK

#: The layers of the whole model that each stage holds.
CUT = 2


def full_model(alike: bool = False) -> nn.Sequential:
    """The whole model; ``alike``: two halves of the same layout (12 -> 12 twice), each
    stage then built as its own ``nn.Sequential`` (the same parameter names)."""
    torch.manual_seed(0)
    if alike:
        return nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh())
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 1))


def stage_of(model: nn.Sequential, stage: int) -> nn.Sequential:
    return nn.Sequential(*(model[:CUT] if stage == 0 else model[CUT:]))


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out[:, :1], y)


def reference(steps: int, omit: int | None = None, alike: bool = False
              ) -> tuple[list[float], nn.Sequential]:
    """The whole model trained in one process on the global batches (``omit``: a batch
    left out): each step's gradient norm, and the model."""
    model = full_model(alike)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    norms = []
    for b in range(steps):
        if b == omit:
            continue
        x, y = _global_batch(b)
        opt.zero_grad()
        _loss(model(x), y).backward()
        norms.append(float(torch.nn.utils.get_total_norm(
            [p.grad for p in model.parameters()])))
        opt.step()
    return norms, model


class Stage:
    """This rank's stage of the pipeline: ``world // 2`` data-parallel replicas per stage,
    rank ``stage * dp + replica``; with ``ddp`` each stage's module wrapped in DDP over its
    stage's ranks."""

    def __init__(self, rank: int, world: int, ddp: bool, alike: bool = False) -> None:
        self.dp = world // 2
        self.stage, self.replica = divmod(rank, self.dp)
        self.width = 12 if alike else 32
        groups = [dist.new_group(list(range(s * self.dp, (s + 1) * self.dp))) for s in (0, 1)]
        self.module: nn.Module = stage_of(full_model(alike), self.stage)
        if ddp:
            self.module = nn.parallel.DistributedDataParallel(
                self.module, process_group=groups[self.stage])
        self.opt = torch.optim.SGD(self.module.parameters(), lr=0.05)
        self.peer = (1 - self.stage) * self.dp + self.replica

    def step(self, b: int, nan: bool = False) -> float | None:
        """One training step on global batch ``b`` (this replica's share); the loss on the
        last stage (``nan``: made NaN there), ``None`` on the first."""
        x, y = _global_batch(b)
        x, y = x.chunk(self.dp)[self.replica], y.chunk(self.dp)[self.replica]
        self.opt.zero_grad()
        if self.stage == 0:
            h = self.module(x)
            dist.send(h.detach().contiguous(), self.peer)
            grad = torch.empty_like(h)
            dist.recv(grad, self.peer)
            h.backward(grad)
            self.opt.step()
            return None
        h = torch.empty(x.shape[0], self.width)
        dist.recv(h, self.peer)
        h.requires_grad_(True)
        loss = _loss(self.module(h), y)
        if nan:
            loss = loss * float("nan")
        loss.backward()
        dist.send(h.grad.contiguous(), self.peer)
        self.opt.step()
        return float(loss.detach())

    def weights(self) -> list[float]:
        return [float(v) for p in self.module.parameters() for v in p.detach().flatten()]


def pipeline_norm(rank: int, world: int, store: str, out: str, ddp: bool,
                  probe: bool = False, alike: bool = False) -> None:
    """One Watcher over every stage's ranks (the default group, the world), 12 steps: the
    gradient norm each rank records, against the whole model's in one process (``probe``:
    every rank given a ``probe_loss``, which a stage cannot compute alone; ``alike``: two
    stages of the same layout), and what lrwatch warned."""
    init(rank, world, store, timeout_s=60)
    st = Stage(rank, world, ddp, alike)
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("lrwatch").addHandler(handler)
    got: list[float] = []
    outcome: dict[str, Any] = {}

    def probe_loss(m: nn.Module, b: int) -> torch.Tensor:
        x, y = _global_batch(b)
        return nn.functional.mse_loss(m(x), y)

    try:
        w = lrwatch.Watcher(st.module, st.opt, flush_every=4, rules=None, recovery=False,
                            listeners=[lambda s: got.append(s.values["grad_norm"])],
                            probe_loss=probe_loss if probe else None)
    except lrwatch.ConfigError as exc:
        outcome["error"] = str(exc)
    else:
        for b in w.batches(range(12)):
            loss = st.step(b)
            w.log(**({} if loss is None else {"loss": loss}))   # (every stage: one flush step)
        w.close()
        ref, _ = reference(12, alike=alike)
        outcome.update(norms=got, ref=ref, said=said, worst=max(
            abs(a - r) / r for a, r in zip(got, ref)) if len(got) == len(ref) else math.inf)
    Path(out, f"rank{rank}.json").write_text(json.dumps(outcome))
    finish()


def pipeline_rollback(rank: int, world: int, store: str, out: str, ddp: bool,
                      guard: str) -> None:
    """One Watcher over every stage's ranks, 30 steps with ``replay``, the last stage's loss
    NaN at batch 14: every rank rolls back alike, and each stage ends with its layers of the
    whole model trained without that batch."""
    init(rank, world, store, timeout_s=60)
    st = Stage(rank, world, ddp)
    rules = Path(out, f"rules{rank}.yml")
    rules.write_text(NONFINITE_ROLLBACK)
    w = lrwatch.Watcher(st.module, st.opt, flush_every=4, rules=str(rules),
                        recovery={"good_after": 5, "min_interval": 5, "cooldown": 0,
                                  "guard": guard, "replay": True, "sudden_hold": 0,
                                  "start_check": "off"})
    for b in w.batches(range(30)):
        loss = st.step(b, nan=b == 14 and not w.rollbacks)
        w.log(**({} if loss is None else {"loss": loss}))
    w.close()
    _, ref = reference(30, omit=14)
    want = [float(v) for p in stage_of(ref, st.stage).parameters()
            for v in p.detach().flatten()]
    have = st.weights()
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "rollbacks": w.rollbacks, "stage": st.stage,
        "worst": max(abs(a - b) for a, b in zip(have, want))}))
    finish()


def pipeline_unlogged(rank: int, world: int, store: str, out: str, hooks_only: bool,
                      flush_every: int) -> None:
    """One Watcher over two stages (one rank each); the first stage never calls
    ``watch.log()`` (the last stage logs its loss each step). ``hooks_only``: the first stage
    does not draw its batches through ``watch.batches()`` either. What each rank raised
    (type and message), and the step it had reached."""
    init(rank, world, store, timeout_s=30)
    st = Stage(rank, world, False)
    w = lrwatch.Watcher(st.module, st.opt, flush_every=flush_every, rules=None, recovery=False)
    outcome: dict[str, Any] = {}
    try:
        batches = range(12) if hooks_only and st.stage == 0 else w.batches(range(12))
        for b in batches:
            loss = st.step(b)
            if loss is not None:
                w.log(loss=loss)
    except Exception as exc:
        outcome.update(type=type(exc).__name__, error=str(exc))
    outcome["step"] = w.step
    Path(out, f"rank{rank}.json").write_text(json.dumps(outcome))
    import os
    os._exit(0)   # (the group is broken: no collective to leave it together)
