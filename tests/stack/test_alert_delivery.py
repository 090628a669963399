"""Alert delivery that fails is absorbed and counted, against a real Alertmanager: one answering
on the wrong path prefix (HTTP 404, not retried) and one that has been stopped (connection
refused, retried, then given up). Training always runs to the end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lrwatch
from lrwatch.actions.alerts import Alert, AlertmanagerSink, AlertSender
from services import AlertmanagerServer

RULES = """\
version: 1
rules:
  - name: loss_positive
    metric: loss
    detector: threshold
    params: {above: 0.0}
    severity: warning
    actions: [alert]
"""


def _alert() -> Alert:
    return Alert.for_rule("loss_blowup", severity="critical", summary="loss blew up", value=9.0)


def test_sender_delivers_to_a_real_alertmanager_and_calls_on_error_never(
        alertmanager: AlertmanagerServer) -> None:
    errors: list[int] = []
    with AlertSender([AlertmanagerSink(alertmanager.url)], on_error=lambda: errors.append(1),
                     backoff=(0.01, 0.05)) as sender:
        sender.fire(_alert())
        assert sender.flush(10)
    names = [a["labels"]["alertname"] for a in alertmanager.alerts()]
    assert names == ["LrwatchLossBlowup"] and errors == []


def test_wrong_path_prefix_is_given_up_at_once_and_reported(
        alertmanager: AlertmanagerServer) -> None:
    errors: list[int] = []
    sender = AlertSender([AlertmanagerSink(alertmanager.url + "/no-such-prefix")],
                         on_error=lambda: errors.append(1), backoff=(0.01, 0.05))
    sender.fire(_alert())
    assert sender.flush(10)
    sender.close()
    assert errors == [1]
    assert sender.registry.get_sample_value("lrwatch_alerts_failed_total",
                                            {"sink": "alertmanager"}) == 1
    assert alertmanager.alerts() == []


def test_stopped_alertmanager_is_retried_then_given_up_and_reported(
        alertmanager: AlertmanagerServer) -> None:
    url = alertmanager.url
    alertmanager.stop()
    errors: list[int] = []
    sender = AlertSender([AlertmanagerSink(url, timeout=1)], on_error=lambda: errors.append(1),
                         max_retries=2, backoff=(0.01, 0.05))
    sender.fire(_alert())
    assert sender.flush(20)
    sender.close()
    assert errors == [1]
    assert sender.registry.get_sample_value("lrwatch_alerts_failed_total",
                                            {"sink": "alertmanager"}) == 1


def test_watcher_counts_given_up_alerts_as_internal_errors(alertmanager: AlertmanagerServer,
                                                           tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(RULES)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = lrwatch.Watcher(model, opt, rules=str(rules), flush_every=5,
                            alertmanager=alertmanager.url + "/no-such-prefix")
    for _ in range(30):
        opt.zero_grad()
        loss = model(torch.randn(8, 4)).pow(2).mean() + 1.0
        loss.backward()
        opt.step()
        watch.log(loss=loss)
    watch.close()
    assert watch.step == 30  # training went on whatever the Alertmanager said
    failed = watch.registry.get_sample_value("lrwatch_alerts_failed_total",
                                             {"sink": "alertmanager"})
    assert failed is not None and failed >= 1
    assert watch.registry.get_sample_value("lrwatch_internal_errors_total") >= 1



def test_delivery_and_record_errors_are_lrwatch_errors(alertmanager: AlertmanagerServer) -> None:
    from lrwatch.actions.alerts import post_json
    from lrwatch.daemon.records import RecordError
    from lrwatch.errors import LrwatchError

    assert issubclass(RecordError, LrwatchError)
    with pytest.raises(LrwatchError, match="HTTP 404"):   # a DeliveryError, caught at the root
        post_json(alertmanager.url + "/no-such-prefix/api/v2/alerts", [], timeout=5)


def test_log_sink_says_resolved_once(caplog: pytest.LogCaptureFixture) -> None:
    """A resolution from the real engine, through the real sender and log sink."""
    import logging

    from lrwatch.actions.alerts import LogSink
    from lrwatch.rules.engine import Engine
    from lrwatch.rules.schema import parse_rules
    from lrwatch.samples import Sample

    engine = Engine(parse_rules(RULES.replace("above: 0.0", "above: 1.0")))
    fired = engine.update(Sample(step=1, values={"loss": 2.0}))
    resolved = engine.update(Sample(step=2, values={"loss": 0.5}))
    assert [f.kind for f in fired + resolved] == ["firing", "resolved"]
    caplog.set_level(logging.INFO, logger="lrwatch.test-sink")
    with AlertSender([LogSink(logging.getLogger("lrwatch.test-sink"))]) as sender:
        sender.fire(Alert.from_firing(fired[0]))
        sender.resolve(Alert.from_firing(resolved[0]))
        assert sender.flush(5)
    lines = [r.getMessage() for r in caplog.records if r.name == "lrwatch.test-sink"]
    assert len(lines) == 2 and "FIRING" in lines[0] and "RESOLVED" in lines[1], lines
    assert "resolved: " not in lines[1], lines[1]
