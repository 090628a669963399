"""Alerts, sinks and the background sender, against a real Alertmanager and real HTTP receivers.

The webhook receiver is a stdlib ``http.server`` on a free loopback port that records every
request; it can answer with an error status or hold requests until released, which is how the
tests make a sink slow or failing without mocking anything.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from lrwatch.actions import (
    Alert,
    AlertmanagerSink,
    AlertSender,
    LogSink,
    WebhookSink,
    alert_name,
)
from lrwatch.actions.alerts import rfc3339
from lrwatch.errors import ConfigError
from lrwatch.rules.engine import Engine
from lrwatch.rules.schema import parse_rules
from lrwatch.samples import Sample
from services import free_port, promtool_check_metrics


# ------------------------------------------------------------------------------------------------
# a real local HTTP receiver


class Receiver:
    """Records POSTed JSON bodies; answers ``status``; with ``hold`` set, waits for ``release``."""

    def __init__(self, status: int | list[int] = 200, hold: bool = False) -> None:
        # A list answers its statuses in turn, then 200.
        self.statuses = list(status) if isinstance(status, list) else None
        self.status = 200 if isinstance(status, list) else status
        self.bodies: list[Any] = []
        self.cond = threading.Condition()
        self._release = threading.Event()
        if not hold:
            self._release.set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer.cond:
                    outer.bodies.append(json.loads(raw))
                    outer.cond.notify_all()
                outer._release.wait(60)
                with outer.cond:
                    status = outer.statuses.pop(0) if outer.statuses else outer.status
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/hook"

    def snapshot(self) -> list[Any]:
        with self.cond:
            return list(self.bodies)

    def wait(self, predicate: Callable[[list[Any]], bool], timeout: float = 30.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate(self.bodies):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"receiver: condition not met; got {self.bodies!r}")
                self.cond.wait(left)
            return list(self.bodies)

    def release(self) -> None:
        self._release.set()

    def close(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver_factory() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(**kwargs: Any) -> Receiver:
        made.append(Receiver(**kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture
def senders() -> Iterator[list[AlertSender]]:
    """Senders created by a test are closed at teardown, whatever the test did."""
    made: list[AlertSender] = []
    yield made
    for s in made:
        s.close(timeout=2)


def _alert(rule: str = "loss_blowup", **kw: Any) -> Alert:
    kw.setdefault("severity", "critical")
    kw.setdefault("summary", "loss blew up at step 120")
    return Alert.for_rule(rule, **kw)


def _value(reg: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float:
    v = reg.get_sample_value(name, labels or {})
    return 0.0 if v is None else v


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# ------------------------------------------------------------------------------------------------
# the Alert value


@pytest.mark.parametrize("rule, name", [
    ("loss_blowup", "LrwatchLossBlowup"),
    ("grad-norm-explosion", "LrwatchGradNormExplosion"),
    ("nonfinite", "LrwatchNonfinite"),
    ("eval_accuracy_regression", "LrwatchEvalAccuracyRegression"),
    ("lrwatch_stale", "LrwatchStale"),
])
def test_alert_name_is_lrwatch_camel_case(rule: str, name: str) -> None:
    assert alert_name(rule) == name


def test_alert_name_rejects_a_name_without_words() -> None:
    with pytest.raises(ConfigError):
        alert_name("__")


def test_alert_labels_annotations_and_value() -> None:
    a = _alert(value=12.5, labels={"team": "ml"}, description="robust z = 9.1",
               starts_at=1764300000.0, generator_url="http://grafana.local/d/lrwatch")
    assert dict(a.labels) == {"alertname": "LrwatchLossBlowup", "severity": "critical",
                              "rule": "loss_blowup", "team": "ml"}
    assert dict(a.annotations) == {"summary": "loss blew up at step 120",
                                   "description": "robust z = 9.1", "value": "12.5"}
    assert "12.5" not in a.labels.values()
    assert a.firing and a.status == "firing"

    body = a.to_alertmanager(now=1764300010.0, valid_for=240.0)
    assert body == {"labels": dict(a.labels), "annotations": dict(a.annotations),
                    "startsAt": "2025-11-28T03:20:00.000Z", "endsAt": "2025-11-28T03:24:10.000Z",
                    "generatorURL": "http://grafana.local/d/lrwatch"}
    r = a.resolved(1764300100.5)
    assert r.status == "resolved"
    assert r.to_alertmanager(now=1764300200.0, valid_for=240.0)["endsAt"] == \
        "2025-11-28T03:21:40.500Z"
    assert "generatorURL" not in _alert().to_alertmanager(now=0.0, valid_for=1.0)


def test_non_finite_values_are_spelled_out() -> None:
    assert _alert(value=float("nan")).annotations["value"] == "nan"
    assert _alert(value=float("-inf")).annotations["value"] == "-inf"
    assert _alert().annotations["value"] == ""


def test_key_and_fingerprint_ignore_label_order_and_annotations() -> None:
    a = Alert("LrwatchX", {"severity": "info", "team": "ml"}, {"value": "1"})
    b = Alert("LrwatchX", {"team": "ml", "severity": "info"}, {"value": "2"}, starts_at=5.0)
    c = Alert("LrwatchX", {"team": "ops", "severity": "info"})
    assert a.key == b.key and a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint
    assert len(a.fingerprint) == 16


@pytest.mark.parametrize("kwargs", [
    {"labels": {"bad-name": "x"}},
    {"labels": {"team": 3}},
    {"labels": {"alertname": "Other"}},
    {"annotations": {"value": 1.5}},
])
def test_alert_rejects_invalid_labels(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Alert("LrwatchX", **kwargs)


def test_alert_rejects_unknown_severity() -> None:
    with pytest.raises(ConfigError, match="critical, warning, info"):
        _alert(severity="fatal")


def test_alert_from_a_real_engine_firing() -> None:
    rules = parse_rules("""
rules:
  - name: nan_loss
    metric: loss
    detector: nonfinite
    severity: critical
    actions: [alert]
    labels: {team: ml}
    annotations:
      summary: "loss is {value} at step {step}"
      description: "the loss went non-finite"
""")
    eng = Engine(rules)
    eng.update(Sample(step=1, values={"loss": 2.0}, time=1764300000.0))
    [firing] = eng.update(Sample(step=2, values={"loss": float("nan")}, time=1764300001.0))
    a = Alert.from_firing(firing, generator_url="http://127.0.0.1:3000/d/lrwatch")
    assert dict(a.labels) == {"alertname": "LrwatchNanLoss", "severity": "critical",
                              "rule": "nan_loss", "team": "ml"}
    assert a.annotations["summary"] == "loss is nan at step 2"
    assert a.annotations["description"] == "the loss went non-finite"
    assert a.annotations["value"] == "nan"
    assert a.annotations["step"] == "2"
    assert a.starts_at == 1764300001.0


# ------------------------------------------------------------------------------------------------
# a real Alertmanager


def _am_with_webhook(alertmanager_factory: Callable[..., Any], receiver: Receiver) -> Any:
    return alertmanager_factory({
        "route": {"receiver": "hook", "group_by": ["alertname"], "group_wait": "1s",
                  "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [{"name": "hook",
                       "webhook_configs": [{"url": receiver.url, "send_resolved": True}]}],
    })


def test_alertmanager_receives_the_firing_and_the_resolve(
        alertmanager_factory: Callable[..., Any], receiver_factory: Callable[..., Receiver],
        senders: list[AlertSender]) -> None:
    notified = receiver_factory()
    am = _am_with_webhook(alertmanager_factory, notified)
    reg = CollectorRegistry()
    sender = AlertSender([AlertmanagerSink(am.url, timeout=5)], registry=reg,
                         resend_interval=60.0)
    senders.append(sender)
    alert = _alert(value=12.5, labels={"team": "ml"}, description="loss is 40x its median",
                   generator_url="http://127.0.0.1:3000/d/lrwatch-training")
    before = time.time()
    sender.fire(alert)

    flt = ['alertname="LrwatchLossBlowup"']
    [got] = am.wait_for_alerts(filter=flt)
    assert got["labels"] == {"alertname": "LrwatchLossBlowup", "severity": "critical",
                             "rule": "loss_blowup", "team": "ml"}
    assert got["annotations"] == {"summary": "loss blew up at step 120",
                                  "description": "loss is 40x its median", "value": "12.5"}
    assert got["status"]["state"] == "active"
    assert got["generatorURL"] == "http://127.0.0.1:3000/d/lrwatch-training"
    # Valid for a few resend intervals, so Alertmanager resolves it by itself if we die.
    ends = _ts(got["endsAt"])
    assert before + 60.0 < ends < time.time() + 4 * 60.0 + 5
    assert sender.flush(10)
    assert _value(reg, "lrwatch_alerts_sent_total", {"sink": "alertmanager"}) == 1.0

    # Alertmanager itself notifies its receiver: first firing ...
    bodies = notified.wait(lambda b: any(x["status"] == "firing" for x in b))
    assert bodies[0]["alerts"][0]["labels"]["alertname"] == "LrwatchLossBlowup"

    resolved_at = time.time()
    sender.resolve(alert, at=resolved_at)
    assert sender.active == []
    # ... then resolved, and the alert leaves the list of active alerts.
    bodies = notified.wait(lambda b: any(x["status"] == "resolved" for x in b))
    [res] = [x for x in bodies if x["status"] == "resolved"][0]["alerts"]
    assert res["labels"]["severity"] == "critical"
    assert res["annotations"]["value"] == "12.5"
    assert abs(_ts(res["endsAt"]) - resolved_at) < 0.01
    am.wait_for_alerts(lambda a: a == [], filter=flt)
    assert sender.flush(10)
    assert _value(reg, "lrwatch_alerts_sent_total", {"sink": "alertmanager"}) == 2.0
    assert _value(reg, "lrwatch_alerts_failed_total", {"sink": "alertmanager"}) == 0.0


def test_resend_pushes_ends_at_forward_in_alertmanager(alertmanager: Any,
                                                       senders: list[AlertSender]) -> None:
    sender = AlertSender([AlertmanagerSink(alertmanager.url)], resend_interval=0.5)
    senders.append(sender)
    sender.fire(_alert("plateau", severity="warning", summary="eval loss flat"))
    flt = ['alertname="LrwatchPlateau"']
    [first] = alertmanager.wait_for_alerts(filter=flt)
    first_end = _ts(first["endsAt"])
    alertmanager.wait_for_alerts(lambda a: bool(a) and _ts(a[0]["endsAt"]) > first_end + 0.4,
                                 filter=flt)
    assert sender.registry.get_sample_value("lrwatch_alerts_sent_total",
                                            {"sink": "alertmanager"}) >= 2


def test_alertmanager_down_fire_returns_and_failure_is_counted(
        senders: list[AlertSender]) -> None:
    errors: list[int] = []
    reg = CollectorRegistry()
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    sender = AlertSender([AlertmanagerSink(url, timeout=1)], registry=reg, max_retries=2,
                         backoff=(0.01, 0.05), on_error=lambda: errors.append(1))
    senders.append(sender)
    sender.fire(_alert())  # must not raise
    assert sender.flush(30)
    # Given up after 1 + 2 attempts.
    assert _value(reg, "lrwatch_alerts_failed_total", {"sink": "alertmanager"}) == 1.0
    assert errors == [1]
    assert _value(reg, "lrwatch_alerts_sent_total", {"sink": "alertmanager"}) == 0.0
    assert _value(reg, "lrwatch_alerts_dropped_total") == 0.0


def test_server_errors_are_retried_with_backoff_then_given_up(
        receiver_factory: Callable[..., Receiver], senders: list[AlertSender]) -> None:
    rec = receiver_factory(status=503)
    sender = AlertSender([WebhookSink(rec.url)], max_retries=3, backoff=(0.01, 0.02))
    senders.append(sender)
    sender.fire(_alert())
    assert sender.flush(30)
    assert len(rec.snapshot()) == 4  # the first attempt and three retries
    assert _value(sender.registry, "lrwatch_alerts_failed_total", {"sink": "webhook"}) == 1.0


def test_a_retry_never_resends_a_firing_that_was_resolved_meanwhile(
        receiver_factory: Callable[..., Receiver], senders: list[AlertSender]) -> None:
    rec = receiver_factory(status=[503])  # the first request fails, later ones succeed
    sender = AlertSender([WebhookSink(rec.url)], max_retries=3, backoff=(3.0, 3.0))
    senders.append(sender)
    sender.fire(_alert())
    rec.wait(lambda b: len(b) == 1)  # the firing failed; its retry is 1.5-3 s away
    sender.resolve(_alert())
    assert sender.flush(30)
    statuses = [a["status"] for b in rec.snapshot() for a in b["alerts"]]
    assert statuses == ["firing", "resolved"]  # the stale firing was not retried after
    assert _value(sender.registry, "lrwatch_alerts_sent_total", {"sink": "webhook"}) == 1.0
    assert _value(sender.registry, "lrwatch_alerts_failed_total", {"sink": "webhook"}) == 0.0


def test_client_errors_are_not_retried(receiver_factory: Callable[..., Receiver],
                                       senders: list[AlertSender]) -> None:
    rec = receiver_factory(status=400)
    sender = AlertSender([WebhookSink(rec.url)], max_retries=3, backoff=(0.01, 0.02))
    senders.append(sender)
    sender.fire(_alert())
    assert sender.flush(30)
    assert len(rec.snapshot()) == 1
    assert _value(sender.registry, "lrwatch_alerts_failed_total", {"sink": "webhook"}) == 1.0


def test_a_failing_sink_does_not_hold_up_the_others(receiver_factory: Callable[..., Receiver],
                                                    senders: list[AlertSender]) -> None:
    good = receiver_factory()
    url = f"http://127.0.0.1:{free_port()}"
    sender = AlertSender([AlertmanagerSink(url), WebhookSink(good.url)], max_retries=5,
                         backoff=(2.0, 2.0))
    senders.append(sender)
    sender.fire(_alert())
    # The webhook gets its delivery while the Alertmanager sink waits for its retries.
    good.wait(lambda b: len(b) == 1, timeout=10)
    assert _value(sender.registry, "lrwatch_alerts_failed_total", {"sink": "alertmanager"}) == 0


# ------------------------------------------------------------------------------------------------
# re-send, queue, threads


def test_firing_alerts_are_resent_until_resolved(receiver_factory: Callable[..., Receiver],
                                                 senders: list[AlertSender]) -> None:
    rec = receiver_factory()
    sender = AlertSender([WebhookSink(rec.url)], resend_interval=0.2)
    senders.append(sender)
    alert = _alert(value=3.0)
    sender.fire(alert)
    bodies = rec.wait(lambda b: sum(x["resend"] for x in b) >= 2)
    assert bodies[0]["resend"] is False
    for body in bodies:
        assert body["status"] == "firing"
        [a] = body["alerts"]
        assert a["fingerprint"] == alert.fingerprint and a["endsAt"] is None
        assert a["startsAt"] == rfc3339(alert.starts_at)

    sender.resolve(alert)
    bodies = rec.wait(lambda b: b[-1]["status"] == "resolved")
    assert sender.flush(10)
    n = len(rec.snapshot())
    time.sleep(1.0)  # five resend intervals: a resolved alert is not re-sent
    assert len(rec.snapshot()) == n
    assert sender.active == []


def test_refiring_keeps_starts_at_and_updates_the_value(receiver_factory: Callable[..., Receiver],
                                                        senders: list[AlertSender]) -> None:
    rec = receiver_factory()
    sender = AlertSender([WebhookSink(rec.url)])
    senders.append(sender)
    sender.fire(_alert(value=1.0, starts_at=1000.0))
    sender.fire(_alert(value=2.0, starts_at=2000.0))
    assert sender.flush(10)
    [active] = sender.active
    assert active.starts_at == 1000.0 and active.annotations["value"] == "2"
    last = rec.snapshot()[-1]["alerts"][-1]
    assert last["startsAt"] == rfc3339(1000.0) and last["annotations"]["value"] == "2"


def test_fire_does_not_block_while_the_sink_hangs(receiver_factory: Callable[..., Receiver],
                                                  senders: list[AlertSender]) -> None:
    rec = receiver_factory(hold=True)
    sender = AlertSender([WebhookSink(rec.url, timeout=20)], queue_size=10)
    senders.append(sender)
    sender.fire(_alert("first"))
    rec.wait(lambda b: len(b) == 1)  # the worker now waits on the held request
    t0 = time.monotonic()
    for i in range(200):
        sender.fire(_alert(f"rule_{i}"))
        sender.resolve(_alert(f"rule_{i}"))
    assert time.monotonic() - t0 < 2.0  # the sink would hold each request for up to 20 s
    rec.release()
    assert sender.flush(30)


def test_full_queue_drops_the_oldest_and_counts_it(receiver_factory: Callable[..., Receiver],
                                                   senders: list[AlertSender]) -> None:
    rec = receiver_factory(hold=True)
    reg = CollectorRegistry()
    sender = AlertSender([WebhookSink(rec.url, timeout=30)], registry=reg, queue_size=3)
    senders.append(sender)
    sender.fire(_alert("rule_0"))
    rec.wait(lambda b: len(b) == 1)
    for i in range(1, 11):
        sender.fire(_alert(f"rule_{i}"))
    assert _value(reg, "lrwatch_alerts_dropped_total") == 7.0
    assert _value(reg, "lrwatch_alerts_queue_length") == 3.0
    rec.release()
    assert sender.flush(30)
    bodies = rec.snapshot()
    assert [a["labels"]["rule"] for a in bodies[1]["alerts"]] == ["rule_8", "rule_9", "rule_10"]
    assert _value(reg, "lrwatch_alerts_sent_total", {"sink": "webhook"}) == 4.0
    assert _value(reg, "lrwatch_alerts_queue_length") == 0.0
    # Dropped from the queue, but still firing: the next re-send carries all eleven.
    assert len(sender.active) == 11


def test_concurrent_fire_and_resolve_lose_nothing(receiver_factory: Callable[..., Receiver],
                                                  senders: list[AlertSender]) -> None:
    rec = receiver_factory()
    reg = CollectorRegistry()
    sender = AlertSender([WebhookSink(rec.url)], registry=reg, queue_size=100_000)
    senders.append(sender)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(200):
                a = _alert(f"rule_{t}_{i % 7}", value=float(i))
                sender.fire(a)
                sender.resolve(a)
        except BaseException as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert sender.flush(60)
    total = 8 * 200 * 2
    assert _value(reg, "lrwatch_alerts_sent_total", {"sink": "webhook"}) == total
    assert sum(len(b["alerts"]) for b in rec.snapshot()) == total
    assert _value(reg, "lrwatch_alerts_dropped_total") == 0.0
    assert sender.active == []


def test_fire_and_resolve_never_raise(senders: list[AlertSender],
                                      caplog: pytest.LogCaptureFixture) -> None:
    sender = AlertSender([LogSink()])
    senders.append(sender)
    with caplog.at_level(logging.ERROR, logger="lrwatch"):
        sender.fire(None)  # type: ignore[arg-type]
        sender.resolve("not an alert")  # type: ignore[arg-type]
    assert "could not queue" in caplog.text


def test_close_sends_the_pending_resolve(receiver_factory: Callable[..., Receiver]) -> None:
    rec = receiver_factory()
    sender = AlertSender([WebhookSink(rec.url)])
    sender.fire(_alert())
    sender.resolve(_alert())
    assert sender.close(timeout=10)
    statuses = [a["status"] for b in rec.snapshot() for a in b["alerts"]]
    assert statuses[-1] == "resolved"
    assert sender.close() is True  # idempotent
    sender.fire(_alert())  # after close: dropped and counted, not raised
    assert _value(sender.registry, "lrwatch_alerts_dropped_total") == 1.0


def test_close_can_resolve_what_is_still_firing(receiver_factory: Callable[..., Receiver]) -> None:
    rec = receiver_factory()
    sender = AlertSender([WebhookSink(rec.url)])
    sender.fire(_alert("a_rule"))
    assert sender.close(timeout=10, resolve_active=True)
    last = rec.snapshot()[-1]
    assert last["status"] == "resolved" and last["alerts"][0]["labels"]["rule"] == "a_rule"


def test_close_gives_up_retries_at_the_deadline() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    sender = AlertSender([AlertmanagerSink(url)], max_retries=5, backoff=(30.0, 30.0))
    sender.fire(_alert())
    t0 = time.monotonic()
    sender.close(timeout=1.0)
    assert time.monotonic() - t0 < 10.0  # not the 150 s of retries
    assert _value(sender.registry, "lrwatch_alerts_failed_total", {"sink": "alertmanager"}) == 1


# ------------------------------------------------------------------------------------------------
# sinks, metrics, configuration


def test_webhook_body_schema(receiver_factory: Callable[..., Receiver],
                             senders: list[AlertSender]) -> None:
    rec = receiver_factory()
    sender = AlertSender([WebhookSink(rec.url, headers={"X-Token": "t"})])
    senders.append(sender)
    a = _alert(value=7.25, labels={"team": "ml"}, starts_at=1764300000.0)
    sender.fire(a)
    sender.resolve(a, at=1764300060.0)
    assert sender.flush(10)
    bodies = rec.snapshot()
    firing = bodies[0]
    assert set(firing) == {"version", "sender", "status", "resend", "alerts"}
    assert (firing["version"], firing["sender"], firing["resend"]) == ("1", "lrwatch", False)
    first = bodies[0]["alerts"][0]
    assert first == {
        "status": "firing",
        "labels": {"alertname": "LrwatchLossBlowup", "severity": "critical",
                   "rule": "loss_blowup", "team": "ml"},
        "annotations": {"summary": "loss blew up at step 120",
                        "description": "loss blew up at step 120", "value": "7.25"},
        "startsAt": "2025-11-28T03:20:00.000Z",
        "endsAt": None,
        "generatorURL": "",
        "fingerprint": a.fingerprint,
    }
    last = bodies[-1]
    assert last["status"] == "resolved"
    assert last["alerts"][-1]["status"] == "resolved"
    assert last["alerts"][-1]["endsAt"] == "2025-11-28T03:21:00.000Z"


def test_log_sink_writes_firing_and_resolved(caplog: pytest.LogCaptureFixture,
                                             senders: list[AlertSender]) -> None:
    sender = AlertSender([LogSink(logging.getLogger("lrwatch.test_alerts"))],
                         resend_interval=0.1)
    senders.append(sender)
    with caplog.at_level(logging.INFO, logger="lrwatch.test_alerts"):
        sender.fire(_alert(value=9.0))
        assert sender.flush(10)
        time.sleep(0.5)  # several resend intervals: the log sink is not re-sent to
        sender.resolve(_alert())
        assert sender.flush(10)
    records = [r for r in caplog.records if r.name == "lrwatch.test_alerts"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.INFO]
    assert "FIRING LrwatchLossBlowup" in records[0].getMessage()
    assert "value=9" in records[0].getMessage()
    assert "RESOLVED LrwatchLossBlowup" in records[1].getMessage()


def test_metrics_are_registered_and_promtool_clean(senders: list[AlertSender]) -> None:
    reg = CollectorRegistry()
    sender = AlertSender([LogSink(), WebhookSink("http://127.0.0.1:9/x")], registry=reg)
    senders.append(sender)
    for sink in ("log", "webhook"):
        assert reg.get_sample_value("lrwatch_alerts_sent_total", {"sink": sink}) == 0.0
        assert reg.get_sample_value("lrwatch_alerts_failed_total", {"sink": sink}) == 0.0
    assert reg.get_sample_value("lrwatch_alerts_dropped_total") == 0.0
    assert reg.get_sample_value("lrwatch_alerts_queue_length") == 0.0
    code, output = promtool_check_metrics(generate_latest(reg))
    assert code == 0, output


@pytest.mark.parametrize("kwargs, match", [
    ({"sinks": []}, "at least one sink"),
    ({"sinks": [LogSink(), LogSink()]}, "unique"),
    ({"sinks": [object()]}, "not a sink"),
    ({"resend_interval": 0}, "resend_interval"),
    ({"max_retries": -1}, "max_retries"),
    ({"backoff": (2.0, 1.0)}, "backoff"),
    ({"queue_size": 0}, "queue_size"),
])
def test_sender_validates_arguments(kwargs: dict[str, Any], match: str) -> None:
    kwargs.setdefault("sinks", [LogSink()])
    with pytest.raises(ConfigError, match=match):
        AlertSender(**kwargs)


@pytest.mark.parametrize("make", [
    lambda: AlertmanagerSink("127.0.0.1:9093"),
    lambda: WebhookSink("ftp://x"),
    lambda: AlertmanagerSink("http://x", timeout=0),
])
def test_sinks_validate_arguments(make: Callable[[], Any]) -> None:
    with pytest.raises(ConfigError):
        make()
