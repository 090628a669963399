"""The same run judged live by the Watcher and replayed from its trace gives identical firings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lrwatch
from lrwatch.exporters.trace import read_trace
from lrwatch.rules import load_pack
from lrwatch.rules.replay import replay_trace
from lrwatch.samples import Sample


def _firings_from_trace_events(samples: list[Sample]) -> list[tuple[str, int, str]]:
    return [(e["rule"], e["step"], e["severity"]) for s in samples for e in s.events
            if e.get("type") == "firing"]


@pytest.mark.parametrize("flush_lag", [0, 1])
@pytest.mark.parametrize("measured", [False, True])
@pytest.mark.parametrize("inject", ["none", "lr-bug", "nan", "nan-dropped"])
def test_replay_of_a_live_trace_gives_the_live_firings(tmp_path: Path, inject: str,
                                                       measured: bool, flush_lag: int) -> None:
    # measured: the Watcher measures the untrained loss (probe_loss, watch.batches), and the
    # rules judge against it live and in the replay alike; flush_lag=1: each flush judged one
    # step after its copy was queued (the default on CUDA)
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x @ torch.randn(10, 1)).squeeze(1)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=300)
    trace = tmp_path / "live.jsonl"
    seen: list[Sample] = []

    def batch_loss(m: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(m(x[idx]).squeeze(1), y[idx])

    w = lrwatch.Watcher(model, opt, sched, trace=trace, flush_every=7, listeners=[seen.append],
                        flush_lag=flush_lag,
                        recovery={"good_after": 20, "min_interval": 10,
                                  # "nan": the step is applied and rolled back; "nan-dropped":
                                  # the guard drops it on the device, nothing rolls back
                                  "guard": "off" if inject == "nan" else "on"},
                        probe_loss=batch_loss if measured else None)
    g = torch.Generator().manual_seed(1)
    order = [torch.randint(0, 256, (32,), generator=g) for _ in range(200)]
    for idx in (w.batches(order) if measured else order):
        s = sched.last_epoch
        if inject == "lr-bug" and s == 120:
            sched.base_lrs = [b * 200 for b in sched.base_lrs]
            for group in opt.param_groups:
                group["lr"] *= 200
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x[idx]).squeeze(1), y[idx])
        if inject.startswith("nan") and s == 90:
            loss = loss * float("nan")
        loss.backward()
        opt.step()
        sched.step()
        w.log(loss=loss)
    w.close()
    live = _firings_from_trace_events(seen)
    if inject != "none":
        assert live, "the injected fault must fire a rule"
        assert w.policy.rollbacks >= (inject != "nan-dropped")
        if inject.startswith("nan"):
            assert w.policy.state.drops_handled == (inject == "nan-dropped")
    assert ("untrained_loss" in seen[0].values) == measured
    replayed = replay_trace(trace, load_pack("training"))
    assert replayed.error is None
    assert [(f.rule, f.step, f.severity) for f in replayed.firings] == live


@pytest.mark.parametrize("drift", [0.0, 0.02])
def test_replay_equals_live_with_evaluations_on_a_cyclical_schedule(tmp_path: Path,
                                                                   drift: float) -> None:
    """Evaluations judged against the best at a comparable rate (`given: lr`): the engine
    carries the rate from the training samples, live and in replay alike. With ``drift`` the
    held-out targets move away every evaluation from step 150 (a silent regression)."""
    torch.manual_seed(0)
    x, xe = torch.randn(256, 10), torch.randn(128, 10)
    w_true = torch.randn(10, 1)
    y, ye = (x @ w_true).squeeze(1), (xe @ w_true).squeeze(1)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.002, max_lr=0.02, step_size_up=40)
    trace = tmp_path / "live.jsonl"
    seen: list[Sample] = []
    w = lrwatch.Watcher(model, opt, sched, trace=trace, flush_every=7, listeners=[seen.append])
    g = torch.Generator().manual_seed(1)
    for step in range(1, 241):
        idx = torch.randint(0, 256, (32,), generator=g)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x[idx]).squeeze(1), y[idx])
        loss.backward()
        opt.step()
        sched.step()
        if step % 10:
            w.log(loss=loss)
            continue
        with torch.no_grad():
            off = drift * max(0, step - 150)
            ev = nn.functional.mse_loss(model(xe).squeeze(1), ye + off)
        w.log(loss=loss, eval_loss=ev)
    w.close()
    live = _firings_from_trace_events(seen)
    if drift:
        assert any(r.startswith("eval_") for r, _, _ in live), live
    replayed = replay_trace(trace, load_pack("training"))
    assert replayed.error is None
    assert [(f.rule, f.step, f.severity) for f in replayed.firings] == live


def _regression_data() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The resume tests' data: a seeded linear regression and a fixed order of 220 batches."""
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x @ torch.randn(10, 1)).squeeze(1)
    g = torch.Generator().manual_seed(1)
    return x, y, [torch.randint(0, 256, (32,), generator=g) for _ in range(220)]


def test_a_resumed_run_continues_its_trace_and_replay_follows_it(tmp_path: Path) -> None:
    """A run checkpointed at step 60 goes on to step 80 and dies; the resumed run loads the
    checkpoint into a new Watcher on the same trace path. The trace keeps steps 1-60, drops
    61-80 (trained again now) and goes on; the resume event carries the detectors' state of the
    checkpoint (which had not judged the steps since its last flush), so replay decides as the
    resumed run did, a fault after the resume included."""
    x, y, order = _regression_data()
    trace = tmp_path / "run.jsonl"

    def train(w: lrwatch.Watcher, model: nn.Module, opt: torch.optim.Optimizer,
              sched: torch.optim.lr_scheduler.LRScheduler, until: int) -> None:
        while w.step < until and not w.should_stop:
            s = sched.last_epoch
            if s == 150:    # a configuration bug after the resume: the rate x200
                sched.base_lrs = [b * 200 for b in sched.base_lrs]
                for group in opt.param_groups:
                    group["lr"] *= 200
            opt.zero_grad()
            idx = order[s]
            loss = nn.functional.mse_loss(model(x[idx]).squeeze(1), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            w.log(loss=loss)

    def build() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        torch.manual_seed(2)
        model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        return model, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=300)

    model, opt, sched = build()
    w = lrwatch.Watcher(model, opt, sched, trace=trace, flush_every=7)
    train(w, model, opt, sched, 60)
    ckpt = {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "opt": opt.state_dict(), "sched": sched.state_dict(), "watch": w.state_dict()}
    train(w, model, opt, sched, 80)
    w.close()                                    # (a run that dies flushes nothing more)
    assert [s.step for s in read_trace(trace)][-1] == 80

    model, opt, sched = build()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    w = lrwatch.Watcher(model, opt, sched, trace=trace, flush_every=7,
                        recovery={"good_after": 20, "min_interval": 10})
    w.load_state_dict(ckpt["watch"])
    train(w, model, opt, sched, 200)
    w.close()
    samples = read_trace(trace)
    assert [s.step for s in samples] == list(range(1, len(samples) + 1))
    resumed = [e for s in samples for e in s.events if e.get("type") == "resume"]
    assert len(resumed) == 1 and resumed[0]["step"] == 60 and resumed[0]["trace_lines"] == 60
    live = _firings_from_trace_events(samples)
    assert any(step > 150 for _, step, _ in live), "the fault after the resume must fire"
    replayed = replay_trace(trace, load_pack("training"))
    assert replayed.error is None
    assert [(f.rule, f.step, f.severity) for f in replayed.firings] == live


@pytest.mark.parametrize("flush_lag", [0, 1])
def test_a_checkpoint_loaded_mid_run_into_the_same_watcher_continues_its_trace(
        tmp_path: Path, flush_lag: int) -> None:
    """The same run, resumed in the same process: at step 80 the model, optimizer, scheduler
    and the same Watcher load the checkpoint of step 60. The trace's steps went back from 80
    to 61 (a file a strict reader refuses). It goes on as a resumed run's does: steps 1-60
    kept, 61-80 (trained again now) gone, with the resume event; the steps not flushed yet at
    the load were trained after the checkpoint and go too."""
    x, y, order = _regression_data()
    trace = tmp_path / "run.jsonl"
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=300)
    w = lrwatch.Watcher(model, opt, sched, trace=trace, flush_every=7, flush_lag=flush_lag)

    def train(until: int) -> None:
        while w.step < until and not w.should_stop:
            s = sched.last_epoch
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x[order[s]]).squeeze(1), y[order[s]])
            loss.backward()
            opt.step()
            sched.step()
            w.log(loss=loss)

    train(60)
    ckpt = {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "opt": opt.state_dict(), "sched": sched.state_dict(), "watch": w.state_dict()}
    train(80)                                # 80 is not a flush step: 78-80 wait for one
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    w.load_state_dict(ckpt["watch"])
    train(120)
    w.close()
    samples = read_trace(trace)   # strict: the steps must increase
    assert [s.step for s in samples] == list(range(1, 121))
    resumed = [(s.step, e) for s in samples for e in s.events if e.get("type") == "resume"]
    assert [(at, e["step"], e["trace_lines"]) for at, e in resumed] == [(61, 60, 60)]
    replayed = replay_trace(trace, load_pack("training"))
    assert replayed.error is None
    assert ([(f.rule, f.step, f.severity) for f in replayed.firings]
            == _firings_from_trace_events(samples))
