"""Alerts for lrwatch's own actions, against a real Alertmanager: a rollback is announced and
resolved once the run has passed its probation; a spent rollback budget (a stop) is announced and
left firing; a stop rule sends a stop alert; without a sink nothing is sent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import lrwatch
from lrwatch.recovery.policy import EXIT_BUDGET
from services import AlertmanagerServer


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))


def _train_to(w: lrwatch.Watcher, steps: int, nan_at: set[int], it: Any) -> None:
    """Train until ``w.step == steps`` (or a stop); the loss is NaN at the steps in ``nan_at``
    (each only once: a bad batch is not replayed after the rollback)."""
    model, opt = w.model, w.optimizer
    g = torch.Generator().manual_seed(3)
    for _ in it:
        if w.step >= steps:
            return
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 2, (16,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if w.step + 1 in nan_at:
            nan_at.discard(w.step + 1)
            loss = loss * float("nan")
        loss.backward()
        opt.step()
        w.log(loss=loss)


def _named(am: AlertmanagerServer, name: str) -> list[dict[str, Any]]:
    return am.alerts(filter=[f'alertname="{name}"'])


def test_rollback_alert_arrives_and_resolves_when_the_probation_passes(
        alertmanager: AlertmanagerServer) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    w = lrwatch.Watcher(model, opt, flush_every=1, run_name="action-alerts",
                        alertmanager=alertmanager.url,
                        recovery={"guard": "off",
                                  "good_after": 3, "min_interval": 3, "cooldown": 0})
    it = w.batches(range(10_000))
    nan_at = {20}
    _train_to(w, 22, nan_at, it)
    assert w.policy.rollbacks == 1 and w.policy.state.probation_until is not None
    assert w.sender is not None and w.sender.flush(10)
    got = alertmanager.wait_for_alerts(filter=['alertname="LrwatchRollback"'])
    assert len(got) == 1
    a = got[0]
    assert a["labels"]["severity"] == "warning" and a["labels"]["run"] == "action-alerts"
    assert set(a["labels"]) == {"alertname", "severity", "run"}   # the step is no label
    ann = a["annotations"]
    assert ann["step"] == "20" and ann["rule"] == "nonfinite"
    assert float(ann["cut"]) > 0 and int(ann["to_step"]) < 20 and ann["reason"]
    assert "rollback to step" in ann["summary"]
    # Still on probation: still firing.
    assert _named(alertmanager, "LrwatchRollback")
    # Train on until the probation has passed: the alert resolves before the run ends.
    until = w.policy.state.probation_until
    _train_to(w, until + 3, nan_at, it)
    assert w.policy.state.probation_until is None
    assert w.sender.flush(10)
    alertmanager.wait_for_alerts(lambda got: not got, filter=['alertname="LrwatchRollback"'])
    _train_to(w, 60, nan_at, it)
    w.close()
    assert w.step == 60 and w.exit_status == 0 and w.policy.rollbacks == 1
    assert _named(alertmanager, "LrwatchStop") == []
    assert _named(alertmanager, "LrwatchRollbackBudgetSpent") == []
    assert w.exporter.internal_errors._value.get() == 0


def test_spent_budget_is_announced_and_stays_firing(alertmanager: AlertmanagerServer) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    w = lrwatch.Watcher(model, opt, flush_every=1, run_name="budget-run",
                        alertmanager=alertmanager.url,
                        recovery={"guard": "off", "good_after": 3, "min_interval": 3, "cooldown": 0,
                                  "max_rollbacks": 1})
    it = w.batches(range(10_000))
    _train_to(w, 60, {20, 24}, it)
    w.close()
    assert w.should_stop and w.exit_status == EXIT_BUDGET and w.policy.rollbacks == 1
    spent = alertmanager.wait_for_alerts(filter=['alertname="LrwatchRollbackBudgetSpent"'])
    assert len(spent) == 1
    a = spent[0]
    assert a["labels"]["severity"] == "critical" and a["labels"]["run"] == "budget-run"
    assert "budget" in a["annotations"]["reason"] and a["annotations"]["exit_status"] == "4"
    assert int(a["annotations"]["step"]) == w.step
    # A stopped run is not healthy: its rollback alert is left firing too (Alertmanager
    # expires both at their endsAt if nobody looks).
    assert len(_named(alertmanager, "LrwatchRollback")) == 1


def test_a_stop_rule_sends_a_stop_alert(alertmanager: AlertmanagerServer,
                                        tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text("""
version: 1
rules:
  - name: too_high
    metric: signal
    detector: threshold
    params: {above: 0.5}
    severity: critical
    actions: [stop]
""")
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    w = lrwatch.Watcher(model, opt, flush_every=1, rules=str(rules),
                        alertmanager=alertmanager.url, run_name="stop-run")
    g = torch.Generator().manual_seed(3)
    for _ in w.batches(range(30)):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(torch.randn(4, 8, generator=g)),
                                           torch.tensor([0, 1, 0, 1]))
        loss.backward()
        opt.step()
        w.log(loss=loss, signal=1.0 if w.step == 7 else 0.0)
    w.close()
    assert w.should_stop and w.exit_status == 3 and w.step == 7
    got = alertmanager.wait_for_alerts(filter=['alertname="LrwatchStop"'])
    assert len(got) == 1 and got[0]["annotations"]["rule"] == "too_high"
    assert got[0]["labels"]["severity"] == "critical"


def test_without_a_sink_actions_send_nothing() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    w = lrwatch.Watcher(model, opt, flush_every=1,
                        recovery={"guard": "off",
                                  "good_after": 3, "min_interval": 3, "cooldown": 0})
    _train_to(w, 40, {20}, w.batches(range(10_000)))
    w.close()
    assert w.sender is None and w._action_alerts == {}
    assert w.policy.rollbacks == 1 and w.exit_status == 0 and w.step == 40
    assert w.exporter.internal_errors._value.get() == 0
