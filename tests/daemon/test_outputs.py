"""The model's outputs: prediction distribution, label coverage over a horizon, pending labels
read at scrape time, class probabilities as ``{"proba": [...]}``, and label-free estimates
with their error once the labels come."""

from __future__ import annotations

import json
import math
import random
import time
from typing import Any

import numpy as np
import pytest

from daemon_helpers import WINDOW, assert_balanced, binary_record
from lrwatch.daemon import Reference, build_reference
from lrwatch.daemon.coverage import LabelCoverage
from lrwatch.daemon.records import Limits, parse_payload, validate_predictions

T0 = 1_760_000_000.0


_binary = binary_record


def _multiclass(rng: random.Random, i: int, k: int = 3) -> dict[str, Any]:
    x = rng.gauss(0, 1)
    logits = [x * (j - 1) * 1.5 for j in range(k)]
    z = [math.exp(v) for v in logits]
    p = [round(v / sum(z), 6) for v in z]
    label = rng.choices(range(k), weights=p)[0]
    return {"id": f"m{i}", "features": {"x": x, "y": rng.gauss(0, 1)},
            "prediction": {"proba": p}, "label": label}


@pytest.fixture(scope="module")
def binary_reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    rng = random.Random(3)
    ref = build_reference([_binary(rng, i) for i in range(3000)], window_size=WINDOW, sims=300)
    assert ref.estimator is not None and not ref.notes
    path = str(tmp_path_factory.mktemp("bref") / "reference.json")
    ref.save(path)
    return path


@pytest.fixture(scope="module")
def multiclass_reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    rng = random.Random(4)
    rows = [_multiclass(rng, i) for i in range(3000)]  # {"proba": [...]}, as sent
    ref = build_reference(rows, window_size=WINDOW, sims=300)
    assert ref.proba_width == 3 and ref.estimator is not None
    path = str(tmp_path_factory.mktemp("mref") / "reference.json")
    ref.save(path)
    return path


def _ndjson(recs: list[dict[str, Any]]) -> bytes:
    return "\n".join(json.dumps(r) for r in recs).encode()


# --- prediction distribution ------------------------------------------------------------------
def test_class_shares_fold_unknown_classes_into_other(run_daemon) -> None:
    rng = random.Random(0)
    ref = build_reference([{"features": {"x": rng.gauss(0, 1)}, "prediction": "ab"[i % 4 == 0]}
                           for i in range(1000)], window_size=WINDOW, sims=300)
    r = run_daemon(reference=None, state_dir=None, live_records=10)
    r.daemon._set_reference(ref, save=False)
    preds = ["a"] * 50 + ["b"] * 30 + ["zz"] * 20
    recs = [{"features": {"x": rng.gauss(0, 1)}, "prediction": p} for p in preds]
    assert r.post("/v1/predictions", recs)[1]["accepted"] == WINDOW
    share = {c: r.metric("lrwatch_prediction_class_ratio", {"class": c})
             for c in ("a", "b", "other")}
    assert share == pytest.approx({"a": 0.5, "b": 0.3, "other": 0.2})
    assert r.metric("lrwatch_prediction_class_reference_ratio", {"class": "a"}) == \
        pytest.approx(0.75)
    assert r.metric("lrwatch_prediction_class_ratio", {"class": "zz"}) is None  # bounded
    assert r.metric("lrwatch_prediction_mean") is None  # not a numeric output


def test_a_class_named_other_shares_the_other_series() -> None:
    """A model with a class called "other" (spam / ham / other): its series and the bucket
    of classes beyond the reference's had the same label, so the reference share of the
    real class was overwritten by the bucket's (0.0 against a live 0.3), and the window's
    share of unseen classes was dropped. Now "other" is both, in the reference and live."""
    from lrwatch.daemon.distribution import PredictionDistribution
    from lrwatch.daemon.stats import Profile

    preds = ["spam"] * 30 + ["ham"] * 40 + ["other"] * 30
    ref = build_reference([{"features": {"x": float(i)}, "prediction": p}
                           for i, p in enumerate(preds * 10)], calibrate=False)
    prof = Profile(ref)
    dist = PredictionDistribution(prof)
    assert dist.classes == ["ham", "spam", "other"]
    assert dist.reference_ratio == pytest.approx([0.4, 0.3, 0.3])
    live = ["spam"] * 20 + ["ham"] * 40 + ["other"] * 30 + ["eggs"] * 10
    codes = prof.encode(prof.cat_names.index("_prediction"), live)
    share = dist.window(None, [codes])["class_ratio"]
    assert share.tolist() == pytest.approx([0.4, 0.2, 0.4])


def test_probability_outputs_have_mean_quantiles_and_class_shares(run_daemon,
                                                                 binary_reference) -> None:
    r = run_daemon(reference=binary_reference)
    rng = random.Random(1)
    recs = [_binary(rng, i, label=False) for i in range(WINDOW)]
    assert r.post("/v1/predictions", _ndjson(recs))[1]["accepted"] == WINDOW
    p = np.array([x["prediction"] for x in recs])
    assert r.metric("lrwatch_prediction_mean") == pytest.approx(p.mean())
    assert r.metric("lrwatch_prediction_quantile", {"q": "0.5"}) == \
        pytest.approx(np.quantile(p, 0.5))
    assert r.metric("lrwatch_prediction_class_ratio", {"class": "1"}) == \
        pytest.approx((p >= 0.5).mean())
    assert r.daemon.last["values"]["prediction_mean"] == pytest.approx(p.mean())


# --- label coverage over a horizon --------------------------------------------------------------
def test_label_coverage_horizon_counts_labels_by_prediction_time() -> None:
    c = LabelCoverage(horizon=100.0)
    c.add_predictions(np.arange(0.0, 100.0))  # one a second for 100 s
    for t in range(0, 100, 4):  # a quarter of them get a label later
        c.add_label(float(t))
    assert c.ratio() is None  # now = 99: nothing is 100 s old yet
    c.add_count(200.0, 10)  # now = 200: [0, 100) is read
    assert c.ratio() == pytest.approx(0.25, abs=0.02)
    c.add_count(1000.0, 1)  # all of it is older than 2H: forgotten
    assert c.ratio() is None and len(c.state_dict()["buckets"]) <= 3
    c.add_count(9e18, 1)  # a wrong client clock cannot move the stream clock past tomorrow
    assert c.now < 2e9


def test_delayed_labels_read_zero_per_window_but_not_over_the_horizon(run_daemon,
                                                                      binary_reference) -> None:
    r = run_daemon(reference=binary_reference, label_horizon_seconds=100.0)
    rng = random.Random(2)
    # 3 windows, one record a second; then labels for half of the second window's records
    recs = [_binary(rng, i, label=False, t=T0 + i) for i in range(3 * WINDOW)]
    assert r.post("/v1/predictions", _ndjson(recs))[1]["accepted"] == 3 * WINDOW
    labels = [{"id": x["id"], "label": 1} for x in recs[WINDOW:2 * WINDOW:2]]
    assert r.post("/v1/labels", labels)[1]["accepted"] == WINDOW // 2
    r.daemon.drain()
    assert r.metric("lrwatch_label_horizon_seconds") == 100.0
    # no window had labels while it was open ...
    assert r.daemon.last["values"]["label_coverage"] == 0.0
    # ... but half of the predictions made 200-100 s before the newest one have a label
    # (the clock tick refreshes the gauge between windows)
    deadline = time.monotonic() + 5
    while r.metric("lrwatch_label_coverage_horizon_ratio") == 0.0 and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.metric("lrwatch_label_coverage_horizon_ratio") == pytest.approx(0.5, abs=0.04)
    # one more window carries the value to the rules
    more = [_binary(rng, i, label=False, t=T0 + i) for i in range(3 * WINDOW, 4 * WINDOW)]
    r.post("/v1/predictions", _ndjson(more))
    r.daemon.drain()
    assert r.daemon.last["values"]["label_coverage_horizon"] == pytest.approx(
        r.metric("lrwatch_label_coverage_horizon_ratio"))
    assert_balanced(r.daemon)


def test_pending_labels_follow_every_prediction_and_label(run_daemon, binary_reference) -> None:
    r = run_daemon(reference=binary_reference)
    rng = random.Random(5)
    recs = [_binary(rng, i, label=False) for i in range(10)]  # no window closes
    r.post("/v1/predictions", _ndjson(recs))
    assert r.metric("lrwatch_pending_labels") == 10
    r.post("/v1/labels", [{"id": "b0", "label": 1}, {"id": "b1", "label": 0}])
    assert r.metric("lrwatch_pending_labels") == 8
    assert r.daemon.counters["windows"] == 0


# --- class probabilities ------------------------------------------------------------------------
def test_proba_objects_match_lists_on_the_batch_and_the_record_path() -> None:
    lists = [{"features": {"x": i}, "prediction": [0.1 * (i % 10), 1 - 0.1 * (i % 10)]}
             for i in range(20)]
    objects = [{"features": r["features"], "prediction": {"proba": r["prediction"]}}
               for r in lists]
    for limits in (Limits(), Limits(proba_width=2)):
        a, rej_a, _ = validate_predictions(json.loads(json.dumps(lists)), limits)
        b, rej_b, _ = validate_predictions(json.loads(json.dumps(objects)), limits)
        mixed = json.loads(json.dumps(objects[:10] + lists[10:] + [{"features": {},
                                                                     "prediction": 3}]))
        c, rej_c, _ = validate_predictions(mixed, limits)  # the per-record path
        assert not rej_a and not rej_b
        # a number is a prediction, unless the reference's are lists of class probabilities
        assert rej_c == ({"invalid_prediction": 1} if limits.proba_width else {})
        assert a.preds == b.preds == c.preds[:20] == [r["prediction"] for r in lists]


@pytest.mark.parametrize("pred, why", [
    ({"proba": [0.2, float("nan")]}, "finite"),
    ({"proba": [1.5, -0.5]}, "[0, 1]"),
    ({"proba": [0.2, 0.3, 0.5]}, "3 class probabilities"),
    ({"proba": [0.5] * 10_001}, "at most"),
    ({"proba": [0.5, 0.5], "model": "v2"}, "nothing else"),
    ({"proba": "0.5"}, "list"),
    ([True, False], "[0, 1]"),
    ([], "non-empty"),
])
def test_hostile_probabilities_are_rejected_with_a_reason(pred, why) -> None:
    good = {"features": {"x": 1}, "prediction": {"proba": [0.4, 0.6]}}
    body = json.dumps([good, {"features": {"x": 2}, "prediction": pred}, good]).encode()
    ok, rej, errors = validate_predictions(parse_payload(body), Limits(proba_width=2))
    assert len(ok) == 2 and dict(rej) == {"invalid_prediction": 1}
    assert why in errors[0], errors


def test_multiclass_width_is_checked_once_the_reference_is_known(run_daemon,
                                                                 multiclass_reference) -> None:
    r = run_daemon(reference=multiclass_reference)
    assert r.daemon.limits.proba_width == 3 and r.daemon.ingest.limits.proba_width == 3
    rng = random.Random(6)
    recs = [_multiclass(rng, i) for i in range(WINDOW)]
    for x in recs:
        x.pop("label")
    recs[5]["prediction"] = {"proba": [0.5, 0.5]}
    status, body = r.post("/v1/predictions", _ndjson(recs))
    assert status == 200 and body["reasons"] == {"invalid_prediction": 1}
    assert "the reference's model has 3 classes" in body["errors"][0]
    assert_balanced(r.daemon)


# --- estimation ---------------------------------------------------------------------------------
def test_reference_without_labels_says_why_and_old_references_load(tmp_path) -> None:
    rng = random.Random(7)
    rows = [_binary(rng, i, label=False) for i in range(200)]
    ref = build_reference(rows, calibrate=False)
    assert ref.estimator is None and "no labels" in ref.notes[0]
    d = ref.to_dict()
    assert "estimator" not in d and "proba_width" not in d  # old readers see the old format
    path = tmp_path / "old.json"
    path.write_text(json.dumps(d))
    assert Reference.load(path).estimator is None


def test_estimates_before_labels_and_their_error_after(run_daemon, binary_reference) -> None:
    r = run_daemon(reference=binary_reference)
    rng = random.Random(8)
    recs = [_binary(rng, i) for i in range(3 * WINDOW)]
    labels = [{"id": x.pop("id"), "label": x.pop("label")} for x in recs]
    for x, lab in zip(recs, labels):
        x["id"] = lab["id"]
    assert r.post("/v1/predictions", _ndjson(recs))[1]["accepted"] == 3 * WINDOW
    est = r.metric("lrwatch_estimated_accuracy")
    assert est is not None and 0.6 < est < 0.9
    low = r.metric("lrwatch_estimated_metric", {"metric": "accuracy_low"})
    high = r.metric("lrwatch_estimated_metric", {"metric": "accuracy_high"})
    assert low < est < high
    assert r.metric("lrwatch_estimated_metric", {"metric": "roc_auc"}) > 0.5
    vals = r.daemon.last["values"]
    assert {"estimated_accuracy", "estimated_accuracy_drop_z", "estimated_f1"} <= set(vals)
    assert math.isnan(r.metric("lrwatch_estimation_error"))  # no label yet
    # the labels of the first window come: its estimate is compared with them
    r.post("/v1/labels", labels[:WINDOW])
    err = r.metric("lrwatch_estimation_error")
    assert r.metric("lrwatch_estimation_windows_compared_total") == 1
    realised = np.mean([(recs[i]["prediction"] >= 0.5) == labels[i]["label"]
                        for i in range(WINDOW)])
    window0 = err + realised
    assert 0.6 < window0 < 0.9 and abs(err) < 0.15
    code, body = r.get("/v1/status")
    status = json.loads(body)
    assert code == 200 and status["estimation"]["classes"] == 2
    assert status["estimation"]["last_window"]["estimated_accuracy"] == pytest.approx(est)
    assert status["label_coverage_horizon"]["horizon_seconds"] == 3600.0
    assert set(status["multivariate_drift"]) == {"enabled", "detected", "score"}
    assert_balanced(r.daemon)


def test_multiclass_estimates_and_a_live_reference_with_inline_labels(run_daemon) -> None:
    rng = random.Random(9)
    r = run_daemon(reference=None, live_records=1000)
    recs = [_multiclass(rng, i) for i in range(1000 + 2 * WINDOW)]
    assert r.post("/v1/predictions", _ndjson(recs))[1]["accepted"] == len(recs)
    r.daemon.drain()
    ref = r.daemon.reference
    assert ref is not None and ref.proba_width == 3 and ref.estimator is not None
    assert r.metric("lrwatch_estimated_accuracy") is not None
    assert r.metric("lrwatch_estimated_metric", {"metric": "f1"}) is None  # binary only
    # inline labels: every record of a window has its own, so each is compared at once
    assert r.metric("lrwatch_estimation_windows_compared_total") == 2


@pytest.mark.parametrize("which", ["binary_reference", "multiclass_reference"])
def test_metrics_with_every_new_family_are_promtool_clean(run_daemon, request, which) -> None:
    from services import promtool_check_metrics

    r = run_daemon(reference=request.getfixturevalue(which))
    rng = random.Random(10)
    make = _binary if which == "binary_reference" else _multiclass
    recs = [make(rng, i) for i in range(2 * WINDOW)]
    labels = [{"id": x["id"], "label": x.pop("label")} for x in recs]
    r.post("/v1/predictions", _ndjson(recs))
    r.post("/v1/labels", labels)
    r.daemon.drain()
    status, text = r.get("/metrics")
    assert status == 200
    rc, out = promtool_check_metrics(text)
    assert rc == 0, out
    names = {ln.split("{")[0].split(" ")[0] for ln in text.decode().splitlines()
             if ln and not ln.startswith("#")}
    assert {"lrwatch_prediction_class_ratio", "lrwatch_prediction_class_reference_ratio",
            "lrwatch_label_coverage_horizon_ratio", "lrwatch_label_horizon_seconds",
            "lrwatch_pending_labels", "lrwatch_estimated_accuracy", "lrwatch_estimated_metric",
            "lrwatch_estimated_accuracy_drop", "lrwatch_estimated_accuracy_drop_zscore",
            "lrwatch_estimation_error", "lrwatch_estimation_windows_compared_total",
            "lrwatch_estimation_withheld_total", "lrwatch_multivariate_drift_score"} <= names
    assert ("lrwatch_prediction_mean" in names) == (which == "binary_reference")


def test_coverage_and_waiting_estimates_survive_a_restart(run_daemon, binary_reference,
                                                          tmp_path) -> None:
    state = str(tmp_path / "state")
    r = run_daemon(reference=binary_reference, state_dir=state, label_horizon_seconds=100.0)
    rng = random.Random(11)
    recs = [_binary(rng, i, t=T0 + i) for i in range(3 * WINDOW)]
    labels = [{"id": x["id"], "label": x.pop("label")} for x in recs]
    r.post("/v1/predictions", _ndjson(recs))
    r.daemon.drain()
    r.server.stop()
    r.daemon.stop(timeout=5)
    r2 = run_daemon(reference=binary_reference, state_dir=state, label_horizon_seconds=100.0)
    assert r2.metric("lrwatch_pending_labels") == 3 * WINDOW
    r2.post("/v1/labels", labels[WINDOW:2 * WINDOW])
    # window 1's estimate waited through the restart and met its labels
    assert r2.metric("lrwatch_estimation_windows_compared_total") == 1
    assert r2.daemon.coverage.ratio() == pytest.approx(1.0, abs=0.04)  # [99, 199) labelled


# --- joint drift --------------------------------------------------------------------------------
def _correlated(rng: random.Random, decorrelate: bool) -> dict[str, Any]:
    x = rng.gauss(0, 1)
    y = 0.9 * (rng.gauss(0, 1) if decorrelate else x) + math.sqrt(1 - 0.81) * rng.gauss(0, 1)
    return {"features": {"x": x, "y": y, "z": rng.gauss(0, 1)}, "prediction": rng.random()}


@pytest.fixture(scope="module")
def correlated_reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    rng = random.Random(12)
    ref = build_reference([_correlated(rng, False) for _ in range(4000)], window_size=WINDOW,
                          sims=300)
    path = str(tmp_path_factory.mktemp("jref") / "reference.json")
    ref.save(path)
    return path


def test_a_decorrelation_is_caught_by_the_joint_test_only(run_daemon,
                                                          correlated_reference) -> None:
    r = run_daemon(reference=correlated_reference)
    rng = random.Random(13)
    calm = [_correlated(rng, False) for _ in range(2 * WINDOW)]
    r.post("/v1/predictions", _ndjson(calm))
    r.daemon.drain()
    assert r.daemon.last["values"]["multivariate_drift"] == 0.0
    assert 0 <= r.metric("lrwatch_multivariate_drift_score") < 1
    shifted = [_correlated(rng, True) for _ in range(3 * WINDOW)]  # same marginals
    r.post("/v1/predictions", _ndjson(shifted))
    r.daemon.drain()
    last = r.daemon.last
    assert last["values"]["multivariate_drift"] == 1.0 and last["values"]["drift_detected"] == 1
    assert last["drifted_features"] == [] and set(last["joint_features"]) <= {"x", "y"}
    assert r.metric("lrwatch_multivariate_drift_detected") == 1
    assert r.metric("lrwatch_multivariate_drift_score") >= 1
    assert r.metric("lrwatch_drift_window_detected") == 1
    status = json.loads(r.get("/v1/status")[1])
    assert status["multivariate_drift"] == {"enabled": True, "detected": 1.0,
                                            "score": last["values"]["multivariate_drift_score"]}


def test_the_joint_test_can_be_switched_off(run_daemon, correlated_reference) -> None:
    r = run_daemon(reference=correlated_reference, joint_drift=False)
    rng = random.Random(14)
    r.post("/v1/predictions", _ndjson([_correlated(rng, True) for _ in range(WINDOW)]))
    r.daemon.drain()
    assert "multivariate_drift" not in r.daemon.last["values"]
    assert r.metric("lrwatch_multivariate_drift_score") is None
    assert json.loads(r.get("/v1/status")[1])["multivariate_drift"]["enabled"] is False


def test_a_window_with_few_labels_is_compared_once_they_had_the_horizon() -> None:
    from lrwatch.daemon.estimate_tracking import EstimateTracker

    class Flat:
        n_classes = 2

        def estimate(self, proba: Any) -> dict[str, float]:
            return {"accuracy": 0.9, "records": float(len(proba))}

    t = EstimateTracker(Flat(), "probability", horizon=60.0, min_labels=30)
    proba = np.full(100, 0.8)
    t.window(1, 100.0, proba, 100)
    t.window(2, 110.0, proba, 100)
    for _ in range(40):  # 40 of 100: under half, so not yet
        t.join(1, 1.0)
    for _ in range(10):  # 10: never enough
        t.join(2, 0.0)
    t.sweep(150.0)
    assert t.take_completed() == []
    t.sweep(165.0)  # window 1's records are all older than the horizon: compared
    assert t.take_completed() == [pytest.approx(0.9 - 1.0)]
    t.sweep(500.0)  # window 2 is dropped uncompared
    assert t.take_completed() == [] and t.state_dict() == {"open": []}
