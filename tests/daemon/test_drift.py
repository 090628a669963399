"""Drift fires on a shifted stream and not on an unshifted one; labels are joined after a delay."""

from __future__ import annotations

import random
import time

import numpy as np

from daemon_helpers import WINDOW, make_record
from lrwatch.daemon import DriftDetector, Reference


def _stream(r, rng, start, n, shift=0.0, labels=False):
    recs = [make_record(rng, start + k, shift) for k in range(n)]
    for k in range(0, n, 250):
        assert r.post("/v1/predictions", recs[k:k + 250])[0] == 200
    return recs


def test_unshifted_stream_does_not_alarm(run_daemon):
    r = run_daemon()
    _stream(r, random.Random(11), 0, 30 * WINDOW)
    assert r.metric("lrwatch_windows_total") == 30
    assert r.metric("lrwatch_drift_detected", {"feature": "x"}) == 0
    assert r.daemon.counters["windows"] == 30
    assert "data_drift" not in r.daemon.engine.active


def test_shifted_stream_fires_data_drift_for_the_shifted_feature(run_daemon):
    r = run_daemon()
    rng = random.Random(12)
    _stream(r, rng, 0, 5 * WINDOW)
    _stream(r, rng, 10_000, 5 * WINDOW, shift=1.0)
    assert r.metric("lrwatch_drift_detected", {"feature": "x"}) == 1
    assert r.metric("lrwatch_drift_detected", {"feature": "y"}) == 0
    assert r.metric("lrwatch_rule_firing", {"rule": "data_drift", "severity": "warning"}) == 1
    thr = r.metric("lrwatch_drift_threshold", {"feature": "x", "method": "score"})
    assert r.metric("lrwatch_drift_statistic", {"feature": "x", "method": "score"}) > thr
    assert r.daemon.status()["last_window"]["drifted_features"] == ["x"]


def test_category_and_missing_shifts_are_caught(reference_path):
    ref = Reference.load(reference_path)
    det = DriftDetector(ref)
    prof = det.profile
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (WINDOW, len(prof.num_names)))
    x[:, prof.num_names.index("_prediction")] = rng.random(WINDOW)
    assert not det.update(x, [prof.encode(0, list(rng.choice(list("abc"), WINDOW)))]).detected
    skew = prof.encode(0, list(rng.choice(list("abc"), WINDOW, p=[0.8, 0.1, 0.1])))
    assert det.update(x, [skew]).drifted_features == ["c"]
    holes = x.copy()
    holes[: WINDOW // 3, prof.num_names.index("y")] = np.nan
    res = det.update(holes, [prof.encode(0, list(rng.choice(list("abc"), WINDOW)))])
    assert res.drifted_features == ["y"]
    assert res.tests.missing_ratio[prof.num_names.index("y")] > 0.3


def test_small_shift_is_caught_by_sequential_evidence_only(reference_path):
    ref = Reference.load(reference_path)
    det = DriftDetector(ref)
    prof = det.profile
    rng = np.random.default_rng(1)
    j = prof.num_names.index("x")
    per_window = sequential = 0
    for _ in range(16):
        x = rng.normal(0, 1, (WINDOW, len(prof.num_names)))
        x[:, prof.num_names.index("_prediction")] = rng.random(WINDOW)
        x[:, j] += 0.35  # ~1.4 standard errors per 100-record window: invisible alone
        res = det.update(x, [prof.encode(0, list(rng.choice(list("abc"), WINDOW)))])
        per_window += res.feature_score[j] > res.threshold
        sequential += res.seq_z[j] > res.seq_threshold
    assert sequential > 0
    assert per_window < sequential
    state = det.state_dict()
    det2 = DriftDetector(ref)
    det2.load_state_dict(state)
    assert det2.state_dict() == state


def test_delayed_labels_are_joined_and_accuracy_exported(run_daemon):
    r = run_daemon()
    rng = random.Random(13)
    recs = [make_record(rng, k, time=1000.0 + k) for k in range(WINDOW)]
    assert r.post("/v1/predictions", recs)[0] == 200
    r.daemon.drain()
    assert r.metric("lrwatch_pending_labels") is not None
    # labels arrive later: right for even ids, wrong for odd ones; one unknown id
    labels = [{"id": rec["id"], "time": 1060.0 + k,
               "label": int(rec["prediction"] >= 0.5) if k % 2 == 0
               else int(rec["prediction"] < 0.5)} for k, rec in enumerate(recs)]
    labels.append({"id": "nobody", "label": 1})
    assert r.post("/v1/labels", labels)[1]["accepted"] == WINDOW + 1
    _stream(r, rng, 10_000, WINDOW)  # closes a window holding those joins
    assert r.metric("lrwatch_labels_joined_total") == WINDOW
    # the unknown id waits for its prediction (it may come after its label), then is given up
    assert r.metric("lrwatch_labels_unmatched_total") == 0 and len(r.daemon.pending.early) == 1
    r.daemon.tick(time.time() + r.daemon.config.early_label_seconds + 1.0)
    assert r.metric("lrwatch_labels_unmatched_total") == 1
    assert r.metric("lrwatch_model_accuracy") == 0.5
    assert r.metric("lrwatch_label_coverage_ratio") == 1.0
    assert r.metric("lrwatch_label_delay_seconds_count") == WINDOW
    assert r.metric("lrwatch_label_delay_seconds_sum") == 60.0 * WINDOW


def test_pending_store_is_bounded(run_daemon):
    r = run_daemon(max_pending_labels=10)
    rng = random.Random(14)
    assert r.post("/v1/predictions", [make_record(rng, k) for k in range(25)])[0] == 200
    assert r.metric("lrwatch_labels_expired_total") == 15
    assert len(r.daemon.pending) == 10


def test_a_feature_constant_in_the_reference_that_starts_to_vary_is_caught():
    """A feature held at one value in the reference (mean-imputed while its source was down,
    say; or a sparse feature, 0 in 98% of the rows) that varies around that value live: its quantile
    bins have no width, so the binned Wasserstein distance read 0 and gated every alarm off,
    however far the values spread (a KS score 30 times its threshold, never detected)."""
    from lrwatch.daemon import build_reference

    rng = random.Random(21)
    rows = [{"features": {"x": rng.gauss(0, 1), "k": 3.0,
                          "s": 0.0 if rng.random() < 0.98 else rng.gauss(5, 1)},
             "prediction": rng.random()} for _ in range(2000)]
    det = DriftDetector(build_reference(rows, window_size=WINDOW, sims=200, seed=0))
    prof = det.profile
    k, s = prof.num_names.index("k"), prof.num_names.index("s")
    nrng = np.random.default_rng(22)

    def window(k_sd: float = 0.0, s_sd: float = 0.0) -> np.ndarray:
        x = np.column_stack([nrng.normal(0, 1, WINDOW) for _ in prof.num_names])
        x[:, prof.num_names.index("_prediction")] = nrng.random(WINDOW)
        x[:, k] = 3.0 + k_sd * nrng.normal(0, 1, WINDOW)
        sparse = nrng.random(WINDOW) >= 0.98
        x[:, s] = np.where(sparse, nrng.normal(5, 1, WINDOW), s_sd * nrng.normal(0, 1, WINDOW))
        return x

    calm = det.update(window(), [])
    assert not calm.detected and calm.tests.wasserstein[k] == 0.0
    assert det.update(window(k_sd=1.0), []).drifted_features == ["k"]
    det.reset()
    assert det.update(window(s_sd=1.0), []).drifted_features == ["s"]
    det.reset()
    # float noise around the constant is no effect (the gate's job)
    assert not det.update(window(k_sd=1e-9), []).detected
