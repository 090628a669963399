"""The seventeenth round's audit of the training side (real torch runs).
docs/recovery.md, "Defects found by the seventeenth round's audit"."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lrwatch
from flag_rules import flag_rule, write_flag_rules
from fp16_steps import fp16_step


def _data(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + i)
    return torch.randn(16, 6, generator=g), torch.randint(0, 2, (16,), generator=g)


def _skipped_epoch_run(tmp_path: Path, poison: bool) -> tuple[Any, list[float], list[int]]:
    """Five epochs of ten fp16 steps under a GradScaler whose first scale (2**38) makes the
    first ones overflow (steps 1-19 and 22 skipped), a ``StepLR`` halving the rate at each
    epoch's end; with ``poison`` a flag at step 12 (epoch 1) rolls back to the snapshot of
    step 6 (epoch 0): every step since it skipped, one epoch end crossed. The rate at each
    epoch's end, and the steps the scaler skipped."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 38, growth_interval=10000)
    w = lrwatch.Watcher(
        model, opt, sched, scaler=scaler, flush_every=1,
        rules=write_flag_rules(tmp_path / "poison.yml", flag_rule("poisoned", "poison")),
        recovery={"cooldown": 0, "sudden_hold": 0, "sudden_margin": 0, "guard": "off",
                  "start_check": "off", "min_interval": 6, "max_interval": 6,
                  "good_after": 3, "replay": True})
    ends, skipped = [], []
    for epoch in range(5):
        for i in w.batches(range(epoch * 10, epoch * 10 + 10)):
            loss, applied = fp16_step(model, opt, scaler, *_data(i))
            if not applied:
                skipped.append(w.step)
            w.log(loss=loss.detach(), poison=float(poison and w.step == 12 and not w.rollbacks))
        with warnings.catch_warnings():   # (torch's: every optimizer step skipped so far)
            warnings.simplefilter("ignore", UserWarning)
            sched.step()
        ends.append(opt.param_groups[0]["lr"])
    w.close()
    return w, ends, skipped


def test_a_per_epoch_schedule_over_a_window_the_scaler_skipped_entirely_keeps_its_epoch(
        tmp_path: Path) -> None:
    """A per-epoch scheduler, a rollback over a window every step of which the GradScaler
    skipped (an fp16 run's first steps) and across an epoch end: no step applied, so the
    scheduler's one step read as a per-step scheduler's and was restored, and the run lost
    that epoch's halving (ended at 0.003125 instead of 0.0015625). Stepped more often than
    the steps applied, it is read against every step taken now: kept, as the loop left it."""
    _, clean, skipped = _skipped_epoch_run(tmp_path, False)
    assert set(range(6, 13)) <= set(skipped)   # (the window: every step skipped)
    w, ends, _ = _skipped_epoch_run(tmp_path, True)
    assert w.rollbacks == 1
    assert ends == pytest.approx(clean, rel=1e-12)
