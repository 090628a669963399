"""The joint (multivariate) drift test: decorrelation is caught, the combined false-alarm rate
holds, missing values, no joint test with one numeric feature, resume, old references."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from lrwatch.daemon import DriftDetector, Reference
from lrwatch.daemon.baseline import build_reference
from lrwatch.daemon.calibrate import Calibration, calibrate
from lrwatch.errors import ConfigError

WINDOW = 200
NAMES = ["a", "b", "c", "d", "e"]


def _rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """Correlated rows with skewed marginals: a Gaussian copula, two columns exponentiated
    (with noise of their own: on the normal-score scale the tests work on, a column that is an
    exact monotone function of the others' linear combination leaves no residual at all)."""
    g = rng.standard_normal((n, 3))
    x = np.column_stack([g[:, 0], g[:, 0] + 0.6 * g[:, 1],
                         np.exp(0.5 * (g[:, 0] + g[:, 2]) + 0.3 * rng.standard_normal(n)),
                         g[:, 1] - 0.5 * g[:, 2], np.exp(0.3 * rng.standard_normal(n))])
    return x


def _reference(seed: int, target: float = 1000.0, missing: float = 0.0,
               sims: int = 400) -> Reference:
    rng = np.random.default_rng(seed)
    x = _rows(rng, 3000)
    if missing:
        x[rng.random(len(x)) < missing, 1] = np.nan
    rows = [{"features": {n: (None if math.isnan(v) else float(v)) for n, v in zip(NAMES, r)}}
            for r in x]
    return build_reference(rows, window_size=WINDOW, target_windows=target, sims=sims,
                           seed=seed)


def _window(det: DriftDetector, rng: np.random.Generator, decorrelate: float = 0.0,
            missing: float = 0.0, rotate: float = 0.0) -> np.ndarray:
    """A window in the profile's column order; ``decorrelate`` of the rows get column ``b``
    from other rows (its marginal is kept); ``rotate`` mixes ``b`` (Gaussian, mean 0) with an
    independent copy, ``cos(t) b + sin(t) b'``: the same Gaussian marginal, a weaker relation
    to the others."""
    x = _rows(rng, WINDOW)
    if decorrelate:
        k = int(decorrelate * WINDOW)
        x[:k, 1] = x[rng.permutation(k), 1]
    if rotate:
        x[:, 1] = math.cos(rotate) * x[:, 1] + math.sin(rotate) * x[rng.permutation(WINDOW), 1]
    if missing:
        x[rng.random(WINDOW) < missing, 1] = np.nan
    order = [NAMES.index(n) for n in det.profile.num_names]
    return x[:, order]


@pytest.fixture(scope="module")
def ref() -> Reference:
    return _reference(0)


def test_decorrelation_is_caught_where_per_feature_tests_are_blind(ref: Reference) -> None:
    det = DriftDetector(ref)
    assert set(det.calibration.joint_features or []) == set(NAMES)
    rng = np.random.default_rng(1)
    calm = det.update(_window(det, rng), [])
    assert not calm.joint_detected and calm.joint_score < calm.joint_threshold
    res = det.update(_window(det, rng, decorrelate=1.0), [])
    assert res.joint_detected and res.detected
    assert res.drifted_features == []  # every marginal is the reference's
    assert "b" in res.joint_features
    assert res.joint_score > res.joint_threshold == res.threshold
    assert res.joint_stat > 1.2  # b's mean absolute residual grew by more than 20%
    assert res.score >= res.joint_score / res.joint_threshold >= 1.0
    assert res.joint_names[int(np.argmax(res.joint_scores))] in res.joint_features


def test_joint_off_is_blind_and_uses_the_per_feature_thresholds(ref: Reference) -> None:
    on = DriftDetector(ref)
    off = DriftDetector(ref, joint=False)
    assert off.calibration is not None and off.calibration.joint_features  # not recalibrated
    assert off.threshold == ref.calibration["base_threshold"] < on.threshold
    res = off.update(_window(off, np.random.default_rng(2), decorrelate=1.0), [])
    assert not res.detected and math.isnan(res.joint_stat) and math.isnan(res.joint_score)


def test_unshifted_false_alarm_rate_of_all_tests_together_is_near_target() -> None:
    """Target 1 per 20 windows, all tests (per-feature, sequential, joint) together: 4
    references x 500 fresh windows expect 100 alarms; 50-150 is 5 Poisson sd either way."""
    alarms = joint_alarms = windows = 0
    for seed in range(4):
        det = DriftDetector(_reference(10 + seed, target=20.0, sims=500))
        rng = np.random.default_rng(100 + seed)
        for _ in range(500):
            res = det.update(_window(det, rng), [])
            alarms += res.detected
            joint_alarms += res.joint_detected
            windows += 1
    assert 50 <= alarms <= 150, (alarms, joint_alarms)
    assert joint_alarms < 0.7 * alarms  # the joint test shares the budget, it does not eat it


def test_missing_values_are_imputed_and_decorrelation_still_caught() -> None:
    ref = _reference(3, missing=0.1)
    det = DriftDetector(ref)
    assert "b" in (det.calibration.joint_features or [])
    rng = np.random.default_rng(4)
    calm = [det.update(_window(det, rng, missing=0.1), []) for _ in range(20)]
    assert sum(r.joint_detected for r in calm) <= 2
    assert all(math.isfinite(r.joint_stat) for r in calm)
    det.reset()
    res = det.update(_window(det, rng, decorrelate=1.0, missing=0.1), [])
    assert res.joint_detected and "b" in res.joint_features
    assert res.drifted_features == []


def test_one_numeric_feature_has_no_joint_test() -> None:
    """One numeric input and the prediction: nothing to be joint with (a categorical with a
    single level, seen once, gets no indicator either)."""
    rng = np.random.default_rng(5)
    rows = [{"features": {"x": float(v), "c": "a" if i else "b"}, "prediction": float(p)}
            for i, (v, p) in enumerate(zip(rng.normal(size=2000), rng.random(2000)))]
    ref = build_reference(rows, window_size=WINDOW, sims=300)
    assert ref.calibration is not None and ref.calibration["joint_features"] == []
    det = DriftDetector(ref)
    prof = det.profile
    x = np.column_stack([rng.normal(size=WINDOW) if n == "x" else rng.random(WINDOW)
                         for n in prof.num_names])
    res = det.update(x, [prof.encode(0, ["a"] * WINDOW)])
    assert math.isnan(res.joint_stat) and math.isnan(res.joint_score)
    assert not res.joint_detected and res.joint_features == []
    assert "joint_history" not in det.state_dict()


def _with_category(rng: np.random.Generator, n: int, shuffle: bool = False
                   ) -> tuple[np.ndarray, list[str]]:
    """Two numeric features and a category that follows the first (90% of the rows)."""
    x = rng.standard_normal((n, 2))
    x[:, 1] += 0.5 * x[:, 0]
    level = np.where(x[:, 0] < -0.5, "low", np.where(x[:, 0] < 0.5, "mid", "high"))
    noise = rng.random(n) < 0.1
    level[noise] = rng.choice(["low", "mid", "high"], int(noise.sum()))
    if shuffle:  # a join that pairs the category with other rows: its shares are kept
        level = level[rng.permutation(n)]
    return x, list(level)


def test_a_category_that_loses_its_relation_to_the_numeric_features_is_caught() -> None:
    """Per-feature tests are blind to it (the category's shares do not change); the joint
    test sees it through the category's indicator columns."""
    rng = np.random.default_rng(8)
    x, level = _with_category(rng, 3000)
    rows = [{"features": {"a": float(a), "b": float(b), "c": c}} for (a, b), c in zip(x, level)]
    ref = build_reference(rows, window_size=WINDOW, sims=300, seed=8)
    assert ref.calibration is not None
    assert ref.calibration["joint_features"] == ["a", "b", "c=low", "c=high"]
    det = DriftDetector(ref)
    prof = det.profile
    order = [["a", "b"].index(n) for n in prof.num_names]
    calm = 0
    for _ in range(20):
        x, level = _with_category(rng, WINDOW)
        calm += det.update(x[:, order], [prof.encode(0, level)]).detected
    assert calm <= 1
    det.reset()
    x, level = _with_category(rng, WINDOW, shuffle=True)
    res = det.update(x[:, order], [prof.encode(0, level)])
    assert res.drifted_features == [] and res.joint_detected
    assert any(f.startswith("c=") for f in res.joint_features) and "a" in res.joint_features
    # a window whose category is missing in a third of the rows is not a joint shift by itself
    det.reset()
    x, level = _with_category(rng, WINDOW)
    codes = prof.encode(0, [None if i % 3 == 0 else c for i, c in enumerate(level)])
    assert not det.update(x[:, order], [codes]).joint_detected


def test_small_decorrelation_accumulates_and_resumes(ref: Reference) -> None:
    det = DriftDetector(ref)
    rng = np.random.default_rng(6)
    per_window = sequential = 0
    windows = [_window(det, rng, rotate=0.06) for _ in range(16)]
    for x in windows[:12]:
        res = det.update(x, [])
        assert res.drifted_features == []
        per_window += res.joint_score > res.joint_threshold
        sequential += res.joint_seq_z > res.seq_threshold
    assert sequential >= per_window + 3
    state = json.loads(json.dumps(det.state_dict()))
    resumed = DriftDetector(ref)
    resumed.load_state_dict(state)
    for x in windows[12:]:
        a, b = det.update(x, []), resumed.update(x, [])
        assert a.joint_seq_z == pytest.approx(b.joint_seq_z, rel=1e-12)
        assert a.joint_detected == b.joint_detected
    # a state saved without the joint part (older lrwatch) restarts only that accumulation
    old = {"history": state["history"]}
    fresh = DriftDetector(ref)
    fresh.load_state_dict(old)
    assert fresh.state_dict()["joint_history"] == []
    with pytest.raises(ConfigError):
        fresh.load_state_dict({"history": [], "joint_history": [[[1.0, 2.0], 200.0]]})


def test_old_reference_without_joint_calibration_is_recalibrated(
        ref: Reference, tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    old = calibrate(ref, window_size=WINDOW, target_windows=1000.0, sims=300,
                    joint=False).to_dict()
    for key in ("joint_features", "joint_mean", "joint_sd", "base_threshold",
                "base_seq_threshold"):
        old.pop(key)  # what an lrwatch without the joint test wrote
    d = ref.to_dict()
    d["calibration"] = old
    path = tmp_path / "old.json"
    path.write_text(json.dumps(d))
    loaded = Reference.load(path)
    with caplog.at_level(logging.INFO, logger="lrwatch.daemon"):
        det = DriftDetector(loaded)
    assert any("predates the joint drift test" in r.getMessage() for r in caplog.records)
    assert det.calibration.joint_features and det.threshold > old["threshold"]
    res = det.update(_window(det, np.random.default_rng(7), decorrelate=1.0), [])
    assert res.joint_detected
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lrwatch.daemon"):
        off = DriftDetector(loaded, joint=False)  # the old calibration is used as it is
    assert off.calibration.joint_features is None and off.threshold == old["threshold"]
    assert not caplog.records


def test_few_rows_for_many_features_inflate_the_reference_error() -> None:
    """60 features on 300 rows: the regression's coefficient error is measured into the
    calibration (``joint_inflation``; 1.26-1.49 over six such references) and the detector uses
    ``kappa / m``; a calibration from before the measurement reads as 1 (no inflation)."""
    p = 60
    a = np.random.default_rng(7).standard_normal((p, 3))
    x = np.random.default_rng(1).standard_normal((300, 3)) @ a.T + \
        np.random.default_rng(2).standard_normal((300, p)) * 0.7
    rows = [{"features": {f"f{j:02d}": float(v) for j, v in enumerate(r)}} for r in x]
    ref = build_reference(rows, window_size=100, target_windows=100, sims=400, estimate=False)
    kappa = ref.calibration["joint_inflation"]
    assert 1.15 < kappa < 1.7, kappa
    det = DriftDetector(ref, window_size=100, target_windows=100)
    assert det._jm == pytest.approx(det._m / kappa)
    old = dict(ref.calibration)
    del old["joint_inflation"]
    ref.calibration = old
    assert DriftDetector(ref, window_size=100, target_windows=100)._jm == det._m


def test_calibration_without_joint_skew_gets_it_measured(ref: Reference) -> None:
    cal = calibrate(ref, window_size=WINDOW, target_windows=1000.0, sims=300)
    assert len(cal.joint_skew) == len(cal.joint_features or []) > 0
    assert all(0.3 < g < 2.0 for g in cal.joint_skew)   # |e| rows are right-skewed
    old = Calibration.from_dict({k: v for k, v in cal.to_dict().items() if k != "joint_skew"})
    assert old.joint_skew == []
    det = DriftDetector(ref, calibration=old)
    assert np.allclose(det._jskew, cal.joint_skew)


@pytest.mark.parametrize("share", [1.0, 0.5, 0.2])
def test_a_feature_missing_in_the_window_is_reported_not_its_neighbours(
        ref: Reference, share: float) -> None:
    """``a`` missing in a window (its source down): imputed with the reference mean, it made
    ``b``, ``c`` and ``d``, which it helps predict, read as drifting jointly (thirteenth
    audit). Its missing test names ``a``; the joint test leaves its gap out and says so."""
    det = DriftDetector(ref)
    rng = np.random.default_rng(7)
    x = _window(det, rng)
    x[rng.random(len(x)) < share, det.profile.num_names.index("a")] = np.nan
    res = det.update(x, [])
    assert res.drifted_features == ["a"]
    assert res.joint_features == [] and not res.joint_detected
    assert res.joint_excluded == ["a"]
    if share == 1.0:  # no row to test jointly
        assert math.isnan(res.joint_stat) and res.joint_rows == 0
    else:
        assert res.joint_score < res.threshold and 0 < res.joint_rows < WINDOW


def test_decorrelation_is_still_caught_beside_a_missing_feature(ref: Reference) -> None:
    det = DriftDetector(ref)
    rng = np.random.default_rng(8)
    x = _window(det, rng, decorrelate=1.0)
    x[rng.random(len(x)) < 0.5, det.profile.num_names.index("a")] = np.nan
    res = det.update(x, [])
    assert res.joint_detected and "b" in res.joint_features and res.joint_excluded == ["a"]
