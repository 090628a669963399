"""The sixteenth round's audit of the training side (real torch runs): mixed precision
(``GradScaler``), modules with buffers, schedulers without a storable state.
docs/recovery.md, "Defects found by the sixteenth round's audit"."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import lrwatch
from flag_rules import NONFINITE_ROLLBACK
from lrwatch.recovery.policy import Progress, RecoveryConfig, RecoveryPolicy, SnapshotInfo


def _data(i: int, bad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + i)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 2, (16,), generator=g)
    if bad:
        x[0, 0] = float("nan")
    return x, y


def _bn_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(4)
    m = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 2))
    return m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)


def _bn_step(m: nn.Module, o: torch.optim.Optimizer, i: int, bad: bool) -> torch.Tensor:
    x, y = _data(i, bad)
    o.zero_grad()
    loss = nn.functional.cross_entropy(m(x), y)
    loss.backward()
    o.step()
    return loss.detach()


def test_a_dropped_nan_batch_that_poisoned_batchnorm_statistics_is_rolled_back(
        tmp_path: Path) -> None:
    """The guard keeps a NaN batch's step off the parameters, but the forward pass already
    put the batch's statistics into BatchNorm's running mean and variance: they stayed NaN
    for the rest of the run (every evaluation NaN, every later snapshot too), while the
    training loss (batch statistics) looked healthy and nothing fired again. The dropped
    step is rolled back now, and the replay trains as the run that never saw the batch."""
    (tmp_path / "r.yml").write_text(NONFINITE_ROLLBACK)
    n, bad_at = 40, 27
    model, opt = _bn_model()
    w = lrwatch.Watcher(model, opt, rules=str(tmp_path / "r.yml"), flush_every=4,
                        recovery={"good_after": 5, "min_interval": 5, "max_interval": 5,
                                  "cooldown": 0, "replay": True, "start_check": "off"})
    assert w.recorder.guard == "hold"   # (the default on the CPU)
    for i in w.batches(range(n)):
        model.train()
        w.log(loss=_bn_step(model, opt, i, bad=i == bad_at and not w.rollbacks))
    w.close()
    bn = model[1]
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()
    assert w.rollbacks == 1
    ref, ref_opt = _bn_model()
    for i in range(n):
        if i != bad_at:
            _bn_step(ref, ref_opt, i, bad=False)
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_tainted_drop_is_a_rollback_request_even_without_a_firing() -> None:
    """The policy alone: a dropped step the executor found tainted (non-finite buffers after
    it) asks for a rollback before it, even where no rule fired (a finite gradient spike the
    guard dropped); an untainted drop in a quiet stretch asks for nothing."""
    rc = RecoveryConfig(good_after=5, cooldown=0, sudden_hold=0)
    snaps = [SnapshotInfo(0, True, True), SnapshotInfo(10, True), SnapshotInfo(15, False)]
    policies = [RecoveryPolicy(rc), RecoveryPolicy(rc)]
    for pol in policies:
        pol.state.ever_healthy = True   # (the snapshot of step 10 was promoted)
    quiet = policies[0].plan([], Progress(18, snaps, dropped=[17]))
    assert [p.action for p in quiet] == ["dropped"]
    plans = policies[1].plan([], Progress(18, snaps, tainted=[17]))
    rollback = [p for p in plans if p.action == "rollback"]
    assert len(rollback) == 1 and rollback[0].target == 15 and rollback[0].lr_factor == 1.0
    assert rollback[0].rule == "dropped_tainted"
