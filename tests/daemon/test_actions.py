"""A real Alertmanager receives the drift alert, and the rollback hook runs with its argv."""

from __future__ import annotations

import json
import random
import sys

import pytest

from daemon_helpers import WINDOW, make_record
from services import wait_until

pytestmark = pytest.mark.prometheus

RULES = """
version: 1
rules:
  - name: data_drift
    metric: drift_detected
    detector: threshold
    params: {above: 0.5}
    for: 2
    severity: critical
    actions: [alert, hook]
    annotations:
      summary: "input drift detected in window {step}"
"""


def test_drift_reaches_alertmanager_and_runs_the_hook(run_daemon, alertmanager, tmp_path):
    rules = tmp_path / "rules.yml"
    rules.write_text(RULES)
    out = tmp_path / "hook.json"
    script = ("import json, os, sys; json.dump({'argv': sys.argv[1:], "
              "'rule': os.environ['LRWATCH_RULE'], 'stdin': json.load(sys.stdin)}, "
              f"open({str(out)!r}, 'w'))")
    argv = [sys.executable, "-c", script, "--to", "previous", "x; rm -rf ~"]
    r = run_daemon(rules=str(rules), alertmanager=[alertmanager.url], hook_argv=argv,
                   hook_cooldown=300)
    rng = random.Random(21)
    recs = [make_record(rng, k, shift=1.5) for k in range(4 * WINDOW)]
    assert r.post("/v1/predictions", recs)[0] == 200
    r.daemon.drain()
    assert r.metric("lrwatch_firings_total", {"rule": "data_drift", "severity": "critical"}) == 1
    alerts = alertmanager.wait_for_alerts(filter=['alertname="LrwatchDataDrift"'])
    a = alerts[0]
    assert a["labels"]["severity"] == "critical" and a["labels"]["rule"] == "data_drift"
    assert a["annotations"]["summary"].startswith("input drift detected in window")
    got = wait_until(lambda: out.exists() and json.loads(out.read_text()), timeout=30,
                     message="hook ran")
    assert got["argv"] == ["--to", "previous", "x; rm -rf ~"]  # literal, no shell
    assert got["rule"] == "data_drift" and got["stdin"]["rule"] == "data_drift"
    # more drifted windows: still one firing, and the cooldown keeps the hook from re-running
    assert r.post("/v1/predictions", recs)[0] == 200
    r.daemon.drain()
    assert r.metric("lrwatch_firings_total", {"rule": "data_drift", "severity": "critical"}) == 1
    r.daemon.hook.flush(10)
    assert r.metric("lrwatch_hooks_run_total", {"result": "ok"}) == 1
