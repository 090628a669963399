"""Worker functions for the distributed tests (spawned processes import them from here)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import lrwatch
from lrwatch.actions.host_memory import state_bytes
from lrwatch.samples import Sample


def init(rank: int, world: int, store: str, timeout_s: float | None = None) -> None:
    """Join the gloo group; ``timeout_s``: a collective waiting longer raises (a test of a
    hang then fails instead of waiting for gloo's default half hour)."""
    import datetime

    torch.set_num_threads(1)
    kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            **kw)


def finish() -> None:
    """Leave the group together: no rank tears the store down while another still uses it.

    Then exit at once. DDP's reducer (and anything else) may still hold the process group, so
    its gloo threads would be torn down during interpreter finalization, where they can abort
    the process ("terminate called without an active exception", pytorch#190489): results are
    already written, so nothing is lost by skipping finalization.
    """
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 1))


def _global_batch(step: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(n, 12, generator=g), torch.randn(n, 1, generator=g)


def _mine(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return t.chunk(world)[rank]


def _write(out: str, rank: int, data: Any) -> None:
    Path(out, f"rank{rank}.json").write_text(json.dumps(data))


def ddp_norm(rank: int, world: int, store: str, out: str) -> None:
    init(rank, world, store)
    ref_model = _model()
    model = nn.parallel.DistributedDataParallel(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05)
    got: list[Sample] = []
    refs = []
    w = lrwatch.Watcher(model, opt, flush_every=3, listeners=[got.append])
    for step in range(7):
        x, y = _global_batch(step)
        ref_opt.zero_grad()
        nn.functional.mse_loss(ref_model(x), y).backward()
        refs.append(float(torch.nn.utils.get_total_norm([p.grad for p in ref_model.parameters()])))
        ref_opt.step()
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(_mine(x, rank, world)), _mine(y, rank, world))
        loss.backward()
        opt.step()
        w.log(loss=loss)
    w.close()
    _write(out, rank, {"norms": [s.values["grad_norm"] for s in got], "refs": refs,
                       "steps": [s.step for s in got], "run": w.run_name})
    finish()


def fsdp_norm(rank: int, world: int, store: str, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    init(rank, world, store)
    ref_model = _model()
    model = _model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=1e-3)
    got: list[Sample] = []
    refs = []
    w = lrwatch.Watcher(model, opt, flush_every=4, listeners=[got.append])
    for step in range(8):
        x, y = _global_batch(step)
        ref_opt.zero_grad()
        nn.functional.mse_loss(ref_model(x), y).backward()
        refs.append(float(torch.nn.utils.get_total_norm([p.grad for p in ref_model.parameters()])))
        ref_opt.step()
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(_mine(x, rank, world)), _mine(y, rank, world))
        loss.backward()
        opt.step()
        w.log(loss=loss)
    w.close()
    _write(out, rank, {"norms": [s.values["grad_norm"] for s in got], "refs": refs,
                       "sharded": w._sharded})
    finish()


def _mse_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
              *, nan: bool) -> torch.Tensor:
    """One optimizer step on the MSE loss, NaN if ``nan``; the loss."""
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    if nan:
        loss = loss * float("nan")
    loss.backward()
    opt.step()
    return loss


def nan_rollback(rank: int, world: int, store: str, out: str, guard: str = "off",
                 flush_lag: int = 0) -> None:
    """A NaN batch on the last rank. ``guard="off"``: every rank rolls back to the same step;
    the default (``"auto"``; parameters on the CPU): DDP's all-reduce hands every rank the NaN
    gradient, so every rank holds that step back, and nothing rolls back. ``flush_lag=1``:
    each flush is judged one step after its copy was queued (the default on CUDA)."""
    init(rank, world, store)
    model = nn.parallel.DistributedDataParallel(_model())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.01 * s))
    w = lrwatch.Watcher(model, opt, sched, flush_every=5, flush_lag=flush_lag,
                        recovery={"guard": guard, "good_after": 10, "min_interval": 5})
    events: list[dict[str, Any]] = []
    w.add_listener(lambda s: events.extend(e for e in s.events if "engine_state" not in e
                                           or e.pop("engine_state", None) is not None or True))
    for step in range(60):
        x, y = _global_batch(step)
        # only the last rank sees the NaN
        loss = _mse_step(model, opt, _mine(x, rank, world), _mine(y, rank, world),
                         nan=rank == world - 1 and sched.last_epoch == 37)
        sched.step()
        w.log(loss=loss)
    w.close()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    _write(out, rank, {
        "rollbacks": [(e["type"], e["step"], e.get("to_step")) for e in events
                      if e.get("type") in ("rollback", "skip", "stop")],
        "dropped": [e["step"] for e in events if e.get("type") == "dropped"],
        "guard": w.recorder.guard,
        "weights_sum": float(flat.double().sum()), "weights": flat.tolist()[:50],
        "finite": bool(torch.isfinite(flat).all()), "sched_step": sched.last_epoch,
        "lr": opt.param_groups[0]["lr"], "flushes": w.flushes})
    finish()


def nan_replay(rank: int, world: int, store: str, out: str) -> None:
    """A NaN batch on the last rank under DDP, through ``watch.batches``: every rank replays
    the same number of its own batches, though the first rank may hold far fewer."""
    init(rank, world, store)
    model = nn.parallel.DistributedDataParallel(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    shard = 16 // world * (12 + 1) * 4                 # the bytes of one rank's batch
    mb = (3.5 if rank == 0 else 1000) * shard / 2 ** 20
    w = lrwatch.Watcher(model, opt, flush_every=5,
                        recovery={"guard": "off",
                                  "good_after": 10, "min_interval": 5, "replay_mb": mb,
                                  "replay": True})
    events: list[dict[str, Any]] = []
    w.add_listener(lambda s: events.extend(e for e in s.events if e.get("type") == "rollback"))

    def stream() -> Any:
        for i in range(70):
            x, y = _global_batch(i)
            yield i, _mine(x, rank, world), _mine(y, rank, world)

    seen = []
    for i, x, y in w.batches(stream()):
        seen.append(i)
        w.log(loss=_mse_step(model, opt, x, y, nan=rank == world - 1 and i == 41))
    w.close()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    _write(out, rank, {
        "rollbacks": [(e["step"], e["to_step"], e.get("replay_drop")) for e in events],
        "seen": seen, "weights": flat.tolist(), "finite": bool(torch.isfinite(flat).all())})
    finish()


def per_rank_export(rank: int, world: int, store: str, out: str, port: int, go: str,
                    pushgateway: str | None = None) -> None:
    init(rank, world, store)
    model = nn.parallel.DistributedDataParallel(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = lrwatch.Watcher(model, opt, flush_every=2, port=port, export="all", run_name="dist",
                        pushgateway=pushgateway)
    for step in range(10):
        x, y = _global_batch(step)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(_mine(x, rank, world)), _mine(y, rank, world))
        loss.backward()
        opt.step()
        w.log(loss=loss)
    w.flush()
    _write(out, rank, {"url": w.metrics_url})
    deadline = time.time() + 90
    while not os.path.exists(go) and time.time() < deadline:  # serve until the test has read
        time.sleep(0.2)
    w.close()
    finish()


def _probing_watcher(model: nn.Module, opt: Any, probe_loss: Any) -> lrwatch.Watcher:
    """A Watcher whose rollbacks measure their rate (probe="auto"), no start check."""
    return lrwatch.Watcher(model, opt, flush_every=5, probe_loss=probe_loss,
                           recovery={"good_after": 10, "min_interval": 5,
                                     "restart_warmup": 10, "probe": "auto",
                                     "start_check": "off"})


def _recovery_events(events: list[Any]) -> list[Any]:
    """The rollback, probe and stop events, as comparable tuples."""
    return [(e["type"], e["step"], e.get("to_step"), e.get("lr_factor"), e.get("steps"))
            for e in events if e.get("type") in ("rollback", "probe", "stop")]


def _watched_mse_loop(w: lrwatch.Watcher, model: nn.Module, opt: torch.optim.Optimizer,
                      stream: Any, events: list[dict[str, Any]], steps: int) -> None:
    """Train on ``w.batches(stream)`` with an MSE loss until ``steps`` steps, collecting the
    trace events (without the engine state) in ``events``; then close the Watcher."""
    w.add_listener(lambda s: events.extend({k: v for k, v in e.items() if k != "engine_state"}
                                           for e in s.events))
    for x, y in w.batches(stream):
        if w.step >= steps:
            break
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        w.log(loss=loss)
    w.close()


def probe_restart(rank: int, world: int, store: str, out: str, kind: str = "ddp") -> None:
    """SGD far too hot under DDP (or FSDP2): every rank restarts and measures the same rate in
    lock-step (each on its own shard of the batches)."""
    init(rank, world, store)
    model = _wrapped(kind)
    opt = torch.optim.SGD(model.parameters(), lr=8.0)
    events: list[dict[str, Any]] = []
    shard_of = {}

    def stream() -> Any:
        for step in range(10_000):
            x, y = _global_batch(step)
            yield _mine(x, rank, world), _mine(y, rank, world)

    def probe_loss(m: nn.Module, batch: Any) -> torch.Tensor:
        shard_of[rank] = True
        return nn.functional.mse_loss(m(batch[0]), batch[1])

    w = _probing_watcher(model, opt, probe_loss)
    _watched_mse_loop(w, model, opt, stream(), events, steps=80)
    flat = torch.tensor(_full_weights(model))
    _write(out, rank, {
        "events": _recovery_events(events),
        "probe_steps": w.policy.state.probe_steps, "weights": flat.tolist(),
        "finite": bool(torch.isfinite(flat).all()), "lr": opt.param_groups[0]["lr"],
        "step": w.step, "probed": bool(shard_of)})
    finish()


def start_check(rank: int, world: int, store: str, out: str, kind: str = "ddp",
                gate: float = 0.0) -> None:
    """SGD far too hot under DDP (or FSDP2): every rank trains its own shadow at a tenth on
    its own shard (the wrapper reduces its gradients; under FSDP2 the states are captured and
    restored as sharded state dicts); the held-out losses are averaged over the ranks, so all
    of them adopt it at the same step and stay identical. ``gate``: the start check's gate
    (0: the shadow is trained whatever the first steps did; the default gate reads each
    rank's own batches, and the worst rank decides for all)."""
    init(rank, world, store)
    model = _wrapped(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.6)   # higher blows up before step 10
    events: list[dict[str, Any]] = []

    def stream() -> Any:
        for step in range(10_000):
            x, _ = _global_batch(step)
            y = torch.tanh(x[:, :1] - x[:, 1:2])            # learnable
            yield _mine(x, rank, world), _mine(y, rank, world)

    def probe_loss(m: nn.Module, batch: Any) -> torch.Tensor:
        return nn.functional.mse_loss(m(batch[0]), batch[1])

    w = lrwatch.Watcher(model, opt, flush_every=5, probe_loss=probe_loss,
                        recovery={"start_check_gate": gate})
    _watched_mse_loop(w, model, opt, stream(), events, steps=40)
    _write(out, rank, {
        "checks": [(e["step"], e["lr_factor"], e.get("held_out_loss"), e.get("shadow_loss"),
                    e.get("worst_ratio")) for e in events if e.get("type") == "start_check"],
        "weights": _full_weights(model), "lr": opt.param_groups[0]["lr"], "step": w.step,
        "probe_steps": w.policy.state.probe_steps,
        "need": state_bytes(model, opt)})
    finish()


def stall_cut(rank: int, world: int, store: str, out: str) -> None:
    """Targets that are noise: the loss sits at its floor from the start, so the training
    pack's stall test halves the rate (no scheduler). Each rank sees its own shard; the rules
    judge the combined rows, so every rank cuts at the same step."""
    init(rank, world, store)
    model = nn.parallel.DistributedDataParallel(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    w = lrwatch.Watcher(model, opt, flush_every=10)
    cuts: list[int] = []
    w.add_listener(lambda s: cuts.extend(e["step"] for e in s.events
                                         if e.get("type") == "reduce_lr"))
    for step in range(200):
        x, y = _global_batch(step)
        loss = _mse_step(model, opt, _mine(x, rank, world), _mine(y, rank, world), nan=False)
        w.log(loss=loss)
    w.close()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    _write(out, rank, {"cuts": cuts, "reductions": w.policy.state.lr_reductions,
                       "lr": opt.param_groups[0]["lr"], "weights": flat.tolist()[:50],
                       "weights_sum": float(flat.double().sum())})
    finish()


def _fsdp_model() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _wrapped(kind: str) -> nn.Module:
    """The test model under DDP (``"ddp"``) or FSDP2 (``"fsdp"``: every layer sharded)."""
    return nn.parallel.DistributedDataParallel(_model()) if kind == "ddp" else _fsdp_model()


def _full_weights(model: nn.Module) -> list[float]:
    """Every parameter gathered whole (FSDP2 parameters are DTensor shards)."""
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return torch.cat([t.detach().flatten() for t in full]).tolist()



def memory_guard(rank: int, world: int, store: str, out: str, mode: str) -> None:
    """The host memory as each rank sees it is made small (``"one_short"``: the last rank's
    only; ``"shared"``: every rank's room fits its own copies but not all the ranks' together)
    or large (``"fits"``). A NaN batch on the last rank at step 25 (the guard off) then asks
    for a rollback. The ranks must agree: the same snapshots, the start check on all or none,
    the same stop."""
    from lrwatch.actions import host_memory

    init(rank, world, store)
    model = nn.parallel.DistributedDataParallel(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.6)
    need = host_memory.state_bytes(model, opt)
    free = {"fits": 10 ** 12, "shared": int(3.5 * need),
            "one_short": 1024 if rank == world - 1 else 10 ** 12}[mode]
    host_memory._meminfo_available = lambda: free      # type: ignore[assignment]
    host_memory.cgroup_room_bytes = lambda: None       # type: ignore[assignment]
    events: list[dict[str, Any]] = []
    said: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda r: said.append(r.getMessage())   # type: ignore[method-assign]
    logging.getLogger("lrwatch").addHandler(handler)

    def stream() -> Any:
        for step in range(10_000):
            x, _ = _global_batch(step)
            yield _mine(x, rank, world), _mine(torch.tanh(x[:, :1] - x[:, 1:2]), rank, world)

    def probe_loss(m: nn.Module, batch: Any) -> torch.Tensor:
        return nn.functional.mse_loss(m(batch[0]), batch[1])

    w = lrwatch.Watcher(model, opt, flush_every=5, probe_loss=probe_loss,
                        recovery={"guard": "off", "good_after": 5, "min_interval": 5})
    w.add_listener(lambda s: events.extend({k: v for k, v in e.items() if k != "engine_state"}
                                           for e in s.events))
    for x, y in w.batches(stream()):
        if w.step >= 40:
            break
        loss = _mse_step(model, opt, x, y, nan=rank == world - 1 and w.step + 1 == 25)
        w.log(loss=loss)
    w.close()
    assert w.store is not None
    _write(out, rank, {
        "snapshots": [s.step for s in w.store.snapshots], "failed": w.store.failed,
        "checks": [e["step"] for e in events if e.get("type") == "start_check"],
        "actions": [(e["type"], e["step"]) for e in events
                    if e.get("type") in ("rollback", "stop")],
        "stopped": w.should_stop, "step": w.step, "reason": str(w.stop_reason),
        "said": said, "weights": _full_weights(model)})
    finish()


def snapshot_fails_on_one_rank(rank: int, world: int, store: str, out: str,
                               flush_lag: int = 0) -> None:
    """The snapshots of steps 26-47 cannot be captured on the last rank only (the guard off);
    a NaN batch on rank 0 at step 48 then asks for a rollback: every rank must go
    back to the same step, a snapshot every rank holds."""
    from lrwatch.actions import snapshot as snapmod

    init(rank, world, store)
    model = nn.parallel.DistributedDataParallel(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    capture, watchers = snapmod.capture_state, []

    def flaky(*a: Any, **k: Any) -> Any:
        # the interval adapts to the step time, at most 10 steps: at least one falls here
        if rank == world - 1 and watchers and 26 <= watchers[0].step <= 47:
            raise RuntimeError("capture failed on this rank only")
        return capture(*a, **k)
    snapmod.capture_state = flaky   # type: ignore[assignment]
    w = lrwatch.Watcher(model, opt, flush_every=5, flush_lag=flush_lag,
                        recovery={"guard": "off", "good_after": 5, "min_interval": 5,
                                  "max_interval": 10})
    watchers.append(w)
    events: list[dict[str, Any]] = []
    w.add_listener(lambda s: events.extend(e for e in s.events
                                           if e.get("type") in ("rollback", "stop")))
    for step in range(60):
        x, y = _global_batch(step)
        loss = _mse_step(model, opt, _mine(x, rank, world), _mine(y, rank, world),
                         nan=rank == 0 and w.step + 1 == 48)
        w.log(loss=loss)
    w.close()
    assert w.store is not None
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    _write(out, rank, {"actions": [(e["type"], e["step"], e.get("to_step")) for e in events],
                       "snapshots": [s.step for s in w.store.snapshots],
                       "failed": w.store.failed, "weights_sum": float(flat.double().sum()),
                       "finite": bool(torch.isfinite(flat).all())})
    finish()


def start_check_fails_on_one_rank(rank: int, world: int, store: str, out: str,
                                  mode: str) -> None:
    """The start check where only the last rank fails: ``"capture"``, its start state cannot
    be saved; ``"probe"``, its ``probe_loss`` raises on a held-out batch of the check;
    ``"probe_train"``, on a training step of the shadow (under DDP). Every rank must
    skip the check (or give it up) alike, with no rank left waiting in a collective."""
    from lrwatch import start_check_side

    init(rank, world, store, timeout_s=60)
    model = _wrapped("ddp")
    opt = torch.optim.SGD(model.parameters(), lr=0.6)
    last = rank == world - 1
    if mode == "capture" and last:
        def no_capture(*a: Any, **k: Any) -> Any:
            raise RuntimeError("cannot save the start state on this rank")
        start_check_side.capture_state = no_capture   # type: ignore[assignment]
    calls = [0]

    def stream() -> Any:
        for step in range(10_000):
            x, _ = _global_batch(step)
            yield _mine(x, rank, world), _mine(torch.tanh(x[:, :1] - x[:, 1:2]), rank, world)

    def probe_loss(m: nn.Module, batch: Any) -> torch.Tensor:
        calls[0] += 1   # the first 11: the untrained and constant losses; then 5 held out
        if mode.startswith("probe") and last and calls[0] > (17 if mode == "probe_train" else 12):
            raise RuntimeError("probe_loss failed on this rank")
        return nn.functional.mse_loss(m(batch[0]), batch[1])

    w = lrwatch.Watcher(model, opt, flush_every=5, probe_loss=probe_loss,
                        recovery={"start_check_gate": 0.0})
    events: list[dict[str, Any]] = []
    _watched_mse_loop(w, model, opt, stream(), events, steps=40)
    _write(out, rank, {
        "checks": [e["step"] for e in events if e.get("type") == "start_check"],
        "weights": _full_weights(model), "lr": opt.param_groups[0]["lr"], "step": w.step,
        "errors": w.exporter.internal_errors._value.get()})
    finish()


def probe_fails_on_one_rank(rank: int, world: int, store: str, out: str) -> None:
    """SGD far too hot under DDP: the rollback's range test (``probe="auto"``) runs on every
    rank, and the last rank's ``probe_loss`` raises in it. Every rank must give the test up
    alike (the fixed factor stands in), with no rank left waiting in a collective."""
    init(rank, world, store, timeout_s=60)
    model = _wrapped("ddp")
    opt = torch.optim.SGD(model.parameters(), lr=8.0)
    events: list[dict[str, Any]] = []
    calls = [0]

    def stream() -> Any:
        for step in range(10_000):
            x, y = _global_batch(step)
            yield _mine(x, rank, world), _mine(y, rank, world)

    def probe_loss(m: nn.Module, batch: Any) -> torch.Tensor:
        calls[0] += 1   # the first 11: the untrained and constant losses
        if rank == world - 1 and calls[0] > 13:
            raise RuntimeError("probe_loss failed on this rank")
        return nn.functional.mse_loss(m(batch[0]), batch[1])

    w = _probing_watcher(model, opt, probe_loss)
    _watched_mse_loop(w, model, opt, stream(), events, steps=60)
    flat = torch.tensor(_full_weights(model))
    _write(out, rank, {
        "events": _recovery_events(events),
        "weights": flat.tolist(), "lr": opt.param_groups[0]["lr"], "step": w.step,
        "calls": calls[0], "errors": w.exporter.internal_errors._value.get()})
    finish()


def adapter_start_check_fails_on_one_rank(rank: int, world: int, store: str, out: str,
                                          which: int) -> None:
    """The start check as the framework callbacks drive it (``start_check_batch`` and
    ``start_check_boundary``, the framework drawing the data) under DDP, where the last rank
    cannot save a state: ``which`` 1, the start state; 2, the run's after its first steps.
    Every rank must skip the check alike, with no rank left waiting in a collective."""
    from lrwatch import start_check_side

    init(rank, world, store, timeout_s=60)
    model = _wrapped("ddp")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    capture, captures = start_check_side.capture_state, [0]

    def flaky(*a: Any, **k: Any) -> Any:
        captures[0] += 1
        if rank == world - 1 and captures[0] == which:
            raise RuntimeError("cannot save a state on this rank")
        return capture(*a, **k)
    start_check_side.capture_state = flaky   # type: ignore[assignment]

    def probe_loss(m: nn.Module, batch: Any) -> torch.Tensor:
        return nn.functional.mse_loss(m(batch[0]), batch[1])

    w = lrwatch.Watcher(model, opt, flush_every=5, probe_loss=probe_loss,
                        recovery={"start_check_gate": 0.0})
    events: list[dict[str, Any]] = []
    w.add_listener(lambda s: events.extend(e for e in s.events
                                           if e.get("type") == "start_check"))
    for step in range(30):
        x, _ = _global_batch(step)
        batch = _mine(x, rank, world), _mine(torch.tanh(x[:, :1] - x[:, 1:2]), rank, world)
        w.start_check_batch(batch)
        loss = _mse_step(model, opt, *batch, nan=False)
        w.log(loss=loss)
        w.start_check_boundary()
    w.close()
    _write(out, rank, {
        "checks": [e["step"] for e in events], "weights": _full_weights(model),
        "lr": opt.param_groups[0]["lr"], "step": w.step, "captures": captures[0],
        "errors": w.exporter.internal_errors._value.get()})
    finish()


def resume_nonfinite_shard(rank: int, world: int, store: str, out: str) -> None:
    """FSDP2: the resumed weights are not finite in the last rank's shard only (a checkpoint
    written after a failure lrwatch had not judged yet). Only that rank sees it, and drops the
    run's start; every rank must then take the same decision at the NaN that follows."""
    init(rank, world, store, timeout_s=60)
    model = _fsdp_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = lrwatch.Watcher(model, opt, flush_every=5,
                        recovery={"guard": "off", "good_after": 5, "min_interval": 5})
    state = w.state_dict()
    if rank == world - 1:
        with torch.no_grad():
            next(model.parameters()).to_local().view(-1)[0] = float("nan")
    w.load_state_dict(state)
    events: list[dict[str, Any]] = []
    w.add_listener(lambda s: events.extend(e for e in s.events
                                           if e.get("type") in ("rollback", "stop")))
    for step in range(20):
        if w.should_stop:
            break
        x, y = _global_batch(step)
        w.log(loss=_mse_step(model, opt, _mine(x, rank, world), _mine(y, rank, world),
                             nan=False))
    w.close()
    _write(out, rank, {"actions": [(e["type"], e["step"]) for e in events],
                       "stopped": w.should_stop, "step": w.step})
    finish()


def probe_with_no_batch_on_one_rank(rank: int, world: int, store: str, out: str) -> None:
    """SGD far too hot under DDP, driven the way the framework callbacks drive the Watcher
    (``skip_batch``, ``remember_batch``, ``log``): the last rank hands no batch to
    ``remember_batch``, so its range-test buffer is empty when the restart's range test
    (``probe="auto"``) comes. Every rank must test, or none (the fixed factor stands in),
    with no rank left waiting in the test's collectives."""
    init(rank, world, store, timeout_s=60)
    model = _wrapped("ddp")
    opt = torch.optim.SGD(model.parameters(), lr=8.0)
    events: list[dict[str, Any]] = []

    def probe_loss(m: nn.Module, batch: Any) -> torch.Tensor:
        return nn.functional.mse_loss(m(batch[0]), batch[1])

    w = _probing_watcher(model, opt, probe_loss)
    w.add_listener(lambda s: events.extend({k: v for k, v in e.items() if k != "engine_state"}
                                           for e in s.events))
    for step in range(10_000):
        if w.step >= 60 or w.should_stop:
            break
        if w.skip_batch():
            continue
        x, y = _global_batch(step)
        batch = _mine(x, rank, world), _mine(y, rank, world)
        if rank != world - 1:
            w.remember_batch(batch)
        w.log(loss=_mse_step(model, opt, *batch, nan=False))
    w.close()
    flat = torch.tensor(_full_weights(model))
    _write(out, rank, {
        "events": _recovery_events(events), "weights": flat.tolist(),
        "lr": opt.param_groups[0]["lr"], "step": w.step,
        "probe_steps": w.policy.state.probe_steps})
    finish()


def best_state_resume(rank: int, world: int, store: str, out: str) -> None:
    """Each rank holds a different part of the model (a pipeline stage: here a network of
    its own seed) and keeps its own best evaluated state beside the snapshots. Rank 0 alone
    writes the checkpoint of ``Watcher.state_dict()``; every rank resumes from it and
    restores the best: each must get its own stage's weights back, not rank 0's."""
    init(rank, world, store, timeout_s=60)
    model = _model(seed=rank)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    snaps = Path(out, "snapshots")
    kw: dict[str, Any] = dict(flush_every=5, rules=None, keep_best="eval_loss",
                              recovery={"snapshot_dir": str(snaps)})
    w = lrwatch.Watcher(model, opt, **kw)
    kept: list[float] = []
    for step in range(12):
        x, y = _global_batch(step)
        loss = _mse_step(model, opt, x, y, nan=False)
        if step in (4, 9):   # an evaluation every rank agrees on (a framework's synced metric)
            w.log(loss=loss, eval_loss=1.0 if step == 4 else 0.5)
            if step == 9:
                kept = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
        else:
            w.log(loss=loss)
    ckpt = Path(out, "ckpt.json")
    if rank == 0:
        ckpt.write_text(json.dumps(w.state_dict()))
    w.close()
    dist.barrier()
    with torch.no_grad():   # the resumed weights are not the best ones
        for p in model.parameters():
            p.add_(1.0)
    w = lrwatch.Watcher(model, opt, **kw)
    w.load_state_dict(json.loads(ckpt.read_text()))
    restored = w.restore_best()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
    w.close()
    _write(out, rank, {"step": restored.step if restored else None,
                       "where": Path(restored.where).name if restored else None,
                       "own": flat == kept})
    finish()


def ddp_join(rank: int, world: int, store: str, out: str, throw: bool) -> None:
    """DDP under ``torch.distributed``'s ``Join`` (uneven inputs): the last rank has 12
    batches, the others 20. A joined rank shadows DDP's collectives, not lrwatch's gather at
    each flush. ``throw``: ``Join(..., throw_on_early_termination=True)``, where every rank
    stops at the first rank out of data, in lock-step."""
    from torch.distributed.algorithms.join import Join

    init(rank, world, store, timeout_s=60)
    model = nn.parallel.DistributedDataParallel(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = lrwatch.Watcher(model, opt, flush_every=5)
    error = None
    try:
        with Join([model], throw_on_early_termination=throw):
            for step in range(12 if rank == world - 1 else 20):
                x, y = _global_batch(step)
                w.log(loss=_mse_step(model, opt, _mine(x, rank, world), _mine(y, rank, world),
                                     nan=False))
    except (lrwatch.ConfigError, RuntimeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    w.close()
    _write(out, rank, {"error": error, "step": w.step, "flushes": w.flushes})
    finish()


def fsdp_guard_spike_on_one_shard(rank: int, world: int, store: str, out: str) -> None:
    """FSDP2, one Linear layer sharded by rows: rank 0 holds outputs 0-3, rank 1 outputs 4-7.
    At step 41 the batch's targets of outputs 0-3 are 1000x off, so the gradient spikes in
    rank 0's shard only. The guard must take one decision for the whole step: either every
    shard steps or none does (a step applied to half the parameters is no step anyone took)."""
    from torch.distributed.fsdp import fully_shard

    init(rank, world, store, timeout_s=60)
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = lrwatch.Watcher(model, opt, flush_every=5)

    def full() -> torch.Tensor:
        return model.weight.full_tensor().detach().clone()

    deltas = {}
    for step in range(1, 46):
        g = torch.Generator().manual_seed(900 + step)
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
        if step == 41:
            y[:, :4] += 1000.0
        before = full() if step == 41 else None
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(_mine(x, rank, world)), _mine(y, rank, world))
        loss.backward()
        opt.step()
        w.log(loss=loss)
        if before is not None:
            after = full()
            deltas = {"rows_0_3": float((after[:4] - before[:4]).abs().max()),
                      "rows_4_7": float((after[4:] - before[4:]).abs().max())}
    w.close()
    _write(out, rank, {"deltas": deltas})
    finish()
