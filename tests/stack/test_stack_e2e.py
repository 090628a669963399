"""The whole stack, for real: Prometheus loads rules/, scrapes a real `lrwatch demo --inject
nan-burst` and a real `lrwatch daemon` fed a shifted stream, sends its alerts to a real Alertmanager; every
PromQL expression of the shipped dashboards returns data from that Prometheus.

One module-scoped stack serves every test here (starting it costs most of the time). Nothing is
overridden: the rules are loaded exactly as shipped (LrwatchDriftDetected waits its `for: 1m`).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from services import AlertmanagerServer, PrometheusServer, free_port, http_request

sys.path.insert(0, str(Path(__file__).parent))
from stack_helpers import (  # noqa: E402
    DASHBOARDS_DIR, RULES_DIR, Proc, dashboard_exprs, lrwatch_cmd, serving_record, substitute,
    true_label, write_reference_data)

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]

TRAIN_JOB = "lrwatch-training"
SERVE_JOB = "lrwatch-daemon"
WINDOW = 100


class Stack:
    def __init__(self, prom: PrometheusServer, am: AlertmanagerServer, demo: Proc,
                 daemon: Proc, demo_addr: str, daemon_addr: str, t0: float) -> None:
        self.prom, self.am, self.demo, self.daemon = prom, am, demo, daemon
        self.demo_addr, self.daemon_addr, self.t0 = demo_addr, daemon_addr, t0

    def logs(self) -> str:
        return (f"--- demo ---\n{self.demo.log()[-2500:]}\n--- daemon ---\n"
                f"{self.daemon.log()[-2500:]}")


def _post(url: str, body: Any) -> dict[str, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, out = http_request(url, method="POST", data=data,
                               headers={"Content-Type": "application/json"}, timeout=30)
    assert status in (200, 400), (status, out[:300])
    return json.loads(out)


def _feed_daemon(prom: PrometheusServer, url: str) -> None:
    """Three windows like the reference, a few bad records, then four shifted windows; labels
    for two thirds of the predictions, sent after them (delayed ground truth)."""
    rng = random.Random(7)
    # Counters start at zero with the process: let Prometheus see them at zero first, so rates
    # and increases see every record.
    prom.wait_for(f'lrwatch_predictions_total{{job="{SERVE_JOB}"}}', timeout=60)
    normal = [serving_record(rng, i) for i in range(3 * WINDOW)]
    assert _post(url + "/v1/predictions", "\n".join(json.dumps(r) for r in normal).encode()
                 )["accepted"] == len(normal)
    labels = [{"id": r["id"], "label": true_label(r, rng, False)} for r in normal[:200]]
    assert _post(url + "/v1/labels", labels)["accepted"] == 200
    bad = _post(url + "/v1/predictions", [{"prediction": 1}] * 5)
    assert bad["rejected"] == 5
    prom.wait_for(f'lrwatch_predictions_total{{job="{SERVE_JOB}"}} >= {len(normal)}',
                  timeout=60)
    shifted = [serving_record(rng, i, shift=1.5) for i in range(1000, 1000 + 4 * WINDOW)]
    assert _post(url + "/v1/predictions", "\n".join(json.dumps(r) for r in shifted).encode()
                 )["accepted"] == len(shifted)
    labels = [{"id": r["id"], "label": true_label(r, rng, True)} for r in shifted[:300]]
    assert _post(url + "/v1/labels", labels)["accepted"] == 300


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("stack")
    ref_data = write_reference_data(work / "reference.jsonl")
    build = Proc(lrwatch_cmd("baseline", "build", str(ref_data), "-o", str(work / "ref.json"),
                             "--window-size", str(WINDOW), "--sims", "300"),
                 work / "baseline.log", cwd=work)
    am = AlertmanagerServer(workdir=work / "alertmanager")
    am.start()
    demo_port, daemon_port = free_port(), free_port()
    demo_addr, daemon_addr = f"127.0.0.1:{demo_port}", f"127.0.0.1:{daemon_port}"
    prom = PrometheusServer({TRAIN_JOB: [demo_addr], SERVE_JOB: [daemon_addr]},
                            rule_files=sorted(RULES_DIR.glob("*.rules.yml")),
                            alertmanager_url=am.url, workdir=work / "prometheus")
    procs: list[Proc] = []
    try:
        prom.start()
        t0 = time.time()
        # Prometheus scrapes (the not yet listening) targets once discovery has run, so the
        # demo's counters are seen at zero before its injected fault.
        prom.wait_for(f'up{{job="{TRAIN_JOB}"}}', timeout=60)
        demo = Proc(lrwatch_cmd("demo", "--steps", "10", "--inject", "nan-burst",
                                "--inject-at", "5", "--batch-size", "4", "--flush-every", "1",
                                "--port",
                                str(demo_port), "--trace", str(work / "demo.jsonl"),
                                "--linger", "900"), work / "demo.log", cwd=work)
        procs.append(demo)
        assert build.proc.wait(timeout=120) == 0, build.log()
        daemon = Proc(lrwatch_cmd("daemon", "--reference", str(work / "ref.json"),
                                  "--port", str(daemon_port), "--window-size", str(WINDOW),
                                  "--label-horizon", "2",
                                  "--state-dir", str(work / "state"),
                                  "--alertmanager", am.url),
                      work / "daemon.log", cwd=work)
        procs.append(daemon)
        daemon.wait_for_output(r"listening on http://127\.0\.0\.1:\d+", timeout=60)
        _feed_daemon(prom, f"http://{daemon_addr}")
        demo.wait_for_output(r"serving http://127\.0\.0\.1:\d+/metrics", timeout=240)
        yield Stack(prom, am, demo, daemon, demo_addr, daemon_addr, t0)
    finally:
        for p in reversed(procs):
            p.stop()
        prom.stop()
        am.stop()


def _by_name(alerts: list[dict[str, Any]], name: str, job: str) -> list[dict[str, Any]]:
    return [a for a in alerts if a["labels"].get("alertname") == name
            and a["labels"].get("job") == job]


def _check_alert(alert: dict[str, Any], severity: str, instance: str) -> None:
    labels, ann = alert["labels"], alert["annotations"]
    assert labels["severity"] == severity
    assert labels["instance"] == instance
    assert ann.get("summary") and ann.get("description"), ann
    assert instance in ann["summary"]
    # The value belongs in annotations; labels are the alert's identity.
    assert set(labels) <= {"alertname", "severity", "job", "instance", "rule"}, labels
    assert alert["status"]["state"] == "active"


def test_rules_load_without_errors(stack: Stack) -> None:
    groups = stack.prom.rules()
    names = {g["name"] for g in groups}
    assert {"lrwatch-training.recording", "lrwatch-training.alerts",
            "lrwatch-serving.recording", "lrwatch-serving.alerts",
            "lrwatch-health.alerts"} <= names
    bad = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"]
           if r.get("health") == "err"]
    assert not bad, bad


def test_training_alerts_reach_alertmanager(stack: Stack) -> None:
    want = {"LrwatchNonFiniteSteps": "critical", "LrwatchRollbacks": "warning"}
    try:
        alerts = stack.am.wait_for_alerts(
            lambda got: all(_by_name(got, n, TRAIN_JOB) for n in want), timeout=120,
            active=True)
    except TimeoutError:
        pytest.fail(f"training alerts missing; Prometheus: {stack.prom.alerts()}\n"
                    f"{stack.logs()}")
    for name, severity in want.items():
        (alert,) = _by_name(alerts, name, TRAIN_JOB)
        _check_alert(alert, severity, stack.demo_addr)
    # What Prometheus counted is what the demo did: three non-finite steps (the burst: the
    # first skipped on the device, the repeat restarted the run, which met the third poisoned
    # batch again later, skipped too, its rollback held by the cooldown until the end), one
    # rollback. The demo may still be training when the alerts arrive: wait for the counts.
    for metric, n in (("lrwatch_nonfinite_steps_total", 3.0), ("lrwatch_rollbacks_total", 1.0)):
        stack.prom.wait_for(f'{metric}{{job="{TRAIN_JOB}"}}',
                            lambda got, n=n: bool(got) and float(got[0]["value"][1]) >= n,
                            timeout=120)
        (s,) = stack.prom.query(f'{metric}{{job="{TRAIN_JOB}"}}')
        assert float(s["value"][1]) == n, (metric, s)
    # Nothing else of the training rules fired on a healthy-again run.
    unexpected = {a["labels"]["alertname"] for a in alerts
                  if a["labels"].get("job") == TRAIN_JOB} - set(want)
    assert not unexpected, unexpected


def test_serving_drift_alert_reaches_alertmanager(stack: Stack) -> None:
    try:
        alerts = stack.am.wait_for_alerts(
            lambda got: bool(_by_name(got, "LrwatchDriftDetected", SERVE_JOB)), timeout=150,
            active=True)
    except TimeoutError:
        pytest.fail(f"LrwatchDriftDetected missing; Prometheus: {stack.prom.alerts()}\n"
                    f"{stack.logs()}")
    (alert,) = _by_name(alerts, "LrwatchDriftDetected", SERVE_JOB)
    _check_alert(alert, "warning", stack.daemon_addr)
    assert "drift score" in alert["annotations"]["description"]
    # The daemon's own engine alerted too, directly (its alert names the lrwatch rule).
    own = [a for a in alerts if a["labels"].get("rule") == "data_drift"]
    assert own and own[0]["labels"]["alertname"] == "LrwatchDataDrift"
    # The shift is in x only: the per-feature metric Prometheus stored says so.
    drifted = {s["metric"]["feature"] for s in stack.prom.query(
        f'lrwatch_drift_detected{{job="{SERVE_JOB}"}} == 1')}
    assert "x" in drifted and "y" not in drifted and "tier" not in drifted


def test_estimates_and_their_error_reach_prometheus(stack: Stack) -> None:
    """The reference had labels, so the daemon estimates accuracy before labels come. Two
    normal and three shifted windows got all their labels, so their estimates were compared;
    the shift changed the concept too, which confidences cannot see: the last (shifted)
    window's estimate is far above what its labels realised."""
    sel = f'{{job="{SERVE_JOB}"}}'
    stack.prom.wait_for(f"lrwatch_estimation_windows_compared_total{sel} >= 5", timeout=60)
    (est,) = stack.prom.query(f"lrwatch_estimated_accuracy{sel}")
    assert 0.5 < float(est["value"][1]) <= 1.0, est
    (err,) = stack.prom.query(f"lrwatch_estimation_error{sel}")
    assert float(err["value"][1]) > 0.2, err
    shares = {s["metric"]["class"]: float(s["value"][1]) for s in stack.prom.query(
        f"lrwatch_prediction_class_ratio{sel}")}
    assert set(shares) == {"0", "1"} and abs(sum(shares.values()) - 1) < 1e-9
    assert stack.prom.query(f'lrwatch_prediction_quantile{{job="{SERVE_JOB}", q="0.5"}}')


@pytest.mark.parametrize("name,job", [("lrwatch-training.json", TRAIN_JOB),
                                      ("lrwatch-serving.json", SERVE_JOB)])
def test_every_dashboard_expression_returns_data(stack: Stack, name: str, job: str) -> None:
    # The alerts the dashboards show (ALERTS{...}) must exist first.
    stack.am.wait_for_alerts(lambda got: bool(_by_name(got, "LrwatchDriftDetected", SERVE_JOB)
                                              and _by_name(got, "LrwatchRollbacks", TRAIN_JOB)),
                             timeout=150, active=True)
    # Prometheus sends an alert before its rule group's samples (ALERTS) are committed.
    for alertname in ("LrwatchDriftDetected", "LrwatchRollbacks"):
        stack.prom.wait_for(f'ALERTS{{alertname="{alertname}", alertstate="firing"}}',
                            timeout=30)
    # The held-out metrics come with the demo's first evaluation, which on a loaded machine can
    # come after the alerts (seen once with the full suite beside two benchmark processes).
    if job == TRAIN_JOB:
        for metric in ("lrwatch_eval_accuracy", "lrwatch_eval_loss"):
            stack.prom.wait_for(f'{metric}{{job="{TRAIN_JOB}"}}', timeout=120)
    dashboard = json.loads((DASHBOARDS_DIR / name).read_text())
    instance = stack.demo_addr if job == TRAIN_JOB else stack.daemon_addr
    values = {"job": job, "instance": instance, "datasource": "prometheus", "feature": ".+"}
    exprs = list(dashboard_exprs(dashboard))
    assert len(exprs) >= 15
    # Variable queries: label_values(metric{...}, label) must list the real job and instance.
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        metric, label = _label_values(substitute(var["definition"], values))
        found = {s["metric"].get(label) for s in stack.prom.query(metric)}
        expected = {"job": job, "instance": instance}.get(label)
        assert (expected in found) if expected else found, (var["name"], metric, found)
    # A little past now: the last range step must not fall before the newest rule evaluation
    # (an alert that turned firing a moment ago would otherwise miss the final step).
    end = time.time() + 2.0
    empty = []
    for where, expr in exprs:
        q = substitute(expr, values)
        result = stack.prom.query_range(q, start=stack.t0, end=end, step=1.0)
        if not any(r["values"] for r in result):
            empty.append(f"{where}: {q}")
    assert not empty, "expressions without data:\n" + "\n".join(empty)


def _label_values(definition: str) -> tuple[str, str]:
    inner = definition[len("label_values("):-1]
    metric, label = inner.rsplit(",", 1)
    return metric.strip(), label.strip()
