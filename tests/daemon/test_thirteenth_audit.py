"""Defects found by the thirteenth round's audit of the daemon (docs/daemon.md, "Defects found
by the thirteenth round's audit"): each test failed before its fix."""

from __future__ import annotations

import json
import random
import time

import pytest

from daemon_helpers import (WINDOW, assert_balanced, binary_record, make_record,
                            saved_binary_reference)
from lrwatch.daemon import Daemon, DaemonConfig, build_reference
from services import wait_until


def _daemon(reference_path, state=None, **kw):
    return Daemon(DaemonConfig(reference=reference_path, window_size=WINDOW, port=0,
                               state_dir=None if state is None else str(state),
                               log_alerts=False, **kw))


def _submit(d, kind, recs):
    status, body = d.submit(kind, "\n".join(json.dumps(r) for r in recs).encode())
    assert status == 200, body
    return body


# --- labels that come before their predictions ----------------------------------------------
def test_labels_that_come_before_their_predictions_are_joined(run_daemon):
    """A label pipeline racing the prediction log: the labels came first and stayed unmatched
    forever (0 joined, every one counted unmatched at once)."""
    r = run_daemon()
    rng = random.Random(31)
    recs = [make_record(rng, k, time=1000.0 + k) for k in range(WINDOW)]
    labels = [{"id": rec["id"], "label": int(rec["prediction"] >= 0.5)} for rec in recs]
    assert r.post("/v1/labels", labels)[1]["accepted"] == WINDOW
    r.daemon.drain()
    assert r.metric("lrwatch_labels_unmatched_total") == 0
    assert json.loads(r.get("/v1/status")[1])["early_labels"] == WINDOW
    assert r.post("/v1/predictions", recs)[0] == 200  # closes the window with its labels
    assert r.metric("lrwatch_labels_joined_total") == WINDOW
    assert r.metric("lrwatch_model_accuracy") == 1.0
    assert r.metric("lrwatch_pending_labels") == 0
    c = r.daemon.counters
    assert c["labels_early"] == WINDOW and c["labels_early_joined"] == WINDOW
    assert len(r.daemon.pending.early) == 0
    assert_balanced(r.daemon)


def test_early_labels_are_bounded_and_expire_counted_as_unmatched(reference_path):
    d = _daemon(reference_path, max_early_labels=5, early_label_seconds=60.0)
    d.start()
    try:
        _submit(d, "labels", [{"id": f"u{k}", "label": 1} for k in range(8)])
        assert d.drain()
        assert len(d.pending.early) == 5   # the 3 oldest given up
        assert d.registry.get_sample_value("lrwatch_labels_unmatched_total") == 3
        d.tick(time.time() + 61.0)         # the clock passes their hold: given up, counted
        assert d.drain()
        assert len(d.pending.early) == 0
        assert d.registry.get_sample_value("lrwatch_labels_unmatched_total") == 8
        assert d.counters["labels_early_expired"] == 5
        # a prediction after that finds no label
        _submit(d, "predictions", [make_record(random.Random(1), 0, id="u7")])
        assert d.drain() and d.counters["labels_joined"] == 0 and len(d.pending) == 1
    finally:
        d.stop(timeout=2)


def test_early_labels_off_counts_them_unmatched_at_once(reference_path):
    d = _daemon(reference_path, early_label_seconds=0)
    d.start()
    try:
        _submit(d, "labels", [{"id": "u1", "label": 1}])
        assert d.drain()
        assert d.registry.get_sample_value("lrwatch_labels_unmatched_total") == 1
        assert len(d.pending.early) == 0
    finally:
        d.stop(timeout=2)


def test_early_labels_survive_a_restart(reference_path, tmp_path):
    rng = random.Random(32)
    recs = [make_record(rng, k) for k in range(10)]
    d = _daemon(reference_path, tmp_path)
    d.start()
    _submit(d, "labels", [{"id": rec["id"], "label": 1} for rec in recs])
    assert d.drain()
    d.stop(timeout=2)
    d = _daemon(reference_path, tmp_path)
    d.start()
    try:
        assert len(d.pending.early) == 10
        _submit(d, "predictions", recs)
        assert d.drain()
        assert d.counters["labels_joined"] == 10 and d.counters["labels_unmatched"] == 0
    finally:
        d.stop(timeout=2)


# --- cumulative counters across a restart ----------------------------------------------------
_binary = binary_record


@pytest.fixture(scope="module")
def binary_reference(tmp_path_factory):
    return saved_binary_reference(tmp_path_factory, 5, 2000, 200, "bref13")


def test_cumulative_counters_survive_a_restart(binary_reference, tmp_path):
    """lrwatch_estimation_windows_compared_total, lrwatch_firings_total and
    lrwatch_internal_errors_total started from 0 after a restart although the daemon keeps
    its state (and a rule still firing counted one more firing: a new edge that was none)."""
    rng = random.Random(33)
    d = _daemon(binary_reference, tmp_path)
    d.start()
    k = 0
    for _ in range(3):  # windows with 20% of their records rejected: ingest_errors fires
        recs = [_binary(rng, k + i) for i in range(WINDOW)]
        recs += [{"id": "bad", "features": "none", "prediction": 0.5}] * 25
        k += WINDOW
        _submit(d, "predictions", recs)
    _submit(d, "predictions", [_binary(rng, k + i) for i in range(WINDOW)])  # resolves it
    k += WINDOW
    d.metrics.internal_errors.inc(2)   # two failures absorbed (fail open)
    assert d.drain()
    m = d.registry.get_sample_value
    fired = {"rule": "ingest_errors", "severity": "warning"}
    assert m("lrwatch_firings_total", fired) == 1 and "ingest_errors" not in d.engine.active
    compared = m("lrwatch_estimation_windows_compared_total")
    assert compared == 4   # inline labels: every window compared at once
    d.stop(timeout=2)

    d = _daemon(binary_reference, tmp_path)
    d.start()
    try:
        m = d.registry.get_sample_value
        assert m("lrwatch_estimation_windows_compared_total") == compared
        assert m("lrwatch_firings_total", fired) == 1
        assert m("lrwatch_internal_errors_total") == 2
        _submit(d, "predictions", [_binary(rng, k + i) for i in range(WINDOW)])
        assert d.drain()
        assert m("lrwatch_estimation_windows_compared_total") == compared + 1
    finally:
        d.stop(timeout=2)
    d = _daemon(binary_reference, tmp_path)  # and again: nothing counted twice
    try:
        assert d.registry.get_sample_value("lrwatch_internal_errors_total") == 2
        assert d.registry.get_sample_value("lrwatch_estimation_windows_compared_total") \
            == compared + 1
    finally:
        d.stop(timeout=2)


def test_a_rule_firing_at_a_restart_is_no_new_firing(binary_reference, tmp_path):
    """The restart republished a firing rule through the rising-edge path: with the saved
    firings restored it counted 2 (before, the reset to 0 hid the extra one)."""
    rng = random.Random(34)
    d = _daemon(binary_reference, tmp_path)
    d.start()
    for j in range(3):
        recs = [_binary(rng, j * WINDOW + i) for i in range(WINDOW)]
        _submit(d, "predictions", recs + [{"id": "bad", "features": "none"}] * 25)
    assert d.drain() and "ingest_errors" in d.engine.active
    d.stop(timeout=2)
    d = _daemon(binary_reference, tmp_path)
    try:
        fired = {"rule": "ingest_errors", "severity": "warning"}
        assert d.registry.get_sample_value("lrwatch_firings_total", fired) == 1
        assert d.registry.get_sample_value("lrwatch_rule_firing", fired) == 1
    finally:
        d.stop(timeout=2)


# --- the joint test and a feature missing in the window --------------------------------------
def test_status_names_the_feature_left_out_of_the_joint_test(run_daemon):
    r = run_daemon()
    rng = random.Random(35)
    recs = [make_record(rng, k) for k in range(WINDOW)]
    for rec in recs:
        del rec["features"]["x"]   # its source is down
    assert r.post("/v1/predictions", recs)[0] == 200
    r.daemon.drain()
    status = json.loads(r.get("/v1/status")[1])
    assert "x" in status["last_window"]["drifted_features"]
    assert status["last_window"]["joint_excluded"] == ["x"]
    assert status["last_window"]["joint_features"] == []


# --- the audit of the ingest path --------------------------------------------------------------
def test_an_input_feature_named_like_the_prediction_is_left_out_with_a_note(run_daemon,
                                                                           tmp_path):
    """A feature named ``_prediction`` (an upstream model's score logged as a feature) was
    profiled beside the prediction under the same name: the reference listed
    ``_prediction`` twice, and its drift, metrics and joint model mixed the two."""
    rng = random.Random(36)
    rows = [make_record(rng, i) for i in range(600)]
    for row in rows:
        row["features"]["_prediction"] = rng.gauss(5.0, 1.0)
    ref = build_reference(rows, window_size=WINDOW, sims=150, seed=0)
    assert ref.names.count("_prediction") == 1
    assert any("'_prediction'" in note and "rename" in note for note in ref.notes)
    path = str(tmp_path / "reference.json")
    ref.save(path)
    r = run_daemon(reference=path)
    assert r.post("/v1/predictions", rows[:WINDOW])[0] == 200
    assert r.metric("lrwatch_windows_total") == 1
    assert r.daemon.last["features"]["_prediction"]["drifted"] is False


def _quoted_record(rng, i):
    """A record whose feature names hold a quote, a backslash and non-ASCII letters."""
    return {"id": f"q{i}", "features": {'size "cm"': rng.gauss(0, 1), "path\\dir": rng.gauss(0, 1),
                                        "température": rng.choice(["东京", "大阪"])},
            "prediction": rng.random()}


def test_feature_names_with_a_quote_or_a_backslash_are_ingested(run_daemon, tmp_path):
    """A reference feature named with a ``"`` or a ``\\`` (legal JSON keys) made the chunk
    decoder's set-up raise (msgspec refuses such renamed fields): every NDJSON body failed
    with a 500 and was counted nowhere, and a tailed file's chunks were lost to an internal
    error on the worker."""
    rng = random.Random(37)
    ref = build_reference([_quoted_record(rng, i) for i in range(600)], window_size=WINDOW,
                          sims=150, seed=0)
    assert {'size "cm"', "path\\dir", "température"} <= set(ref.names)
    path = str(tmp_path / "reference.json")
    ref.save(path)
    recs = [_quoted_record(rng, i) for i in range(WINDOW)]
    tail = tmp_path / "predictions.jsonl"
    tail.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs),
                    encoding="utf-8")
    r = run_daemon(reference=path)
    body = "\n".join(json.dumps(x, ensure_ascii=False) for x in recs)
    status, out = r.post("/v1/predictions", body)
    assert status == 200 and out["accepted"] == WINDOW
    assert r.metric("lrwatch_windows_total") == 1
    assert r.metric("lrwatch_internal_errors_total") == 0
    # the same lines from a tailed file
    from lrwatch.daemon.sources import FileTailer

    t = FileTailer(r.daemon, str(tail), 0.05)
    r.daemon.tailers.append(t)
    t.start()
    assert wait_until(lambda: r.daemon.counters["predictions"] >= 2 * WINDOW, timeout=30)
    assert r.metric("lrwatch_predictions_total") == 2 * WINDOW
    assert r.metric("lrwatch_windows_total") == 2
    assert r.metric("lrwatch_internal_errors_total") == 0
    assert_balanced(r.daemon)
