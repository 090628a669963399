"""What a restart restores must also be what the daemon exports and sends: the last window's
gauges, the firing rules' gauges, and their alerts (sent again, or Alertmanager resolves them
by itself)."""

from __future__ import annotations

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from daemon_helpers import WINDOW, make_record
from lrwatch.daemon import Daemon, DaemonConfig
from services import wait_until

LAST = ("lrwatch_model_accuracy", "lrwatch_window_records", "lrwatch_label_coverage_ratio",
        "lrwatch_drift_score", "lrwatch_prediction_mean", "lrwatch_drift_window_detected")


@pytest.fixture
def receiver():
    """A stand-in for Alertmanager's v2 API on a loopback port: it keeps every alert posted."""
    posts: list[list[dict]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            posts.append(json.loads(body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    server.posts = posts
    yield server
    server.shutdown()
    server.server_close()


def _daemon(reference_path, state, **kw):
    return Daemon(DaemonConfig(reference=reference_path, window_size=WINDOW, port=0,
                               state_dir=str(state), log_alerts=False, **kw))


def _post(d, recs):
    status, _ = d.submit("predictions", "\n".join(json.dumps(r) for r in recs).encode())
    assert status == 200


def test_a_restart_exports_the_last_window_again(reference_path, tmp_path):
    rng = random.Random(3)
    d = _daemon(reference_path, tmp_path)
    d.start()
    try:
        _post(d, [make_record(rng, k, label=int(rng.random() < 0.9)) for k in range(3 * WINDOW)])
        assert d.drain()
        before = {n: d.registry.get_sample_value(n) for n in LAST}
    finally:
        d.stop(timeout=5)
    assert before["lrwatch_window_records"] == WINDOW and before["lrwatch_model_accuracy"] > 0
    d = _daemon(reference_path, tmp_path)
    try:
        after = {n: d.registry.get_sample_value(n) for n in LAST}
        assert after == before  # before the fix: 0 for each, an accuracy of 0 among them
        assert d.status()["last_window"]["values"]["model_accuracy"] == \
            before["lrwatch_model_accuracy"]
    finally:
        d.stop(timeout=5)


def test_rules_firing_at_a_restart_are_exported_and_sent_again(reference_path, tmp_path,
                                                               receiver):
    rng = random.Random(4)
    d = _daemon(reference_path, tmp_path, alertmanager=[receiver.url], resend_interval=3600)
    d.start()
    try:
        _post(d, [make_record(rng, k, shift=3.0) for k in range(4 * WINDOW)])
        assert d.drain()
        assert "data_drift" in d.status()["firing"]
        wait_until(lambda: receiver.posts, timeout=30, message="the first alert")
    finally:
        d.stop(timeout=5)
    sent = len(receiver.posts)
    d = _daemon(reference_path, tmp_path, alertmanager=[receiver.url], resend_interval=3600)
    try:
        assert "data_drift" in d.status()["firing"]
        gauge = [s for fam in d.registry.collect() if fam.name == "lrwatch_rule_firing"
                 for s in fam.samples if s.labels.get("rule") == "data_drift"]
        assert gauge and all(s.value == 1 for s in gauge)
        # sent again at once, not only after the hour of resend_interval
        wait_until(lambda: len(receiver.posts) > sent, timeout=30, message="the re-sent alert")
        alert = [a for a in receiver.posts[-1] if a["labels"]["rule"] == "data_drift"][0]
        assert alert["labels"]["alertname"] == "LrwatchDataDrift" and "endsAt" in alert
    finally:
        d.stop(timeout=5)
