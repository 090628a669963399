"""The Watcher's alert path end to end: a real Alertmanager gets the firing and the resolve."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from torch import nn

import lrwatch
from lrwatch.actions.alerts import AlertmanagerSink, AlertSender
from prometheus_client import generate_latest

RULES = """
version: 1
rules:
  - name: signal_high
    metric: signal
    detector: threshold
    params: {above: 0.5}
    severity: warning
    actions: [alert]
    labels: {team: ml-infra}
    annotations:
      summary: "signal is {value} at step {step}"
      description: "The test signal crossed 0.5."
"""


def _train(w: lrwatch.Watcher, signal_on: range, steps: int) -> None:
    torch.manual_seed(0)
    model, opt = w.model, w.optimizer
    for i in range(steps):
        x = torch.randn(8, 4)
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        w.log(loss=loss, signal=1.0 if i in signal_on else 0.0)


@pytest.mark.prometheus
def test_alertmanager_receives_firing_then_resolve(alertmanager, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rules = tmp_path / "rules.yml"
    rules.write_text(RULES)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = lrwatch.Watcher(model, opt, rules=str(rules), flush_every=2,
                        alertmanager=alertmanager.url, recovery=False, run_name="am-test")
    # a second run on the same Alertmanager, whose signal stays on
    other_model = nn.Linear(4, 2)
    other = lrwatch.Watcher(other_model, torch.optim.SGD(other_model.parameters(), lr=0.01),
                            rules=str(rules), flush_every=2, alertmanager=alertmanager.url,
                            recovery=False, run_name="am-other")
    _train(other, range(3, 100), 6)
    _train(w, range(3, 6), 6)
    assert w.sender is not None and w.sender.flush(10) and other.sender.flush(10)
    got = alertmanager.wait_for_alerts(lambda a: len(a) == 2,
                                       filter=['alertname="LrwatchSignalHigh"'])
    assert sorted(a["labels"]["run"] for a in got) == ["am-other", "am-test"]   # apart
    alert = next(a for a in got if a["labels"]["run"] == "am-test")
    assert alert["labels"]["severity"] == "warning"
    assert alert["labels"]["team"] == "ml-infra"
    assert alert["labels"]["rule"] == "signal_high"
    assert "value" not in alert["labels"]
    assert alert["annotations"]["summary"] == "signal is 1.0 at step 4"
    assert alert["annotations"]["description"] == "The test signal crossed 0.5."
    assert float(alert["annotations"]["value"]) == 1.0
    # The signal is back to 0: the rule resolves, and so does the alert -- this run's only.
    _train(w, range(0), 4)
    assert w.sender.flush(10)
    left = alertmanager.wait_for_alerts(lambda a: len(a) == 1,
                                        filter=['alertname="LrwatchSignalHigh"'])
    assert left[0]["labels"]["run"] == "am-other"
    other.close()
    w.close()
    text = generate_latest(w.registry).decode()
    assert 'lrwatch_alerts_sent_total{sink="alertmanager"}' in text
    assert 'lrwatch_firings_total{rule="signal_high",severity="warning"} 1.0' in text
    assert 'lrwatch_rule_firing{rule="signal_high",severity="warning"} 0.0' in text


def test_alertmanager_down_training_goes_on_and_failure_is_counted(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(RULES)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens here
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = lrwatch.Watcher(model, opt, rules=str(rules), flush_every=1, recovery=False)
    sender = AlertSender([AlertmanagerSink(f"http://127.0.0.1:{port}")], registry=w.registry,
                         max_retries=1, backoff=(0.01, 0.02))
    w.sender = sender
    _train(w, range(2, 5), 10)
    assert w.step == 10
    sender.flush(10)
    w.close()
    text = generate_latest(w.registry).decode()
    line = next(ln for ln in text.splitlines()
                if ln.startswith('lrwatch_alerts_failed_total{sink="alertmanager"}'))
    assert float(line.split()[-1]) >= 1
