"""HTTP ingest: valid and invalid payloads, one test and one counter per rejection reason."""

from __future__ import annotations

import json
import random

import pytest

from daemon_helpers import make_record
from lrwatch.daemon.records import REASONS

GOOD = {"features": {"x": 1.0, "y": 0.5, "c": "a"}, "prediction": 0.4}


def _balanced(r) -> None:
    d = r.daemon
    d.drain()
    c = d.counters
    assert c["predictions"] + c["labels"] + sum(c["errors"].values()) == c["received"]
    m = d.registry.get_sample_value
    errors = sum(m("lrwatch_ingest_errors_total", {"reason": x}) for x in REASONS)
    assert m("lrwatch_predictions_total") + m("lrwatch_labels_total") + errors == \
        m("lrwatch_ingest_received_total")


def test_object_array_and_ndjson_are_accepted(run_daemon) -> None:
    r = run_daemon()
    rng = random.Random(1)
    assert r.post("/v1/predictions", make_record(rng, 1)) == (200, {"accepted": 1, "rejected": 0})
    assert r.post("/v1/predictions", [make_record(rng, i) for i in range(2, 5)])[1]["accepted"] == 3
    nd = "\n".join(json.dumps(make_record(rng, i)) for i in range(5, 9)) + "\n"
    assert r.post("/v1/predictions", nd)[1]["accepted"] == 4
    assert r.metric("lrwatch_predictions_total") == 8
    _balanced(r)


@pytest.mark.parametrize("reason, payload", [
    ("invalid_json", b'{"features": '),
    ("not_an_object", b"[1]"),
    ("missing_features", json.dumps({"prediction": 1}).encode()),
    ("invalid_feature", json.dumps({"features": {"x": {"nested": 1}}, "prediction": 1}).encode()),
    ("invalid_prediction", json.dumps({"features": {"x": 1}, "prediction": {"p": 1}}).encode()),
    ("invalid_id", json.dumps({"id": "", "features": {"x": 1}, "prediction": 1}).encode()),
    ("invalid_time", json.dumps({"time": "yesterday", "features": {"x": 1},
                                 "prediction": 1}).encode()),
    ("invalid_label", json.dumps({"features": {"x": 1}, "prediction": 1,
                                  "label": [1]}).encode()),
])
def test_each_bad_record_is_a_400_with_its_reason_counted(run_daemon, reason, payload) -> None:
    r = run_daemon()
    status, body = r.post("/v1/predictions", payload)
    assert status == 400
    assert body["reasons"] == {reason: 1} and body["error"]
    assert r.metric("lrwatch_ingest_errors_total", {"reason": reason}) == 1
    assert r.metric("lrwatch_predictions_total") == 0
    _balanced(r)


def test_bad_labels_are_counted(run_daemon) -> None:
    r = run_daemon()
    assert r.post("/v1/labels", {"label": 1})[1]["reasons"] == {"invalid_id": 1}
    assert r.post("/v1/labels", {"id": "a"})[1]["reasons"] == {"invalid_label": 1}
    assert r.metric("lrwatch_ingest_errors_total", {"reason": "invalid_label"}) == 1
    _balanced(r)


def test_mixed_batch_accepts_the_good_and_names_the_bad(run_daemon) -> None:
    r = run_daemon()
    nd = "\n".join([json.dumps(GOOD), "{oops", json.dumps(GOOD), json.dumps({"x": 1})])
    status, body = r.post("/v1/predictions", nd)
    assert status == 200
    assert body["accepted"] == 2 and body["rejected"] == 2
    assert body["reasons"] == {"invalid_json": 1, "missing_features": 1}
    assert any("line 2" in e for e in body["errors"])
    _balanced(r)


def test_bearer_token_is_required_and_rejections_counted(run_daemon) -> None:
    r = run_daemon(token="s3cret")
    assert r.post("/v1/predictions", GOOD)[0] == 401
    assert r.post("/v1/predictions", GOOD, {"Authorization": "Bearer nope"})[0] == 401
    assert r.get("/metrics")[0] == 401
    assert r.get("/healthz")[0] == 200
    ok = {"Authorization": "Bearer s3cret"}
    assert r.post("/v1/predictions", GOOD, ok)[0] == 200
    assert r.get("/metrics", ok)[0] == 200
    assert r.metric("lrwatch_ingest_errors_total", {"reason": "unauthorized"}) == 2
    _balanced(r)


def test_body_over_the_limit_is_413_and_counted(run_daemon) -> None:
    r = run_daemon(max_body_bytes=1000)
    big = [GOOD] * 50
    status, body = r.post("/v1/predictions", big)
    assert status == 413 and body["reason"] == "too_large"
    assert r.post("/v1/predictions", GOOD)[0] == 200  # the server still works
    assert r.metric("lrwatch_ingest_errors_total", {"reason": "too_large"}) == 1
    _balanced(r)


def test_full_queue_answers_429_and_memory_stays_bounded(run_daemon) -> None:
    r = run_daemon(max_queue_records=10, start_worker=False)  # nothing drains the queue
    assert r.post("/v1/predictions", [GOOD] * 6)[0] == 200
    status, body = r.post("/v1/predictions", [GOOD] * 6)
    assert status == 429 and body["reason"] == "queue_full" and body["rejected"] == 6
    assert r.daemon.queue.records == 6
    assert r.post("/v1/predictions", [GOOD] * 4)[0] == 200  # exactly full now
    status, body = r.post("/v1/predictions", [GOOD] * 6)  # refused before it is parsed
    assert status == 429 and body["rejected"] == 1
    r.daemon.start()
    assert r.metric("lrwatch_ingest_errors_total", {"reason": "queue_full"}) == 7
    assert r.metric("lrwatch_predictions_total") == 10
    assert r.post("/v1/predictions", [GOOD] * 6)[0] == 200  # drained: room again
    _balanced(r)


def test_status_healthz_and_unknown_paths(run_daemon) -> None:
    r = run_daemon()
    status, body = r.get("/v1/status")
    assert status == 200 and json.loads(body)["reference"]["features"] == ["c", "x", "y",
                                                                           "_prediction"]
    assert r.get("/nope")[0] == 404
    assert r.post("/v1/nope", GOOD)[0] == 404
