"""Defects found by the sixteenth round's audit (6 December) of ``lrwatch daemon``: each
reproduced with a real daemon (a process, or one serving HTTP on a loopback port the test
picks) fed by real clients."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from typing import Any

from daemon_helpers import (WINDOW, assert_balanced, edited_state, make_record,
                            start_daemon_process)
from services import PrometheusServer, free_port, http_request, wait_until

from lrwatch.daemon import Daemon, DaemonConfig


_REG = "engine.rules.accuracy_regression.detectors.model_accuracy"
#: hand edits of the detectors' saved states, and what each did before it was refused
_DETECTOR_EDITS = {
    "detector.history.0.0.0=null": "a sum read as NaN: the feature's accumulated test NaN, "
                                   "never over its threshold, for 16 windows",
    "detector.history.0.1=[100.0]": "one count for three features: broadcast",
    "detector.history.0.1.1=-5": "a negative count",
    "detector.joint_history.0.1=null": "the start stopped: float(None)",
    "detector.joint_history.0.1=0": "a window of no rows: its mean divided by zero",
    "detector.joint_history.0.0=[1.0]": "one sum for four features",
    f"{_REG}.best=\"x\"": "every later window's test failed (TypeError)",
    f"{_REG}.best=\"nan\"": "no level is below NaN: the regression test silenced for good",
    f"{_REG}.n=1.5": "a count that is no count",
    f"{_REG}.diffs=[\"x\"]": "every later window's test failed",
    "engine.rules.no_traffic.detectors.step.last_t=\"x\"": "every window and every clock tick "
                                                          "failed",
    "engine.rules.data_drift.detectors.drift_detected.last=[1]": "a list for a number",
}


def _saved_state(reference_path: str, state: Any) -> dict[str, Any]:
    """A state directory after five windows with labels (the regression detector has seen
    values, the drift detector holds evidence, the joint test's too); the saved state."""
    d = Daemon(DaemonConfig(reference=reference_path, window_size=WINDOW, state_dir=str(state),
                            log_alerts=False))
    d.start()
    rng = random.Random(160)
    for w in range(6):  # each window's labels before the next window closes it
        recs = [make_record(rng, i) for i in range(w * WINDOW, w * WINDOW + WINDOW)][
            :WINDOW if w < 5 else 30]
        d.submit("predictions", "\n".join(map(json.dumps, recs)).encode())
        d.submit("labels", json.dumps([{"id": r["id"], "label": int(r["prediction"] > 0.4)}
                                       for r in recs]).encode())
        assert d.drain()
    d.stop()
    good = json.loads((state / "state.json").read_text())
    assert len(good["detector"]["history"]) == 5 and len(good["detector"]["joint_history"]) == 5
    assert good["engine"]["rules"]["accuracy_regression"]["detectors"]["model_accuracy"]["n"] > 1
    return good


def test_a_damaged_detector_state_is_refused_counted_and_the_detector_rebuilt(
        reference_path: str, tmp_path: Any) -> None:
    """The detectors' saved states in ``state.json`` were not checked: a ``null`` sum in the
    drift evidence (NaN), a count row of another width, a ``null`` window size of the joint
    test (the start stopped with a ``TypeError``), a rule detector's ``best`` edited to
    ``"x"`` (every later window's test failed) or to ``"nan"`` (the regression test silenced
    for good). Each is refused now, named in a warning, counted in
    ``lrwatch_daemon_problems_total{reason="detector_state_refused"}``, and only that part
    starts afresh: the drift detector from the reference with no evidence, the rules from
    nothing; the counters, the open window and the pending labels are kept (no record
    accepted is lost), and the windows after it are tested without an error."""
    base = tmp_path / "state"
    good = _saved_state(reference_path, base)
    saved = {k: good["counters"][k] for k in ("predictions", "labels", "received", "windows",
                                               "labels_joined")}
    fresh_engine = Daemon(DaemonConfig(reference=reference_path, window_size=WINDOW,
                                       log_alerts=False)).engine.state_dict()["rules"]
    for n, (edit, before) in enumerate(_DETECTOR_EDITS.items()):
        state = tmp_path / f"state{n}"
        shutil.copytree(base, state)
        (state / "state.json").write_text(json.dumps(edited_state(good, edit)))
        d = Daemon(DaemonConfig(reference=reference_path, window_size=WINDOW,
                                state_dir=str(state), log_alerts=False))
        try:
            m = d.registry.get_sample_value
            assert m("lrwatch_daemon_problems_total", {"reason": "detector_state_refused"}) \
                == 1, (edit, before)
            assert m("lrwatch_daemon_problems_total", {"reason": "snapshot_set_aside"}) == 0, \
                edit
            assert not list(state.glob("state.json.bad-*")), edit
            assert {k: d.counters[k] for k in saved} == saved, edit
            assert len(d.window) == 30 and len(d.pending) == len(good["pending"]["items"]), edit
            assert d.detector is not None
            if edit.startswith("detector."):
                assert d.detector.state_dict()["history"] == [], edit
                assert d.detector.state_dict()["joint_history"] == [], edit
            else:  # the drift evidence was not damaged: kept
                assert len(d.detector.state_dict()["history"]) == 5, edit
                assert d.engine.state_dict()["rules"] == fresh_engine, edit
            d.start()
            rng = random.Random(161 + n)
            recs = [make_record(rng, i) for i in range(9000, 9000 + 2 * WINDOW)]
            d.submit("predictions", "\n".join(map(json.dumps, recs)).encode())
            d.submit("labels", json.dumps([{"id": r["id"], "label": 1} for r in recs]).encode())
            assert d.drain()
            d.tick()
            assert d.drain()
            assert d.counters["windows"] == saved["windows"] + 2, edit
            assert m("lrwatch_internal_errors_total") == 0, (edit, before)
            assert_balanced(d)
        finally:
            d.stop()


def test_a_daemon_process_starts_on_a_state_with_a_damaged_joint_drift_state(
        reference_path: str, tmp_path: Any) -> None:
    """The audit's reproduction with a real process: a saved state whose joint test window
    size was edited to ``null`` stopped every start with a ``TypeError`` traceback (the check
    of the state's fields let a ``null`` number through, as it does for times). It starts
    now, says what it refused, counts it on /metrics, and takes records."""
    state, log, port = str(tmp_path / "state"), str(tmp_path / "daemon.log"), free_port()
    proc = start_daemon_process(reference_path, state, port, log)
    try:
        rng = random.Random(170)
        body = "\n".join(json.dumps(make_record(rng, i)) for i in range(3 * WINDOW + 3))
        assert http_request(f"http://127.0.0.1:{port}/v1/predictions", method="POST",
                            data=body.encode())[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    with open(os.path.join(state, "state.json")) as fh:
        snap = json.load(fh)
    assert snap["detector"]["joint_history"], "no joint evidence to damage"
    snap["detector"]["joint_history"][0][1] = None
    with open(os.path.join(state, "state.json"), "w") as fh:
        json.dump(snap, fh)
    proc = start_daemon_process(reference_path, state, port, log)
    try:
        status, text = http_request(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        assert 'lrwatch_daemon_problems_total{reason="detector_state_refused"} 1.0' in \
            text.decode(), text.decode()[-2000:]
        with PrometheusServer([f"127.0.0.1:{port}"], workdir=tmp_path / "prometheus") as prom:
            got = prom.wait_for('lrwatch_daemon_problems_total{reason="detector_state_refused"}'
                                ' == 1', timeout=60)
            assert got[0]["metric"]["job"] == "lrwatch"
        body = "\n".join(json.dumps(make_record(rng, i)) for i in range(1000, 1000 + WINDOW))
        status, out = http_request(f"http://127.0.0.1:{port}/v1/predictions", method="POST",
                                   data=body.encode())
        assert status == 200 and json.loads(out)["accepted"] == WINDOW
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    with open(log) as fh:
        text = fh.read()
    assert "a damaged detector state is not restored" in text and \
        "'joint_history'[0]" in text and "Traceback" not in text, text[-3000:]


def test_an_integer_id_beyond_64_bits_is_refused_alike_by_both_json_back_ends(
        run_daemon: Any, reference_path: str, tmp_path: Any, monkeypatch: Any) -> None:
    """``json.dumps({"id": uuid.uuid4().int, ...})`` writes a 39-digit integer. With the
    ``fast`` extra (orjson) it was refused as "id must be ... or an integer" (orjson reads
    integers beyond 64 bits as floats), without it (the standard library) it was accepted:
    the same payload, two answers. It is refused by both now, with what to do (send it as
    a string); 64-bit integers, unsigned ones included, are ids in both."""
    import uuid

    rng = random.Random(180)
    big = uuid.UUID(int=rng.getrandbits(128) | 1 << 127).int
    recs = [make_record(rng, 1, id=big), make_record(rng, 2, id=2 ** 64 - 1),
            make_record(rng, 3, id=-2 ** 63), make_record(rng, 4, id=str(big))]
    body = "\n".join(map(json.dumps, recs))
    labels = json.dumps([{"id": big, "label": 1}, {"id": 2 ** 64 - 1, "label": 1}])

    def check(status: int, out: dict[str, Any], accepted: int) -> None:
        assert status == 200 and out["accepted"] == accepted, out
        assert out["reasons"] == {"invalid_id": 1}, out
        assert "an integer id beyond 64 bits" in out["errors"][0] and \
            "send it as a string" in out["errors"][0], out

    r = run_daemon()
    check(*r.post("/v1/predictions", body), 3)
    check(*r.post("/v1/labels", labels), 1)
    assert r.daemon.drain() and r.daemon.counters["labels_joined"] == 1
    assert_balanced(r.daemon)
    # the standard library's parser (no fast extra), in a daemon process
    monkeypatch.setenv("LRWATCH_JSON", "stdlib")
    state, port = str(tmp_path / "state"), free_port()
    proc = start_daemon_process(reference_path, state, port, str(tmp_path / "daemon.log"))
    try:
        for path, data, accepted in (("/v1/predictions", body, 3), ("/v1/labels", labels, 1)):
            status, out = http_request(f"http://127.0.0.1:{port}{path}", method="POST",
                                       data=data.encode())
            check(status, json.loads(out), accepted)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_a_regression_near_the_float_range_does_not_stop_the_next_start(
        tmp_path: Any) -> None:
    """A regression model's outputs near the float range (a diverged model: 1e308 against a
    label of -1e308) made the window's absolute-error sum and the last window's
    ``model_error`` infinite, and its prediction mean (a sum of 1e307s) too. The snapshot
    wrote them as ``null`` (JSON has no infinity): at the next start the open window's
    ``null`` sum made the state "no state" (set aside, and refused once the journal was
    pruned), and the last window's ``null`` stopped every start with a ``TypeError`` while
    restoring the gauges. They are saved as ``"inf"`` now and read back; the mean is computed
    without overflow."""
    from lrwatch.daemon import build_reference

    rng = random.Random(190)

    def rec(i: int, **kw: Any) -> dict[str, Any]:
        return make_record(rng, i, prediction=rng.gauss(10.0, 3.0), **kw)

    ref = build_reference([rec(i) for i in range(1500)], window_size=WINDOW, sims=200, seed=0)
    assert ref.prediction_type == "regression"
    reference = str(tmp_path / "reference.json")
    ref.save(reference)
    state, log, port = str(tmp_path / "state"), str(tmp_path / "daemon.log"), free_port()
    recs = [rec(i) for i in range(WINDOW + 30)]
    for r in recs[:3] + recs[WINDOW + 3:WINDOW + 6]:  # in the closed window and the open one
        r["prediction"], r["label"] = 1e308, -1e308
    for r in recs[10:20]:
        r["prediction"] = 1e307
    proc = start_daemon_process(reference, state, port, log)
    try:
        status, out = http_request(f"http://127.0.0.1:{port}/v1/predictions", method="POST",
                                   data="\n".join(map(json.dumps, recs)).encode())
        assert status == 200 and json.loads(out)["accepted"] == WINDOW + 30

        def metrics() -> str:
            return http_request(f"http://127.0.0.1:{port}/metrics")[1].decode()

        wait_until(lambda: "lrwatch_model_error +Inf" in metrics(), timeout=30,
                   message="the window with the overflow tested")
        text = metrics().encode()
        mean = [ln for ln in text.decode().splitlines()
                if ln.startswith("lrwatch_prediction_mean ")]
        assert mean and 3.9e306 < float(mean[0].split()[1]) < 4.1e306, mean  # 4e308 / 100
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    proc = start_daemon_process(reference, state, port, log)  # stopped with a TypeError
    try:
        status, out = http_request(f"http://127.0.0.1:{port}/v1/status")
        st = json.loads(out)
        assert st["counters"]["predictions"] == WINDOW + 30 and st["window"]["records"] == 30
        assert st["last_window"]["values"]["model_error"] == "inf"
        status, text = http_request(f"http://127.0.0.1:{port}/metrics")
        text = text.decode()
        assert "lrwatch_model_error +Inf" in text
        assert 'lrwatch_daemon_problems_total{reason="snapshot_set_aside"} 0.0' in text
        more = [rec(i, label=10.0) for i in range(1000, 1000 + WINDOW)]
        status, out = http_request(f"http://127.0.0.1:{port}/v1/predictions", method="POST",
                                   data="\n".join(map(json.dumps, more)).encode())
        assert status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    # the window with the overflow closed: its model_error is the last window's, the open
    # window holds none (this state stopped every start: float(None) restoring the gauge)
    with open(os.path.join(state, "state.json")) as fh:
        snap = json.load(fh)
    assert snap["last"]["values"]["model_error"] == "inf" and snap["window"]["score_sum"] < 1e6
    proc = start_daemon_process(reference, state, port, log)
    try:
        status, text = http_request(f"http://127.0.0.1:{port}/metrics")
        assert "lrwatch_model_error +Inf" in text.decode()
        assert 'lrwatch_predictions_total 230.0' in text.decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    with open(log) as fh:
        text = fh.read()
    assert "Traceback" not in text and "cannot be restored" not in text, text[-3000:]


def _lrwatch(*args: str) -> Any:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "lrwatch", *args], capture_output=True,
                          text=True, timeout=120)


def test_a_negative_seed_is_refused_naming_it_not_with_numpys_traceback(
        reference_path: str, tmp_path: Any) -> None:
    """``seed: -1`` in the daemon's config passed the config check and stopped the start with
    numpy's traceback ("expected non-negative integer", no word of which setting) once a
    calibration ran; ``lrwatch baseline build --seed -1`` the same. Refused now, naming the
    seed, before anything is built."""
    import pytest

    from lrwatch.daemon import build_reference
    from lrwatch.errors import ConfigError

    cfg = tmp_path / "lrwatch.yml"
    cfg.write_text(f"reference: {{path: {reference_path}}}\nwindow: {{size: 150}}\n"
                   f"seed: -1\n")
    out = _lrwatch("daemon", "--config", str(cfg), "--port", "0")
    assert out.returncode != 0 and "seed must be an integer >= 0, got -1" in out.stderr, \
        out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    rng = random.Random(200)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(make_record(rng, i)) + "\n" for i in range(300)))
    out = _lrwatch("baseline", "build", str(data), "-o", str(tmp_path / "ref.json"),
                   "--seed", "-1", "-q")
    assert out.returncode == 2 and "'--seed'" in out.stderr and "Traceback" not in out.stderr
    with pytest.raises(ConfigError, match="seed must be an integer >= 0, got -1"):
        build_reference([make_record(rng, i) for i in range(300)], window_size=WINDOW,
                        sims=100, seed=-1)


def test_a_window_size_beyond_what_a_window_holds_is_refused_at_once(
        reference_path: str, tmp_path: Any) -> None:
    """``--window-size 1000000000`` (a typo of zeros) was accepted: the start recalibrated
    the thresholds by resampling windows of that size, and hung before the port opened
    (1,000,000 took more than two minutes; 100,000 ten seconds), and a window that size
    would have held every record in memory. Over ``window.max_records`` (100,000, the most a
    time window holds) it is refused now, saying how to mean it."""
    import pytest

    from lrwatch.errors import ConfigError

    with pytest.raises(ConfigError, match="raise window.max_records too"):
        DaemonConfig(reference=reference_path, window_size=200_000)
    out = _lrwatch("daemon", "--reference", reference_path, "--window-size", "1000000000",
                   "--port", "0")
    assert out.returncode != 0 and "window size 1000000000 is over window.max_records " \
        "(100000)" in out.stderr, out.stderr[-2000:]
    assert DaemonConfig(reference=reference_path, window_size=200_000,
                        window_max_records=200_000).window_size == 200_000


def test_a_record_sent_to_the_other_endpoint_or_with_a_key_in_another_case_says_so(
        run_daemon: Any) -> None:
    """A delayed label posted to /v1/predictions was refused with "a record needs a
    'features' object", a prediction posted to /v1/labels with "a label record needs a
    'label'", and ``"Features"``/``"Prediction"``/``"Label"`` the same: nothing said what was
    wrong. The message names the endpoint to use, or the key as written and as it must be."""
    r = run_daemon()
    rng = random.Random(210)
    rec = make_record(rng, 1)
    cases = [
        ("/v1/predictions", {"id": "r1", "label": 1}, "missing_features", "send those to "
         "/v1/labels"),
        ("/v1/labels", rec, "invalid_label", "send those to /v1/predictions"),
        ("/v1/predictions", {"Features": rec["features"], "prediction": 0.5},
         "missing_features", "it has 'Features': keys are case-sensitive, write 'features'"),
        ("/v1/predictions", {"features": rec["features"], "Prediction": 0.5},
         "invalid_prediction", "it has 'Prediction': keys are case-sensitive"),
        ("/v1/labels", {"id": "r1", "Label": 1}, "invalid_label",
         "it has 'Label': keys are case-sensitive, write 'label'"),
    ]
    for path, body, reason, says in cases:
        status, out = r.post(path, [body])
        assert status == 400 and out["reasons"] == {reason: 1}, (body, out)
        assert says in out["error"], (body, out)
    # a record of its own endpoint that lacks the key gets no hint
    status, out = r.post("/v1/predictions", [{"prediction": 0.5}])
    assert out["error"].endswith("a record needs a 'features' object"), out
    assert_balanced(r.daemon)


def test_a_restart_with_lower_label_limits_brings_the_saved_labels_within_them(
        reference_path: str, tmp_path: Any) -> None:
    """``limits.max_pending_labels`` or ``labels.max_early`` lowered between two runs (for
    memory): the saved pending predictions and early labels were restored whole, so
    ``lrwatch_pending_labels`` read five times its bound, and a batch whose ids repeat (one
    eviction per prediction) kept the store over it for good. They are brought within the
    limits at the start now, the oldest first, counted as at run time (predictions forgotten:
    expired; labels given up: unmatched, so labels = joined + unmatched + held still holds)."""
    state = str(tmp_path / "state")
    d = Daemon(DaemonConfig(reference=reference_path, window_size=WINDOW, state_dir=state,
                            log_alerts=False))
    d.start()
    rng = random.Random(220)
    recs = [make_record(rng, i) for i in range(500)]
    d.submit("predictions", "\n".join(map(json.dumps, recs)).encode())
    d.submit("labels", json.dumps([{"id": f"u{i}", "label": 1} for i in range(300)]).encode())
    assert d.drain() and len(d.pending) == 500 and len(d.pending.early) == 300
    d.stop()
    d = Daemon(DaemonConfig(reference=reference_path, window_size=WINDOW, state_dir=state,
                            log_alerts=False, max_pending_labels=100, max_early_labels=50))
    try:
        m = d.registry.get_sample_value
        assert len(d.pending) == 100 and m("lrwatch_pending_labels") == 100
        assert len(d.pending.early) == 50
        assert d.counters["labels_expired"] == 400 and m("lrwatch_labels_expired_total") == 400
        assert d.counters["labels_unmatched"] == 250
        kept = [it[0] for it in d.pending.state_dict()["items"]]
        assert kept == [f"r{i}" for i in range(400, 500)]  # the newest kept
        d.start()
        again = [make_record(rng, i) for i in range(1000, 1010)] * 2  # ids repeat
        d.submit("predictions", "\n".join(map(json.dumps, again)).encode())
        assert d.drain() and len(d.pending) == 100
        c = d.counters
        assert c["labels"] == c["labels_joined"] + c["labels_unmatched"] + len(d.pending.early)
        assert_balanced(d)
    finally:
        d.stop()


def test_an_empty_rules_list_or_tail_path_in_the_config_is_refused(
        reference_path: str, tmp_path: Any) -> None:
    """``rules: []`` read as "no rules" and ran the whole serving pack (rule files refuse an
    empty rule list since the fifteenth round); ``tail: ''`` (an unset variable in a
    template) tailed nothing, without a word. Both are refused, saying what to write."""
    import pytest

    from lrwatch.errors import ConfigError

    for text, says in (("rules: []", "rules: the list is empty"),
                       ("tail: ''", "tail: '' names no file")):
        cfg = tmp_path / "lrwatch.yml"
        cfg.write_text(f"reference: {{path: {reference_path}}}\n{text}\n")
        with pytest.raises(ConfigError, match=says):
            DaemonConfig.load(str(cfg))
    cfg.write_text(f"reference: {{path: {reference_path}}}\nrules: null\ntail: []\n")
    assert DaemonConfig.load(str(cfg)).rules is None


def test_a_body_of_more_records_than_the_queue_holds_is_refused_before_checking_them(
        run_daemon: Any) -> None:
    """A body of more records than the queue holds was parsed and validated record by record
    before its 413 (and only when more than the queue's worth were valid: one of junk lines
    was a 400 after checking every line). Junk lines cost ~60 µs each on the HTTP loop, so
    one 10 MB body of them (5 million lines) held every client, ``/healthz`` included, for
    some five minutes. A body of more records (NDJSON lines, array elements) than
    ``max_queue_records`` is now refused whole before any is checked alone, as the 413 for
    too many valid records was, and counted as that many records; bodies within the bound
    still get their per-record answer."""
    r = run_daemon(max_queue_records=1000)
    junk = "\n".join(f"junk {i}" for i in range(1001))
    status, out = r.post("/v1/predictions", junk)
    assert status == 413 and out["reason"] == "too_large" and out["rejected"] == 1001, out
    assert "1001 records, over the queue's limit of 1000" in out["error"]
    status, out = r.post("/v1/predictions", "[" + ",".join(["{}"] * 1001) + "]")
    assert status == 413 and out["rejected"] == 1001, out
    status, out = r.post("/v1/labels", "\n".join(['{"id": "a"}'] * 1001))
    assert status == 413 and out["rejected"] == 1001, out
    # within the bound: each record answered, the good ones kept
    rng = random.Random(230)
    body = "\n".join([json.dumps(make_record(rng, i)) for i in range(500)] +
                     [f"junk {i}" for i in range(500)])
    status, out = r.post("/v1/predictions", body)
    assert status == 200 and out["accepted"] == 500 and out["reasons"] == {"invalid_json": 500}
    # a pretty-printed JSON array is one document, however many lines it spans
    status, out = r.post("/v1/predictions", json.dumps([make_record(rng, i) for i in
                                                        range(200)], indent=2))
    assert status == 200 and out["accepted"] == 200, out
    assert r.metric("lrwatch_ingest_errors_total", {"reason": "too_large"}) == 3003
    assert_balanced(r.daemon)


def test_the_bearer_scheme_is_read_without_regard_to_case(run_daemon: Any,
                                                         tmp_path: Any) -> None:
    """``Authorization: bearer TOKEN`` (and ``BEARER``, or two spaces after the scheme) got
    401 "missing or wrong bearer token" with the right token: the header was compared with
    ``Bearer TOKEN`` byte for byte, while HTTP's authentication scheme is case-insensitive
    (RFC 9110, 11.1). A Prometheus scrape config with ``authorization: {type: bearer}`` sends
    it so, and the daemon's target was down. The scheme is read case-insensitively now; the
    token still has to match exactly."""
    r = run_daemon(token="s3cret")
    for header, want in (("Bearer s3cret", 200), ("bearer s3cret", 200), ("BEARER s3cret", 200),
                         ("Bearer  s3cret", 200), ("Bearer S3cret", 401), ("Bearer s3cre", 401),
                         ("Basic s3cret", 401), ("s3cret", 401), ("Bearer", 401),
                         ("bearers3cret", 401)):
        assert r.get("/metrics", {"Authorization": header})[0] == want, header
    status, out = r.post("/v1/labels", {"id": "a", "label": 1},
                         {"Authorization": "bearer s3cret"})
    assert status == 200, out
    port = r.url.rsplit(":", 1)[1].split("/")[0]
    with PrometheusServer(extra_scrape_configs=[{
            "job_name": "lrwatch", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
            "authorization": {"type": "bearer", "credentials": "s3cret"}}],
            workdir=tmp_path / "prometheus") as prom:
        prom.wait_for('up{job="lrwatch"} == 1', timeout=60)
        assert prom.wait_for('lrwatch_labels_total{job="lrwatch"} == 1', timeout=30)


def test_another_method_is_refused_naming_what_the_endpoint_takes_as_its_allow_header(
        run_daemon: Any) -> None:
    """``OPTIONS /v1/predictions`` (a CORS preflight, say) got 405 with ``Allow: POST`` and
    the message "method OPTIONS not allowed; GET or POST": the body contradicted the header
    (a GET there is a 405 too). The message names what the endpoint takes, as the header."""
    import urllib.request

    r = run_daemon()
    for path, takes in (("/v1/predictions", "POST"), ("/v1/labels", "POST"),
                        ("/metrics", "GET or HEAD")):
        req = urllib.request.Request(r.url + path, method="OPTIONS")
        try:
            urllib.request.urlopen(req, timeout=10)
            raise AssertionError("OPTIONS accepted")
        except urllib.error.HTTPError as exc:
            assert exc.code == 405
            allow = exc.headers["Allow"]
            out = json.loads(exc.read())
        assert out["error"] == f"method OPTIONS not allowed: {path} takes {takes}", out
        assert allow == takes.replace(" or ", ", "), allow


def test_a_live_reference_of_a_million_records_or_more_is_refused(tmp_path: Any) -> None:
    """``reference: {live_records: 1e12}`` (a typo of 1e4) was accepted: every record is held
    in memory until the reference is built, and no window is tested before, so the daemon
    monitored nothing and grew until it was killed. More than 1,000,000 is refused now,
    saying to build a larger reference from a file."""
    import pytest

    from lrwatch.errors import ConfigError

    cfg = tmp_path / "lrwatch.yml"
    cfg.write_text("reference: {live_records: 1e12}\n")
    with pytest.raises(ConfigError, match="live_records must be at most 1,000,000 .*"
                                          "lrwatch baseline build"):
        DaemonConfig.load(str(cfg))
    out = _lrwatch("daemon", "--live-reference", "5000000", "--port", "0")
    assert out.returncode != 0 and "live_records must be at most 1,000,000" in out.stderr, \
        out.stderr[-2000:]
    assert DaemonConfig(live_records=1_000_000).live_records == 1_000_000
