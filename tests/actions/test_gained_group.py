"""A param group added after the snapshot a rollback restores (a backbone unfrozen mid-run),
after a rate cut: its rate is cut by the rollback's plan once, as the groups the snapshot knew
are (the convention of ``swa_lr`` and the other rate keys a group gained since the snapshot:
they are taken to be at today's scale). docs/recovery.md, "Defects found by the twelfth
round's audit"."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import lrwatch
from flag_rules import flag_rule, train_step as _step, write_flag_rules


def _rules(tmp_path: Path) -> str:
    return write_flag_rules(tmp_path / "rules.yml", flag_rule("poisoned", "poison"),
                            flag_rule("slow_down", "slow", ["reduce_lr"], severity="warning"))


def test_a_group_added_after_the_snapshot_and_a_cut_is_cut_once_by_the_rollback(
        tmp_path: Path) -> None:
    # snapshot at step 20 (scale 1); a cut at step 22 (x0.5); the backbone's group is added at
    # step 25 at 0.01, a rate of today's scale; a failure at step 30 rolls back to step 20
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(model[2].parameters(), lr=0.05, momentum=0.9)
    w = lrwatch.Watcher(model, opt, flush_every=1, rules=_rules(tmp_path),
                        recovery={"cooldown": 0, "sudden_hold": 0, "sudden_margin": 0,
                                  "guard": "off", "start_check": "off", "min_interval": 10,
                                  "max_interval": 10, "good_after": 5,
                                  "reduce_lr_factor": 0.5, "cut_unscheduled": False})
    seen: dict[str, float] = {}
    added = False
    for i in w.batches(range(40)):
        if w.policy.rollbacks and "after" not in seen:
            seen["after"] = w.policy.lr_scale
            seen["head"] = opt.param_groups[0]["lr"]
            seen["backbone"] = opt.param_groups[1]["lr"]
        if w.step == 25 and not added:
            added = True
            seen["at_add"] = w.policy.lr_scale
            for p in model[0].parameters():
                p.requires_grad_(True)
            opt.add_param_group({"params": list(model[0].parameters()), "lr": 0.01})
        loss = _step(model, opt, i)
        w.log(loss=loss, slow=1.0 if w.step == 22 else 0.0,
              poison=1.0 if w.step == 30 and not w.policy.rollbacks else 0.0)
    w.close()
    assert w.policy.rollbacks == 1 and seen["at_add"] == 0.5
    rel = seen["after"] / seen["at_add"]      # the rollback's plan against today's scale
    # the head's group: its nominal rate at the planned scale
    assert abs(seen["head"] - 0.05 * seen["after"]) < 1e-12
    # the group added at today's scale: moved by the same relative plan, once
    assert abs(seen["backbone"] - 0.01 * rel) < 1e-12, (seen, rel)


def test_snapshot_intervals_must_be_whole_steps() -> None:
    import pytest
    from lrwatch.errors import ConfigError

    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="min_interval must be an integer"):
        lrwatch.Watcher(model, opt, recovery={"min_interval": 2.5})
    with pytest.raises(ConfigError, match="max_interval an integer or infinity"):
        lrwatch.Watcher(model, opt, recovery={"max_interval": 99.5})
    lrwatch.Watcher(model, opt, recovery={"max_interval": float("inf")}).close()
