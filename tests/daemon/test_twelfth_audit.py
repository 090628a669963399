"""Defects found by the twelfth round's audit (6 December), each reproduced on real daemons:
a reference rebuilt between two runs of a daemon with a state directory, the estimated
accuracy drop of windows with a handful of records, and the joint test of one numeric
feature with a categorical one."""

from __future__ import annotations

import json
import math
import random
import time
from typing import Any

import pytest

from daemon_helpers import (WINDOW, assert_balanced, binary_record, make_record,
                            saved_binary_reference)
from lrwatch.daemon import Daemon, DaemonConfig, build_reference
from lrwatch.daemon.estimation import PerformanceEstimator


def _daemon(reference: str, **kw: Any) -> Daemon:
    kw.setdefault("window_size", WINDOW)
    return Daemon(DaemonConfig(reference=reference, port=0, log_alerts=False, **kw))


def _post(d: Daemon, recs: list[dict[str, Any]]) -> dict[str, Any]:
    status, body = d.submit("predictions", "\n".join(json.dumps(r) for r in recs).encode())
    assert status == 200, body
    return body


# --- a reference rebuilt between two runs ---------------------------------------------------
@pytest.fixture(scope="module")
def wider_reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The conftest reference's stream with one more numeric feature, ``z``."""
    rng = random.Random(21)
    rows = [make_record(rng, i) for i in range(3000)]
    for r in rows:
        r["features"]["z"] = rng.gauss(0.0, 1.0)
    path = str(tmp_path_factory.mktemp("wref") / "reference.json")
    build_reference(rows, window_size=WINDOW, sims=300, seed=0).save(path)
    return path


@pytest.fixture(scope="module")
def rebuilt_reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The conftest reference's features, built again from other records."""
    rng = random.Random(22)
    path = str(tmp_path_factory.mktemp("rref") / "reference.json")
    build_reference([make_record(rng, i) for i in range(3000)], window_size=WINDOW, sims=300,
                    seed=0).save(path)
    return path


def _run_then_stop(reference: str, state: str, n: int) -> None:
    rng = random.Random(23)
    d = _daemon(reference, state_dir=state)
    d.start()
    _post(d, [make_record(rng, i) for i in range(n)])
    assert d.drain()
    d.stop()


def test_a_reference_rebuilt_with_another_feature_keeps_the_accepted_records(
        reference_path: str, wider_reference: str, tmp_path: Any) -> None:
    state = str(tmp_path / "state")
    _run_then_stop(reference_path, state, 3 * WINDOW + 50)
    # the same state directory with the rebuilt reference: it used to refuse to start
    # ("saved sequential state does not match the reference"), so the only way on was to
    # move the state away, with the open window, the pending labels and the counters
    d = _daemon(wider_reference, state_dir=state)
    d.start()
    try:
        assert d.counters["predictions"] == 3 * WINDOW + 50
        assert len(d.window) == 50 and len(d.pending) == 3 * WINDOW + 50
        assert d.detector is not None and d.detector.state_dict()["history"] == []
        rng = random.Random(24)
        recs = [make_record(rng, i) for i in range(1000, 1000 + WINDOW)]
        for r in recs:
            r["features"]["z"] = rng.gauss(0.0, 1.0)
        _post(d, recs)
        assert d.drain() and d.counters["windows"] == 4
        assert_balanced(d)
    finally:
        d.stop()


def test_a_reference_rebuilt_with_the_same_features_starts_its_evidence_afresh(
        reference_path: str, rebuilt_reference: str, tmp_path: Any) -> None:
    state = str(tmp_path / "state")
    _run_then_stop(reference_path, state, 3 * WINDOW + 50)
    same = _daemon(reference_path, state_dir=state)  # the same reference: evidence kept
    assert len(same.detector.state_dict()["history"]) == 3
    same.stop()
    # windows tested against another reference are no evidence against this one (a drift
    # that the rebuilt reference now holds kept firing the sequential scan)
    d = _daemon(rebuilt_reference, state_dir=state)
    assert d.detector.state_dict()["history"] == []
    assert len(d.window) == 50
    d.stop()


# --- the estimated drop of small windows ------------------------------------------------------
_binary = binary_record


@pytest.fixture(scope="module")
def binary_reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    return saved_binary_reference(tmp_path_factory, 3, 3000, 300, "bref")


def test_one_record_windows_do_not_fire_the_estimated_drop_rule(binary_reference: str) -> None:
    """Unshifted traffic, one record per 10 s time window (a quiet night): the window's own
    spread of estimated correctness is 0 for one record, so its drop read 35-100 standard
    errors and the serving pack's ``estimated_accuracy_drop`` fired and resolved again and
    again."""
    d = _daemon(binary_reference, window_seconds=10.0)
    d.start()
    try:
        rng = random.Random(30)
        t0 = time.time() - 1000.0
        for i in range(60):
            _post(d, [_binary(rng, i, t=t0 + 10.0 * i, label=False)])
        assert d.drain()
        assert d.counters["windows"] == 59
        fired = d.registry.get_sample_value(
            "lrwatch_firings_total", {"rule": "estimated_accuracy_drop", "severity": "warning"})
        assert not fired, fired
        assert abs(d.last["values"]["estimated_accuracy_drop_z"]) < 10.0
    finally:
        d.stop()


def test_the_drop_of_a_small_window_is_in_the_null_standard_error() -> None:
    rng = random.Random(31)
    import numpy as np

    p = np.array([_binary(rng, i)["prediction"] for i in range(3000)])
    y = (np.random.default_rng(0).random(3000) < p).astype(int)
    est = PerformanceEstimator.fit(p, y)
    # a few rows cannot measure their own spread (one row's is 0): the reference's, the
    # spread of an unshifted window, stands in for it
    for window in ([0.51], [0.99], [0.6, 0.6], [0.7] * 5, list(np.linspace(0.2, 0.8, 29))):
        r = est.estimate(window)
        n = len(window)
        se = est.baseline_sd * math.sqrt(1.0 / n + 1.0 / est.reference_rows)
        assert r["drop_z"] == pytest.approx(r["accuracy_drop"] / se, rel=1e-6), window
    # large windows measure their own spread, pooled with the reference's (the seventeenth
    # round: docs/performance-estimation.md, "The band and the drop statistic")
    big = np.random.default_rng(1).random(500)
    r = est.estimate(big)
    c = est.correctness(big)
    m = est.reference_rows
    s2 = (500 * c.var() + m * est.baseline_sd ** 2) / (500 + m)
    se = math.sqrt(s2 / 500 + s2 / m + 1e-12)
    assert r["drop_z"] == pytest.approx(r["accuracy_drop"] / se)


# --- the joint test of one numeric feature and a category -------------------------------------
def _numeric_and_category(rng: random.Random, shuffle: bool = False) -> dict[str, Any]:
    x = rng.gauss(0.0, 1.0)
    driver = rng.gauss(0.0, 1.0) if shuffle else x
    c = "a" if driver + 0.3 * rng.gauss(0.0, 1.0) > 0 else "b"
    return {"features": {"x": x, "c": c}, "prediction": rng.random()}


def test_a_joint_test_of_one_numeric_feature_and_a_category_is_reported(tmp_path: Any) -> None:
    """The joint test runs with one numeric input and a categorical one (their relation is
    modelled through the category's indicator): its decision set ``drift_detected`` while
    ``multivariate_drift``, the ``lrwatch_multivariate_drift_*`` metrics and ``/v1/status``
    said it was not there, so a data_drift alert named no feature and nothing said why."""
    rng = random.Random(5)
    ref = build_reference([_numeric_and_category(rng) for _ in range(4000)], window_size=200,
                          sims=300)
    assert ref.calibration["joint_features"] == ["x", "c=b"]
    path = str(tmp_path / "reference.json")
    ref.save(path)
    d = _daemon(path, window_size=200)
    d.start()
    try:
        _post(d, [_numeric_and_category(rng, shuffle=True) for _ in range(400)])
        assert d.drain()
        vals = d.last["values"]
        assert vals["drift_detected"] == 1.0 and d.last["drifted_features"] == []
        assert vals["multivariate_drift"] == 1.0
        assert d.registry.get_sample_value("lrwatch_multivariate_drift_detected") == 1.0
        assert d.registry.get_sample_value("lrwatch_multivariate_drift_score") >= 1.0
        status = d.status()["multivariate_drift"]
        assert status == {"enabled": True, "detected": 1.0, "score": vals[
            "multivariate_drift_score"]}
    finally:
        d.stop()


# --- labels of windows that wait for a live reference's calibration -----------------------------
def test_labels_of_windows_closed_while_the_live_reference_calibrates_meet_their_estimate(
        tmp_path: Any) -> None:
    """A live reference is calibrated off the worker; the windows that close meanwhile wait
    and are estimated afterwards. Labels that came for them while they waited were joined
    (counted, scored in the open window) but lost for their window's estimate, so with labels
    quicker than the calibration no window of that time was ever compared."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1)
    gate = threading.Event()
    pool.submit(gate.wait, 120)  # the calibration queues behind this
    d = Daemon(DaemonConfig(live_records=600, window_size=WINDOW, port=0,
                            calibration_sims=300, log_alerts=False), executor=pool)
    d.start()
    try:
        rng = random.Random(40)
        _post(d, [_binary(rng, i) for i in range(600)])  # the reference, labelled inline
        live = [_binary(rng, 1000 + i, label=False) for i in range(3 * WINDOW + 10)]
        _post(d, live)
        deadline = time.monotonic() + 30
        while len(d._waiting) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert d.status()["calibrating"] and len(d._waiting) == 3
        x = {r["id"]: r["features"]["x"] for r in live}
        labels = [{"id": r["id"], "label": int(rng.random() < 1 / (1 + math.exp(-2 * x[r["id"]])))}
                  for r in live[:WINDOW]]  # every label of the first waiting window
        status, body = d.submit("labels", json.dumps(labels).encode())
        assert status == 200 and body["accepted"] == WINDOW
        deadline = time.monotonic() + 30
        while d.counters["labels"] < WINDOW and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()
        assert d.drain(timeout=120)
        assert d.reference is not None and d.estimates is not None
        assert d.counters["windows"] == 3 and d.counters["labels_joined"] == WINDOW
        assert d.registry.get_sample_value("lrwatch_estimation_windows_compared_total") == 1
        assert not math.isnan(d.registry.get_sample_value("lrwatch_estimation_error"))
    finally:
        gate.set()
        d.stop()
        pool.shutdown()


# --- booleans in a CSV reference ----------------------------------------------------------------
def test_a_csv_reference_reads_true_and_false_as_the_booleans_json_sends(tmp_path: Any) -> None:
    """pandas' ``to_csv`` and Python's ``csv`` write a boolean column as ``True``/``False``.
    Those cells stayed text, the categories ``"True"``/``"False"``, while live JSON sends the
    booleans ``true``/``false`` (the categories ``"1"``/``"0"``): every live window had the
    feature's values all unseen and the feature drifted at once; a label column of booleans
    fitted no estimator."""
    import csv

    from lrwatch.daemon.reference import read_data

    rng = random.Random(50)
    path = tmp_path / "reference.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["x", "flag", "prediction", "label"])
        for i in range(2000):
            x = rng.gauss(0.0, 1.0)
            p = 1.0 / (1.0 + math.exp(-2.0 * x))
            w.writerow([x, rng.random() < 0.3 if i % 3 else str(rng.random() < 0.3).lower(),
                        round(p, 6), rng.random() < p])
    rows = read_data(str(path))
    ref = build_reference(rows, window_size=WINDOW, sims=300)
    flag = next(f for f in ref.features if f.name == "flag")
    assert set(flag.categories) == {"0", "1"}
    assert ref.prediction_type == "probability" and ref.estimator is not None, ref.notes
    saved = str(tmp_path / "reference.json")
    ref.save(saved)
    d = _daemon(saved)
    d.start()
    try:
        live = []
        for i in range(2 * WINDOW):
            x = rng.gauss(0.0, 1.0)
            live.append({"id": f"l{i}", "features": {"x": x, "flag": rng.random() < 0.3},
                         "prediction": 1.0 / (1.0 + math.exp(-2.0 * x))})
        _post(d, live)
        assert d.drain() and d.counters["windows"] == 2
        assert d.last["values"]["unseen_category_ratio"] == 0.0
        assert "flag" not in d.last["drifted_features"]
    finally:
        d.stop()


# --- the last window's gauges before any window measured them -----------------------------------
def _scrape(d: Daemon) -> dict[str, float]:
    from prometheus_client import generate_latest

    out = {}
    for line in generate_latest(d.registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_a_fresh_daemon_exports_no_made_up_accuracy_that_fires_the_regression_alert(
        binary_reference: str, tmp_path: Any) -> None:
    """A daemon without a state directory (or its first start) exported
    ``lrwatch_model_accuracy 0`` (and an estimated accuracy, prediction mean and quantiles
    of 0) until a window measured them: after a restart with labels an hour late, the
    accuracy read 0 for that hour and ``LrwatchModelAccuracyRegression`` (its 30-minute
    average against the best of the day) fired on a model that had not changed."""
    import os
    import subprocess

    from services import find_binary

    d = _daemon(binary_reference)
    d.start()
    try:
        rng = random.Random(60)
        _post(d, [_binary(rng, i, label=False) for i in range(WINDOW // 2)])
        assert d.drain() and d.counters["windows"] == 0
        before = _scrape(d)
        _post(d, [_binary(rng, i, label=False) for i in range(WINDOW // 2, WINDOW + WINDOW // 2)])
        assert d.drain() and d.counters["windows"] == 1
        after = _scrape(d)
    finally:
        d.stop()
    for name in ("lrwatch_model_accuracy", "lrwatch_model_error", "lrwatch_prediction_mean",
                 'lrwatch_prediction_quantile{q="0.5"}', 'lrwatch_prediction_class_ratio{class="1"}',
                 "lrwatch_estimated_accuracy", 'lrwatch_estimated_metric{metric="accuracy"}',
                 "lrwatch_estimated_accuracy_drop", "lrwatch_estimated_accuracy_drop_zscore"):
        assert math.isnan(before[name]), (name, before[name])
    # a window without labels measures the outputs but no accuracy
    assert math.isnan(after["lrwatch_model_accuracy"])
    assert 0.0 < after["lrwatch_prediction_mean"] < 1.0
    assert 0.5 < after["lrwatch_estimated_accuracy"] < 1.0
    # what Prometheus makes of it: an hour at 0.9 before the restart, then what it exports
    value = after["lrwatch_model_accuracy"]
    rules = os.path.join(os.path.dirname(__file__), "..", "..", "rules",
                         "lrwatch-serving.rules.yml")
    series = 'lrwatch_model_accuracy{job="lrwatch-daemon",instance="serve0:9410"}'
    test = tmp_path / "restart.test.yml"
    test.write_text(json.dumps({
        "rule_files": [os.path.abspath(rules)], "evaluation_interval": "1m",
        "tests": [{"interval": "1m",
                   "input_series": [{"series": series, "values": " ".join(
                       ["0.9"] * 60 + ["NaN" if math.isnan(value) else repr(value)] * 60)}],
                   "alert_rule_test": [{"eval_time": "110m",
                                        "alertname": "LrwatchModelAccuracyRegression",
                                        "exp_alerts": []}]}]}))
    proc = subprocess.run([find_binary("promtool"), "test", "rules", str(test)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- a binary model's probability as a list of one ----------------------------------------------
def _sigmoid_list(rng: random.Random, i: int, label: bool = True) -> dict[str, Any]:
    """What a Keras/TensorFlow binary classifier (one sigmoid output) sends:
    ``model.predict(x)[i].tolist()`` is ``[p]``."""
    r = _binary(rng, i, label=label)
    r["prediction"] = [r["prediction"]]
    return r


@pytest.mark.parametrize("live", [False, True])
def test_a_list_of_one_probability_is_a_binary_models_class_1_probability(
        tmp_path: Any, live: bool) -> None:
    """``[p]`` made a reference of 'probabilities' of one class: the estimator read it as a
    binary model's p (and was fitted with labels 0 and 1), but the daemon read every record as
    class 0 (the arg max of one), so the prediction's drift and class shares saw a constant
    and every live label 1 was refused (``invalid_label``, "send a class index 0..0")."""
    rng = random.Random(70)
    ref_rows = [_sigmoid_list(rng, i) for i in range(2000)]
    if live:
        d = _daemon(None, live_records=2000, calibration_sims=300)
    else:
        ref = build_reference(ref_rows, window_size=WINDOW, sims=300)
        assert ref.prediction_type == "probability" and ref.proba_width is None
        assert ref.estimator is not None, ref.notes
        path = str(tmp_path / "reference.json")
        ref.save(path)
        d = _daemon(path)
    d.start()
    try:
        if live:
            _post(d, ref_rows)
            assert d.drain()
            assert d.reference.prediction_type == "probability", d.reference.prediction_type
        stream = [_sigmoid_list(rng, 5000 + i, label=False) for i in range(2 * WINDOW)]
        stream[3]["prediction"] = stream[3]["prediction"][0]  # a client sending p: the same
        _post(d, stream)
        labels = [{"id": r["id"], "label": int(rng.random() < (
            r["prediction"][0] if type(r["prediction"]) is list else r["prediction"]))}
            for r in stream]
        status, body = d.submit("labels", json.dumps(labels).encode())
        assert status == 200 and body["accepted"] == 2 * WINDOW, body
        assert d.drain() and d.counters["labels_joined"] == 2 * WINDOW
        _post(d, [_sigmoid_list(rng, 9000 + i, label=False) for i in range(WINDOW)])
        assert d.drain()
        vals = d.last["values"]
        assert 0.6 < vals["model_accuracy"] < 0.95
        assert 0.2 < vals["prediction_mean"] < 0.8
        assert 0.6 < vals["estimated_accuracy"] < 0.95
        share = d.registry.get_sample_value("lrwatch_prediction_class_ratio", {"class": "1"})
        assert 0.2 < share < 0.8
        assert_balanced(d)
    finally:
        d.stop()
