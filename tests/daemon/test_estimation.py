"""Label-free performance estimation (lrwatch.daemon.estimation) on data whose truth is known."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from lrwatch.daemon.estimation import METHODS, PerformanceEstimator
from lrwatch.errors import ConfigError


def calibrated_binary(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A perfectly calibrated binary model: ``y ~ Bernoulli(p)``."""
    p = rng.beta(2.0, 2.0, n)
    return p, (rng.random(n) < p).astype(int)


def underconfident_multiclass(n: int, k: int, rng: np.random.Generator, temp: float = 3.0
                              ) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sharp class probabilities; the model reports them softened by
    ``temp`` (same ranking, much lower confidence: a random forest's symptom)."""
    logits = rng.normal(0.0, 3.0, (n, k))
    true = np.exp(logits - logits.max(axis=1, keepdims=True))
    true /= true.sum(axis=1, keepdims=True)
    y = (true.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    soft = np.exp((logits - logits.max(axis=1, keepdims=True)) / temp)
    return soft / soft.sum(axis=1, keepdims=True), y


def accuracy(p: np.ndarray, y: np.ndarray) -> float:
    pred = (p >= 0.5).astype(int) if p.ndim == 1 else p.argmax(axis=1)
    return float((pred == y).mean())


@pytest.mark.parametrize("method", METHODS)
def test_calibrated_binary_tracks_realised_accuracy_and_band_covers(method):
    rng = np.random.default_rng(1)
    p, y = calibrated_binary(4000, rng)
    est = PerformanceEstimator.fit(p, y, method=method)
    errs, covered = [], []
    for _ in range(40):
        pw, yw = calibrated_binary(500, rng)
        r = est.estimate(pw)
        errs.append(abs(r["accuracy"] - accuracy(pw, yw)))
        covered.append(r["accuracy_low"] <= accuracy(pw, yw) <= r["accuracy_high"])
    assert np.mean(errs) < 0.02
    assert np.mean(covered) >= 0.85
    assert abs(est.reference_estimate - est.reference_accuracy) < 0.02


@pytest.mark.parametrize("method", METHODS)
def test_underconfident_multiclass_is_corrected(method):
    rng = np.random.default_rng(2)
    p, y = underconfident_multiclass(6000, 5, rng)
    est = PerformanceEstimator.fit(p, y, method=method)
    pw, yw = underconfident_multiclass(3000, 5, rng)
    naive = float(pw.max(axis=1).mean())
    assert accuracy(pw, yw) - naive > 0.2  # the model really is under-confident
    assert abs(est.estimate(pw)["accuracy"] - accuracy(pw, yw)) < 0.025
    assert est.n_classes == 5


def test_selection_shift_towards_hard_rows_is_followed_and_flagged():
    rng = np.random.default_rng(3)
    p, y = underconfident_multiclass(20000, 4, rng)
    est = PerformanceEstimator.fit(p[:5000], y[:5000])
    pool_p, pool_y = p[5000:], y[5000:]
    w = np.exp(-4.0 * pool_p.max(axis=1))  # low-confidence rows much more likely
    idx = rng.choice(len(pool_y), 3000, p=w / w.sum())
    real = accuracy(pool_p[idx], pool_y[idx])
    assert est.reference_accuracy - real > 0.05  # the shift really lowers accuracy
    r = est.estimate(pool_p[idx[:500]])
    assert abs(est.estimate(pool_p[idx])["accuracy"] - real) < 0.03
    assert r["accuracy_drop"] > 0.03 and r["drop_z"] > 3.0
    calm = est.estimate(pool_p[:500])
    assert abs(calm["drop_z"]) < 3.0


def test_binary_metrics_match_sklearn_on_a_large_sample():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(4)
    p, y = calibrated_binary(20000, rng)
    est = PerformanceEstimator.fit(p, y)
    pw, yw = calibrated_binary(40000, rng)
    r = est.estimate(pw)
    pred = (pw >= 0.5).astype(int)
    assert r["precision"] == pytest.approx(metrics.precision_score(yw, pred), abs=0.02)
    assert r["recall"] == pytest.approx(metrics.recall_score(yw, pred), abs=0.02)
    assert r["f1"] == pytest.approx(metrics.f1_score(yw, pred), abs=0.02)
    assert r["roc_auc"] == pytest.approx(metrics.roc_auc_score(yw, pw), abs=0.02)
    assert r["accuracy"] == pytest.approx(accuracy(pw, yw), abs=0.02)


def test_two_column_binary_and_class_names_are_accepted():
    rng = np.random.default_rng(5)
    p, y = calibrated_binary(800, rng)
    a = PerformanceEstimator.fit(p, y)
    b = PerformanceEstimator.fit(np.column_stack([1 - p, p]), np.where(y == 1, "yes", "no"),
                                 classes=["no", "yes"])
    assert b.n_classes == 2 and b.classes == ["no", "yes"]
    assert b.estimate(np.column_stack([1 - p, p]))["accuracy"] == pytest.approx(
        a.estimate(p)["accuracy"], abs=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_through_json(method):
    rng = np.random.default_rng(6)
    p, y = underconfident_multiclass(3000, 10, rng)
    est = PerformanceEstimator.fit(p, y, method=method)
    text = json.dumps(est.to_dict())
    assert len(text) < 40_000  # it is stored inside the reference JSON
    back = PerformanceEstimator.from_dict(json.loads(text))
    r1, r2 = est.estimate(p[:500]), back.estimate(p[:500])
    assert r1.keys() == r2.keys()
    for k in r1:
        assert r2[k] == pytest.approx(r1[k], abs=1e-5)
    assert back.reference_estimate == est.reference_estimate
    assert back.reference_accuracy == est.reference_accuracy


def test_bad_dicts_are_refused_with_the_reason():
    rng = np.random.default_rng(7)
    p, y = calibrated_binary(500, rng)
    good = PerformanceEstimator.fit(p, y, method="isotonic").to_dict()
    with pytest.raises(ConfigError, match="version"):
        PerformanceEstimator.from_dict(dict(good, version=99))
    with pytest.raises(ConfigError, match="method"):
        PerformanceEstimator.from_dict(dict(good, method="magic"))
    with pytest.raises(ConfigError, match="malformed"):
        PerformanceEstimator.from_dict({k: v for k, v in good.items() if k != "baseline"})
    broken = json.loads(json.dumps(good))
    broken["calibrators"][0][1][0] = 7.0
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        PerformanceEstimator.from_dict(broken)
    blend = PerformanceEstimator.fit(p, y, method="blend").to_dict()
    with pytest.raises(ConfigError, match="keys"):
        PerformanceEstimator.from_dict(dict(blend, calibrators=blend["calibrators"]["logistic"]))
    with pytest.raises(ConfigError, match="mapping"):
        PerformanceEstimator.from_dict([1, 2])


def test_bad_fit_inputs_say_what_to_fix():
    rng = np.random.default_rng(8)
    p, y = calibrated_binary(200, rng)
    with pytest.raises(ConfigError, match="at least 30"):
        PerformanceEstimator.fit(p[:10], y[:10])
    with pytest.raises(ConfigError, match="NaN"):
        PerformanceEstimator.fit(np.where(np.arange(200) == 3, np.nan, p), y)
    with pytest.raises(ConfigError, match="outside the classes"):
        PerformanceEstimator.fit(p, np.where(np.arange(200) == 5, 2, y))
    with pytest.raises(ConfigError, match="200 entries"):
        PerformanceEstimator.fit(p, y[:150])
    with pytest.raises(ConfigError, match="NaN"):
        PerformanceEstimator.fit(p, np.where(np.arange(200) == 4, np.nan, y))
    with pytest.raises(ConfigError, match="3 classes"):
        PerformanceEstimator.fit(rng.dirichlet(np.ones(3), 200), y, classes=["a", "b"])
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        PerformanceEstimator.fit(p * 3, y)


def test_bad_windows_raise_value_error_and_empty_windows_read_nan():
    rng = np.random.default_rng(9)
    p, y = underconfident_multiclass(600, 3, rng)
    est = PerformanceEstimator.fit(p, y)
    with pytest.raises(ValueError, match="3"):
        est.estimate(rng.dirichlet(np.ones(4), 50))
    with pytest.raises(ValueError, match="NaN"):
        est.estimate(np.full((5, 3), np.nan))
    r = est.estimate(np.zeros((0, 3)))
    assert r["records"] == 0 and math.isnan(r["accuracy"])
    one = est.estimate(p[:1])
    assert all(math.isfinite(v) for v in one.values())
    assert one["accuracy_low"] <= one["accuracy"] <= one["accuracy_high"]


def test_perfect_reference_still_reads_below_one_on_uncertain_rows():
    """A reference with no errors must not pin every estimate at 100%."""
    rng = np.random.default_rng(10)
    p = np.concatenate([rng.uniform(0.9, 1.0, 200), rng.uniform(0.0, 0.1, 200)])
    y = (p >= 0.5).astype(int)
    est = PerformanceEstimator.fit(p, y, method="logistic")
    assert est.reference_accuracy == 1.0
    assert est.estimate(rng.uniform(0.45, 0.55, 500))["accuracy"] < 0.8


def test_ten_classes_window_is_fast():
    rng = np.random.default_rng(11)
    p, y = underconfident_multiclass(5000, 10, rng)
    est = PerformanceEstimator.fit(p, y)
    w = p[:500]
    est.estimate(w)
    t0 = time.perf_counter()
    for _ in range(50):
        est.estimate(w)
    assert (time.perf_counter() - t0) / 50 < 0.005


def test_auto_chooses_the_calibrator_by_cross_validation_on_the_reference():
    # a model whose confidence is right only as a step (a k-NN's or a boosted model's shape):
    # P(y=1 | p) is 0.9 above 0.5 and 0.1 below, whatever p says; a logistic curve in logit(p)
    # bends wrongly, isotonic steps do not
    rng = np.random.default_rng(11)
    p = rng.random(6000)
    y = (rng.random(6000) < np.where(p >= 0.5, 0.9, 0.1)).astype(int)
    auto = PerformanceEstimator.fit(p[:3000], y[:3000])          # "auto" is the default
    logistic = PerformanceEstimator.fit(p[:3000], y[:3000], method="logistic")
    assert auto.method in ("isotonic", "blend")
    w = p[3000:3500]
    realised = float(((w >= 0.5) == (y[3000:3500] == 1)).mean())
    assert abs(auto.estimate(w)["accuracy"] - realised) < abs(
        logistic.estimate(w)["accuracy"] - realised)
    assert PerformanceEstimator.from_dict(auto.to_dict()).method == auto.method
