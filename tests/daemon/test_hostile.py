"""Hostile input: every class of bad body gets its 4xx and its counter, the good records of
the same NDJSON body still count, and the daemon serves other clients meanwhile."""

from __future__ import annotations

import json
import os
import random
import time

import pytest

from daemon_helpers import WINDOW, assert_balanced, make_record
from services import wait_until

GOOD = {"features": {"x": 1.0, "y": 0.5, "c": "a"}, "prediction": 0.4}
GOOD_LINE = json.dumps(GOOD)


def _strict(body: bytes) -> object:
    def refuse(c: str) -> None:
        raise AssertionError(f"not strict JSON: {c}")
    return json.loads(body, parse_constant=refuse)


def _deep(depth: int) -> str:
    return '{"features": {"x": ' + "[" * depth + "1" + "]" * depth + '}, "prediction": 1}'


@pytest.mark.parametrize("depth", [1100, 100_000])
def test_deep_nesting_is_a_400_and_the_good_lines_still_count(run_daemon, depth) -> None:
    r = run_daemon()
    status, body = r.post("/v1/predictions", _deep(depth))
    assert status == 400 and body["reasons"] == {"invalid_json": 1}, body
    status, body = r.post("/v1/predictions", "\n".join([GOOD_LINE, _deep(depth), GOOD_LINE]))
    assert status == 200 and body["accepted"] == 2 and body["reasons"] == {"invalid_json": 1}
    assert "line 2" in body["errors"][0]
    status, body = r.post("/v1/labels", "[" * depth + "]" * depth)
    assert status == 400 and body["reasons"] == {"invalid_json": 1}
    assert r.post("/v1/predictions", GOOD) == (200, {"accepted": 1, "rejected": 0})
    assert r.metric("lrwatch_ingest_errors_total", {"reason": "invalid_json"}) == 3
    assert r.metric("lrwatch_predictions_total") == 3
    assert_balanced(r.daemon)


def test_a_line_that_is_not_utf8_is_rejected_alone(run_daemon) -> None:
    r = run_daemon()
    body = GOOD_LINE.encode() + b"\n" + b'{"features": {"x": "\xff\xfe"}, "prediction": 1}' + \
        b"\n" + GOOD_LINE.encode()
    status, out = r.post("/v1/predictions", body)
    assert status == 200 and out["accepted"] == 2 and out["reasons"] == {"invalid_json": 1}
    assert "UTF-8" in out["errors"][0]
    assert_balanced(r.daemon)


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "1e400", "-1e999"])
def test_infinite_feature_values_are_invalid_features(run_daemon, value) -> None:
    r = run_daemon()
    bad = '{"features": {"x": %s, "y": 0.5, "c": "a"}, "prediction": 0.4}' % value
    status, out = r.post("/v1/predictions", "\n".join([GOOD_LINE, bad]))
    assert status == 200 and out["accepted"] == 1 and out["reasons"] == {"invalid_feature": 1}
    assert "finite" in out["errors"][0]
    for field in ("prediction", "time", "label"):  # anywhere else: that field's reason
        rec = dict(GOOD)
        body = json.dumps(rec)[:-1] + ', "%s": %s}' % (field, value)
        if field == "prediction":
            body = json.dumps({"features": GOOD["features"]})[:-1] + ', "prediction": %s}' % value
        status, out = r.post("/v1/predictions", body)
        assert status == 400 and out["reasons"] == {f"invalid_{field}": 1}, (field, out)
    assert_balanced(r.daemon)


def test_nan_feature_values_count_as_missing_and_never_reach_the_statistics(run_daemon) -> None:
    r = run_daemon()
    rng = random.Random(3)
    lines = []
    for i in range(WINDOW):
        rec = make_record(rng, i)
        line = json.dumps(rec)
        if i % 2 == 0:  # half the window: x is NaN (how pandas writes a missing value)
            line = line.replace('"x": %r' % rec["features"]["x"], '"x": NaN')
        lines.append(line)
    status, out = r.post("/v1/predictions", "\n".join(lines))
    assert status == 200 and out == {"accepted": WINDOW, "rejected": 0}
    r.daemon.drain()
    st = json.loads(r.get("/v1/status")[1])
    assert st["counters"]["windows"] == 1
    assert st["last_window"]["values"]["missing_ratio"] == pytest.approx(0.5)
    assert r.metric("lrwatch_missing_ratio", {"feature": "x"}) == pytest.approx(0.5)
    assert st["last_window"]["values"]["drift_score"] < 1e300  # finite
    assert_balanced(r.daemon)


def test_status_is_strict_json_even_with_non_finite_values(run_daemon) -> None:
    r = run_daemon()
    r.daemon.last = {"values": {"drift_score": float("inf"), "x": float("nan")}}
    status, body = r.get("/v1/status")
    assert status == 200
    assert _strict(body)["last_window"]["values"] == {"drift_score": "inf", "x": "nan"}


def test_each_limit_is_its_own_counted_reason(run_daemon) -> None:
    r = run_daemon(max_line_bytes=2000, max_string_chars=100, max_features=5)
    long_line = json.dumps({"features": {"x": 1.0, "pad": "z" * 2500}, "prediction": 1})
    long_str = json.dumps({"features": {"x": 1.0, "c": "s" * 101}, "prediction": 1})
    long_pred = json.dumps({"features": {"x": 1.0}, "prediction": "p" * 101})
    wide = json.dumps({"features": {f"f{i}": 1.0 for i in range(6)}, "prediction": 1})
    nd = "\n".join([GOOD_LINE, long_line, long_str, long_pred, wide, GOOD_LINE])
    status, out = r.post("/v1/predictions", nd)
    assert status == 200 and out["accepted"] == 2
    assert out["reasons"] == {"line_too_long": 1, "string_too_long": 2,
                              "too_many_features": 1}
    # a JSON array is one document (bounded by max_body_bytes): its strings are still checked
    status, out = r.post("/v1/predictions", json.dumps([GOOD, json.loads(long_str)]))
    assert status == 200 and out["reasons"] == {"string_too_long": 1}
    status, out = r.post("/v1/labels", json.dumps({"id": "a", "label": "l" * 101}))
    assert status == 400 and out["reasons"] == {"string_too_long": 1}
    for reason, n in (("line_too_long", 1), ("string_too_long", 4), ("too_many_features", 1)):
        assert r.metric("lrwatch_ingest_errors_total", {"reason": reason}) == n
    assert_balanced(r.daemon)


def test_a_huge_tailed_line_is_skipped_unbuffered_and_counted(run_daemon, tmp_path) -> None:
    from lrwatch.daemon.sources import FileTailer

    path = tmp_path / "preds.jsonl"
    with open(path, "w") as fh:
        fh.write(GOOD_LINE + "\n")
        fh.write('{"features": {"c": "' + "x" * (5 << 20) + '"}, "prediction": 1}\n')
        fh.write(GOOD_LINE + "\n" + GOOD_LINE + "\n")
    r = run_daemon(start_worker=False, max_line_bytes=1 << 20)
    r.daemon.tailers = [FileTailer(r.daemon, str(path), 0.05)]
    r.daemon.start()
    wait_until(lambda: r.daemon.counters["received"] == 4, timeout=30, message="4 lines")
    c = r.daemon.counters
    assert c["predictions"] == 3 and c["errors"]["line_too_long"] == 1
    assert r.daemon.files[str(path)][2] == os.path.getsize(path)
    assert_balanced(r.daemon)


def test_unauthorized_requests_are_not_journaled_and_not_data_errors(run_daemon,
                                                                     tmp_path) -> None:
    state = str(tmp_path / "state")
    r = run_daemon(token="s3cret", state_dir=state)
    ok = {"Authorization": "Bearer s3cret"}
    assert r.post("/v1/predictions", GOOD, ok)[0] == 200
    r.daemon.drain()
    journal = [os.path.join(state, f) for f in os.listdir(state) if f.startswith("journal-")]
    size = sum(map(os.path.getsize, journal))
    for _ in range(100):
        assert r.post("/v1/predictions", {})[0] == 401
    assert sum(map(os.path.getsize, journal)) == size  # nothing written for a 401
    rng = random.Random(4)
    nd = "\n".join(json.dumps(make_record(rng, i)) for i in range(WINDOW - 1))
    assert r.post("/v1/predictions", nd, ok)[0] == 200
    r.daemon.drain()
    assert r.daemon.counters["windows"] == 1
    # 100 rejected requests in this window, but none about the data
    assert r.daemon.last["values"]["ingest_error_ratio"] == 0.0
    assert r.metric("lrwatch_ingest_errors_total", {"reason": "unauthorized"}) == 100
    assert_balanced(r.daemon)


def test_the_daemon_keeps_serving_while_hostile_bodies_arrive(run_daemon) -> None:
    r = run_daemon()
    deep = _deep(200_000)
    t0 = time.monotonic()
    for _ in range(5):
        assert r.post("/v1/predictions", deep)[0] == 400
        assert r.post("/v1/predictions", GOOD)[0] == 200
        assert r.get("/healthz")[0] == 200
    assert time.monotonic() - t0 < 30
    assert r.metric("lrwatch_predictions_total") == 5
    assert_balanced(r.daemon)


def test_lines_within_agrees_with_splitting() -> None:
    """The block scan that lets most bodies skip the string-length check is exact."""
    from lrwatch.daemon.records import lines_within

    rng = random.Random(1)
    for _ in range(5000):
        limit = rng.choice([64, 100, 200, 257, 4096])
        lines = [b"x" * rng.choice([rng.randint(0, limit // 3), rng.randint(0, 2 * limit)])
                 for _ in range(rng.randint(1, 40))]
        body = b"\n".join(lines)
        assert lines_within(body, limit) == (max(map(len, lines)) <= limit)


def test_limits_and_http_settings_come_from_the_config_file(tmp_path) -> None:
    from lrwatch.daemon import DaemonConfig
    from lrwatch.errors import ConfigError

    cfg = DaemonConfig.from_mapping(
        {"limits": {"max_line_bytes": 5000, "max_string_chars": 50, "max_features": 7},
         "http": {"max_connections": 10, "backlog": 64, "header_timeout": 2,
                  "read_timeout": 3, "keep_alive_timeout": 4, "tls_certfile": "c.pem",
                  "tls_keyfile": "k.pem"}}, base_dir=str(tmp_path))
    assert (cfg.max_line_bytes, cfg.max_string_chars, cfg.max_features) == (5000, 50, 7)
    assert (cfg.max_connections, cfg.backlog, cfg.read_timeout) == (10, 64, 3)
    assert cfg.tls_certfile == str(tmp_path / "c.pem")
    with pytest.raises(ConfigError, match="valid: backlog"):
        DaemonConfig.from_mapping({"http": {"timeout": 1}})
    with pytest.raises(ConfigError, match="tls_keyfile"):
        DaemonConfig(tls_certfile="c.pem")
    with pytest.raises(ConfigError, match="read_timeout"):
        DaemonConfig(read_timeout=0)


def test_tailed_chunks_with_a_long_string_take_the_checked_path(run_daemon) -> None:
    """The chunk decoders bound no string: a chunk with a line longer than the string limit
    goes to the general path, which rejects the record and keeps the others."""
    r = run_daemon(start_worker=False, max_string_chars=100)
    d = r.daemon
    long_cat = json.dumps({"features": {"x": 1.0, "y": 0.5, "c": "z" * 500}, "prediction": 0.4})
    chunk = "\n".join([GOOD_LINE, long_cat, GOOD_LINE]).encode()
    assert d.enqueue_file("/data/p.jsonl", 1, 2, len(chunk) + 1, chunk, 1_700_000_000.0)
    d._apply(d.queue.get(0))
    assert d.counters["predictions"] == 2
    assert d.counters["errors"]["string_too_long"] == 1
    assert_balanced(d)


def test_an_integer_no_float_can_hold_is_refused_where_it_stands(run_daemon) -> None:
    """``10**400`` written out: accepted before, it overflowed in the worker (the batch lost,
    the window that held it never closed; a journal that held it crashed every restart) and
    in the HTTP handler (a 500, the request never counted)."""
    r = run_daemon()
    big = "9" * 400
    bad = '{"features": {"x": %s, "y": 0.5, "c": "a"}, "prediction": 0.4}' % big
    status, out = r.post("/v1/predictions", "\n".join([GOOD_LINE, bad]))
    assert status == 200 and out["accepted"] == 1 and out["reasons"] == {"invalid_feature": 1}
    assert "400 digits" in out["errors"][0]
    for field in ("prediction", "time", "label"):
        body = json.dumps({"features": GOOD["features"], "prediction": 0.4})[:-1] + \
            ', "%s": %s}' % (field, big)
        if field == "prediction":
            body = json.dumps({"features": GOOD["features"]})[:-1] + ', "prediction": %s}' % big
        status, out = r.post("/v1/predictions", body)
        assert status == 400 and out["reasons"] == {f"invalid_{field}": 1}, (field, out)
    status, out = r.post("/v1/predictions", '{"features": {"x": 1}, "prediction": [0.5, %s]}'
                         % big)
    assert status == 400 and out["reasons"] == {"invalid_prediction": 1}
    status, out = r.post("/v1/labels", '{"id": "a", "label": 1, "time": %s}' % big)
    assert status == 400 and out["reasons"] == {"invalid_time": 1}
    assert r.daemon.counters["windows"] == 0 and r.metric("lrwatch_internal_errors_total") == 0
    assert_balanced(r.daemon)


def test_a_body_the_queue_can_never_hold_is_a_413_not_a_retry(run_daemon) -> None:
    r = run_daemon(max_queue_records=50)
    rng = random.Random(9)
    status, out = r.post("/v1/predictions",
                         "\n".join(json.dumps(make_record(rng, i)) for i in range(51)))
    assert status == 413 and out["reason"] == "too_large" and "smaller bodies" in out["error"]
    status, out = r.post("/v1/predictions",
                         "\n".join(json.dumps(make_record(rng, i)) for i in range(50)))
    assert status == 200 and out["accepted"] == 50
    assert r.metric("lrwatch_ingest_errors_total", {"reason": "too_large"}) == 51
    assert_balanced(r.daemon)


def test_predictions_of_another_kind_than_the_reference_s_are_refused_by_name(
        run_daemon) -> None:
    """The reference's predictions are a binary model's class-1 probabilities: ``[p0, p1]``
    is read as ``p1`` (it was read as a class index: a prediction drift, and no estimate);
    a class name, a boolean or another width is refused; any number is kept (a regression
    whose reference values fell in [0, 1] reads as probabilities too)."""
    r = run_daemon()
    feats = GOOD["features"]
    body = "\n".join(json.dumps({"features": feats, "prediction": p})
                     for p in ([0.3, 0.7], {"proba": [0.9, 0.1]}, 0.2, 1.5, 1))
    status, out = r.post("/v1/predictions", body)
    assert status == 200 and out == {"accepted": 5, "rejected": 0}
    r.daemon.drain()
    assert r.daemon.window.preds[-5:] == [0.7, 0.1, 0.2, 1.5, 1]
    for p in ("yes", True, [0.2, 0.3, 0.5]):
        status, out = r.post("/v1/predictions", json.dumps({"features": feats, "prediction": p}))
        assert status == 400 and out["reasons"] == {"invalid_prediction": 1}, p
        assert "class-1 probabilities" in out["error"]
    assert_balanced(r.daemon)


def test_a_compressed_body_is_a_415_not_lines_that_are_not_utf8(run_daemon) -> None:
    import gzip

    r = run_daemon()
    status, out = r.post("/v1/predictions", gzip.compress(GOOD_LINE.encode()),
                         headers={"Content-Encoding": "gzip"})
    assert status == 415 and "send the JSON uncompressed" in out["error"]
    status, out = r.post("/v1/predictions", GOOD_LINE, headers={"Content-Encoding": "identity"})
    assert status == 200 and out["accepted"] == 1
    assert_balanced(r.daemon)


@pytest.mark.parametrize("backend", ["orjson", "stdlib"])
def test_a_lone_surrogate_escape_is_invalid_json_and_metrics_stay_servable(
        run_daemon, monkeypatch, backend) -> None:
    """``"\\ud800"`` is valid JSON text but no Unicode character: the standard library's
    parser (orjson's fallback) made it a Python string that cannot be written as UTF-8. As a
    feature name of a live reference it became a metric label, and every scrape of /metrics
    failed from then on (and after a restart: the reference keeps it). A pair that makes one
    character (an emoji escaped as two) is fine."""
    from lrwatch.daemon import records
    from services import promtool_check_metrics

    monkeypatch.setattr(records, "JSON_BACKEND", backend)
    r = run_daemon(reference=None, live_records=100)
    rng = random.Random(31)
    lines = []
    for i in range(300):
        key = "\\ud83d\\ude00" if i % 2 else "\\ud800k"   # a pair; a lone high surrogate
        lines.append('{"features": {"x": %r, "%s": %r}, "prediction": %r}'
                     % (rng.gauss(0, 1), key, rng.gauss(0, 1), rng.random()))
    lines.append('{"features": {"x": 1.0}, "prediction": "\\udc00"}')  # a lone low one
    status, body = r.post("/v1/predictions", "\n".join(lines))
    assert status == 200 and body["accepted"] == 150, body
    assert body["reasons"] == {"invalid_json": 151}
    assert "surrogate" in body["errors"][0]
    r.daemon.drain()
    assert r.daemon.reference is not None and "\U0001f600" in r.daemon.reference.names
    status, text = r.get("/metrics")
    assert status == 200 and "\U0001f600".encode() in text
    rc, out = promtool_check_metrics(text)
    assert rc == 0, out
    assert_balanced(r.daemon)


def test_reference_data_with_a_lone_surrogate_names_the_line(tmp_path) -> None:
    from lrwatch.daemon.reference import read_data
    from lrwatch.errors import ConfigError

    path = tmp_path / "ref.jsonl"
    path.write_text(GOOD_LINE + '\n{"features": {"\\udfff": 1.0}, "prediction": 0.4}\n')
    with pytest.raises(ConfigError, match=r"ref\.jsonl:2: not JSON .*surrogate"):
        read_data(path)
