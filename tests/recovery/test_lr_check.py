"""The pre-flight learning-rate check (``recovery={"lr_check": "auto"}``): a range test on the
first batches before the first step, which lowers a rate past the edge of stability and keeps a
good one, leaves the model, optimizer and data untouched, and is booked against the budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lrwatch
from lrwatch.errors import ConfigError
from lrwatch.exporters.trace import read_trace
from lrwatch.recovery.policy import RecoveryConfig, RecoveryPolicy


def _setup(lr: float, seed: int = 0) -> tuple:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(20, 4, generator=g)
    batches = []
    for _ in range(60):
        x = torch.randn(32, 20, generator=g)
        batches.append((x, (x @ truth).argmax(1)))
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), batches


def _loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _train(w: lrwatch.Watcher, model: nn.Module, opt: torch.optim.Optimizer,
           batches: list) -> tuple[list, list]:
    """Train over ``batches``; returns the batches seen and the parameters at the first one."""
    seen, first_params = [], None
    for b in w.batches(batches):
        if first_params is None:
            first_params = [p.detach().clone() for p in model.parameters()]
        seen.append(b)
        loss = _loss(model, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        w.log(loss=loss.detach())
    return seen, first_params


def test_a_rate_past_the_edge_is_lowered_and_nothing_else_changes(tmp_path: Path) -> None:
    model, opt, batches = _setup(lr=20.0)       # SGD momentum at 20: blows up at once
    init = [p.detach().clone() for p in model.parameters()]
    w = lrwatch.Watcher(model, opt, flush_every=5, trace=tmp_path / "t.jsonl",
                        recovery={"lr_check": "auto", "lr_check_steps": 15, "start_check": "off"},
                        probe_loss=_loss)
    seen, first_params = _train(w, model, opt, batches)
    w.close()
    assert seen[0] is batches[0] and len(seen) == len(batches)   # the tested batches trained
    assert w.data_position == len(batches)
    assert all(torch.equal(a, b) for a, b in zip(init, first_params))   # probe left no trace
    st = w.policy.state
    assert st.lr_checked and 3 <= st.probe_steps <= 15 and st.probes == 1
    events = [e for rec in read_trace(tmp_path / "t.jsonl") for e in rec.events
              if isinstance(e, dict) and e.get("type") == "lr_check"]
    assert len(events) == 1 and events[0]["lr"] == 20.0
    lr = 20.0 * events[0]["lr_factor"]
    assert lr < 20.0 * 0.1, lr                   # started far below the configured rate
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the run's starting point (a restart's target) carries the checked rate
    pinned = [s for s in w.store.snapshots if s.pinned]
    assert len(pinned) == 1
    assert pinned[0].load()["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr)


def test_a_good_rate_stands() -> None:
    model, opt, batches = _setup(lr=0.01)
    w = lrwatch.Watcher(model, opt, flush_every=5,
                        recovery={"lr_check": "auto", "lr_check_steps": 15, "start_check": "off"},
                        probe_loss=_loss)
    _train(w, model, opt, batches[:40])
    w.close()
    assert opt.param_groups[0]["lr"] == 0.01
    # booked: 15 steps + 16 forwards of the fixed batch (before the first step and after
    # each) at a third of a step each, rounded up
    assert w.policy.state.lr_checked and w.policy.state.probe_steps == 15 + 6


def test_the_check_runs_once_and_not_after_a_resume() -> None:
    model, opt, batches = _setup(lr=20.0)
    w = lrwatch.Watcher(model, opt, flush_every=5, recovery={"lr_check": "auto", "start_check": "off"},
                        probe_loss=_loss)
    _train(w, model, opt, batches[:20])
    state = w.state_dict()
    lr = opt.param_groups[0]["lr"]
    steps = w.policy.state.probe_steps
    _train(w, model, opt, batches[20:40])          # a second loop over new batches
    assert w.policy.state.probe_steps == steps
    w.close()
    w2 = lrwatch.Watcher(model, opt, flush_every=5, recovery={"lr_check": "auto", "start_check": "off"},
                         probe_loss=_loss)
    w2.load_state_dict(state)
    _train(w2, model, opt, batches[40:60])
    w2.close()
    assert w2.policy.state.probe_steps == steps
    assert opt.param_groups[0]["lr"] <= lr


def test_configuration_errors_say_what_to_fix() -> None:
    model, opt, _ = _setup(lr=0.1)
    with pytest.raises(ConfigError, match="probe_loss"):
        lrwatch.Watcher(model, opt, recovery={"lr_check": "auto"})
    with pytest.raises(ConfigError, match="lr_check must be"):
        RecoveryConfig(lr_check="on")
    with pytest.raises(ConfigError, match="lr_check_steps"):
        RecoveryConfig(lr_check_steps=2)


def test_policy_books_the_check_against_the_budget() -> None:
    policy = RecoveryPolicy(RecoveryConfig(lr_check="auto"))
    assert policy.lr_check_due(0) and not policy.lr_check_due(5)
    policy.lr_checked(12)
    assert not policy.lr_check_due(0)
    assert policy.state.probe_steps == 12 and policy.state.probes == 1
    again = RecoveryPolicy(RecoveryConfig(lr_check="auto"))
    again.load_state_dict(policy.state_dict())
    assert not again.lr_check_due(0)
    assert not RecoveryPolicy(RecoveryConfig()).lr_check_due(0)   # off by default


def test_the_curve_is_one_fixed_batch_scored_without_dropout() -> None:
    """The check's curve is the first batch's loss after each step (dropout off), so a
    network whose batches differ wildly still gives a smooth curve; the batches' own losses
    are kept beside it."""
    from lrwatch.recovery.probe import check_cost, check_rate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    # every other batch is scaled 10x: its loss is far from its neighbours' at any rate
    batches = [(torch.randn(32, 20, generator=g) * (10.0 if i % 2 else 1.0),
                torch.randint(0, 4, (32,), generator=g)) for i in range(12)]
    factor, curve = check_rate(model, opt, None, None, batches, _loss, 1e-4, 12)
    assert factor is None and model.training and model[2].training
    assert curve.extra["forwards"] == curve.steps + 1 == 13
    assert check_cost(curve) == 12 + 5
    batch, ref = curve.extra["batch_losses"], curve.losses
    jumps = max(abs(a - b) for a, b in zip(batch, batch[1:]))
    assert jumps > 1.0                                       # the batches' losses jump
    assert max(abs(a - b) for a, b in zip(ref, ref[1:])) < 0.01 * jumps   # the curve does not
    with torch.no_grad():
        model.eval()
        assert curve.extra["baseline"] == pytest.approx(float(_loss(model, batches[0])))
