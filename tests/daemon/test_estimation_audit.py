"""Defects found by the fourteenth round's audit of label-free performance estimation
(docs/performance-estimation.md, "Defects found by the fourteenth round's audit"): each test
failed before its fix."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import numpy as np
import pytest

from daemon_helpers import WINDOW, assert_balanced, binary_record, saved_binary_reference
from lrwatch.daemon import build_reference
from lrwatch.daemon.estimation import PerformanceEstimator
from lrwatch.errors import ConfigError


def _ndjson(recs: list[dict[str, Any]]) -> str:
    return "\n".join(json.dumps(r) for r in recs)


def _softmax_record(rng: random.Random, i: int, k: int = 3) -> dict[str, Any]:
    x = rng.gauss(0, 1)
    z = [math.exp(x * (j - 1) * 1.5) for j in range(k)]
    p = [round(v / sum(z), 6) for v in z]
    return {"id": f"m{i}", "features": {"x": x, "y": rng.gauss(0, 1)},
            "prediction": {"proba": p}, "label": rng.choices(range(k), weights=p)[0]}


@pytest.fixture(scope="module")
def multiclass_reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    rng = random.Random(41)
    ref = build_reference([_softmax_record(rng, i) for i in range(1500)], window_size=WINDOW,
                          sims=200)
    assert ref.proba_width == 3 and ref.estimator is not None
    path = str(tmp_path_factory.mktemp("mref14") / "reference.json")
    ref.save(path)
    return path


@pytest.fixture(scope="module")
def binary_reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    return saved_binary_reference(tmp_path_factory, 42, 1500, 200, "bref14")


# --- class probabilities that do not sum to 1 ---------------------------------------------------
def test_the_estimator_refuses_rows_that_do_not_sum_to_1() -> None:
    """Per-class scores (a sigmoid per class) read as probabilities made up an estimate:
    ``[0.9, 0.9, 0.9]`` read 92% for a model of 68%."""
    rng = np.random.default_rng(43)
    p = rng.dirichlet(np.ones(3), 600)
    y = np.array([rng.choice(3, p=r) for r in p])
    est = PerformanceEstimator.fit(p, y)
    assert est.estimate(np.round(p[:100], 2))["records"] == 100   # rounded outputs pass
    with pytest.raises(ValueError, match="do not sum to 1"):
        est.estimate(np.full((100, 3), 0.9))
    with pytest.raises(ConfigError, match="do not sum to 1"):
        PerformanceEstimator.fit(np.minimum(p * 2, 1.0), y)
    b = PerformanceEstimator.fit(p[:, 1] / (p[:, 0] + p[:, 1]), (y == 1).astype(int))
    with pytest.raises(ValueError, match="do not sum to 1"):   # a binary [p0, p1]
        b.estimate(np.column_stack([np.full(50, 0.9), p[:50, 1]]))


def test_live_class_probabilities_that_do_not_sum_to_1_are_refused(run_daemon,
                                                                    multiclass_reference):
    """Against a reference with an estimator, a list that does not sum to 1 is
    ``invalid_prediction`` (it was accepted, and the window's estimate read it as
    probabilities); the good records of the same request are kept and estimated."""
    r = run_daemon(reference=multiclass_reference)
    rng = random.Random(44)
    good = [_softmax_record(rng, i) for i in range(WINDOW)]
    for x in good:
        del x["label"]
    bad = [{"id": f"s{i}", "features": {"x": 0.0, "y": 0.0}, "prediction": [0.9, 0.9, 0.9]}
           for i in range(30)]
    status, body = r.post("/v1/predictions", _ndjson(bad))   # all of a batch (the fast path)
    assert status == 400 and body["reasons"] == {"invalid_prediction": 30}, body
    assert "sum to 1" in body["error"] and "2.7" in body["error"]
    status, body = r.post("/v1/predictions", _ndjson(good[:50] + bad + good[50:]))
    assert status == 200 and body["accepted"] == WINDOW and body["rejected"] == 30, body
    assert "sum to 1" in body["errors"][0]
    est = r.metric("lrwatch_estimated_accuracy")
    assert est is not None and est < 0.8   # the softmax rows' estimate (0.9 rows read ~0.92)
    assert r.daemon.counters["errors"]["invalid_prediction"] == 60
    assert r.metric("lrwatch_internal_errors_total") == 0
    assert_balanced(r.daemon)


def test_live_binary_lists_that_do_not_sum_to_1_are_refused(run_daemon, binary_reference):
    """``[p0, p1]`` against a binary reference with an estimator was read as ``p1`` whatever
    ``p0`` said."""
    r = run_daemon(reference=binary_reference)
    recs = [{"id": "a", "features": {"x": 0.1, "y": 0.0}, "prediction": [0.9, 0.7]},
            {"id": "b", "features": {"x": 0.1, "y": 0.0}, "prediction": [0.3, 0.7]},
            {"id": "c", "features": {"x": 0.1, "y": 0.0}, "prediction": [0.7]}]
    status, body = r.post("/v1/predictions", _ndjson(recs))
    assert status == 200 and body["accepted"] == 2 and body["rejected"] == 1, body
    assert body["errors"][0].startswith("record 1: class probabilities must sum to 1")
    assert_balanced(r.daemon)


def test_lists_without_an_estimator_are_not_held_to_a_sum(run_daemon, tmp_path) -> None:
    """A reference without labels has no estimator: its lists (a multi-label model's
    scores, say) are read by their arg max only, as before."""
    rng = random.Random(45)
    rows = [_softmax_record(rng, i) for i in range(600)]
    for x in rows:
        del x["label"]
        x["prediction"] = [min(1.0, 2 * v) for v in x["prediction"]["proba"]]
    ref = build_reference(rows, window_size=WINDOW, sims=100)
    assert ref.estimator is None and ref.proba_width == 3
    path = str(tmp_path / "ref.json")
    ref.save(path)
    r = run_daemon(reference=path)
    status, body = r.post("/v1/predictions", _ndjson(rows[:WINDOW]))
    assert status == 200 and body == {"accepted": WINDOW, "rejected": 0}, body


def test_lists_are_not_held_to_a_sum_with_estimation_off(run_daemon, multiclass_reference):
    """``estimation: {enabled: false}``: no estimator reads the lists, so their sums are not
    checked (the reference's estimator is not used)."""
    r = run_daemon(reference=multiclass_reference, estimation=False)
    recs = [{"id": f"s{i}", "features": {"x": 0.0, "y": 0.0}, "prediction": [0.9, 0.9, 0.9]}
            for i in range(10)]
    status, body = r.post("/v1/predictions", _ndjson(recs))
    assert status == 200 and body == {"accepted": 10, "rejected": 0}, body


# --- a binary classifier's prediction outside [0, 1] --------------------------------------------
def test_a_binary_classifiers_prediction_outside_0_1_is_refused(run_daemon, binary_reference):
    """Against a reference whose 0/1 labels made it a binary classifier, ``1.7`` or ``-0.2``
    was accepted and silently left out of the window's estimate (a window of them had no
    estimate at all, and the gauge kept the last window's)."""
    r = run_daemon(reference=binary_reference)
    assert r.daemon.limits.binary_from_labels
    rng = random.Random(46)
    good = [binary_record(rng, i, label=False) for i in range(WINDOW)]
    bad = [dict(binary_record(rng, 1000 + i, label=False), prediction=v)
           for i, v in enumerate([1.7, -0.2, 2, -1] * 5)]
    status, body = r.post("/v1/predictions", _ndjson(bad))
    assert status == 400 and body["reasons"] == {"invalid_prediction": 20}, body
    assert "outside [0, 1]" in body["error"]
    status, body = r.post("/v1/predictions", _ndjson(good[:50] + bad + good[50:]))
    assert status == 200 and body["accepted"] == WINDOW and body["rejected"] == 20, body
    assert r.metric("lrwatch_estimated_accuracy") is not None   # (drains first)
    assert r.daemon.counters["windows"] == 1
    assert_balanced(r.daemon)


def test_lists_accepted_before_a_live_reference_do_not_cost_their_window_its_estimate(
        run_daemon) -> None:
    """The records after a live reference's rows are validated before it is known, so lists
    that do not sum to 1 get in there: the estimator refused the whole window for them (an
    internal error, no estimate for its good records). They are left out of the estimate,
    as values outside [0, 1] already were."""
    rng = random.Random(47)
    r = run_daemon(reference=None, live_records=1000)
    recs = [_softmax_record(rng, i) for i in range(1000 + 2 * WINDOW)]
    for i in range(1000, 1000 + WINDOW, 2):
        recs[i]["prediction"] = [0.9, 0.9, 0.9]
    status, body = r.post("/v1/predictions", _ndjson(recs))
    assert status == 200 and body["accepted"] == len(recs), body
    r.daemon.drain()
    assert r.daemon.reference is not None and r.daemon.reference.estimator is not None
    assert r.daemon.counters["windows"] == 2
    # inline labels: each estimated window is compared with them at once
    assert r.metric("lrwatch_estimation_windows_compared_total") == 2
    assert r.metric("lrwatch_internal_errors_total") == 0


# --- a zero-padded class index -------------------------------------------------------------------
def test_a_zero_padded_class_index_is_no_label(run_daemon, multiclass_reference) -> None:
    """``"01"`` passed the class check against a reference of probability lists (its digits
    name class 1) but was scored as the string ``"01"``, which no predicted class matched:
    every such label read as a wrong prediction (realised accuracy 0, estimation error +0.67,
    the accuracy and estimation alerts armed). It is ``invalid_label`` now, inline and
    delayed, and a reference with such labels fits no estimator (it read them as classes)."""
    r = run_daemon(reference=multiclass_reference)
    rng = random.Random(48)
    recs = [_softmax_record(rng, i) for i in range(WINDOW)]
    labels = [{"id": x["id"], "label": "%02d" % x.pop("label")} for x in recs]
    status, body = r.post("/v1/predictions", _ndjson(
        [dict(recs[0], id="inline", label="01")] + recs))
    assert status == 200 and body["rejected"] == 1, body
    assert body["reasons"] == {"invalid_label": 1} and "class index 0..2" in body["errors"][0]
    status, body = r.post("/v1/labels", _ndjson(labels))
    assert status == 400 and body["reasons"] == {"invalid_label": WINDOW}, body
    assert r.metric("lrwatch_model_accuracy") is None or math.isnan(
        r.metric("lrwatch_model_accuracy"))
    assert r.daemon.counters["labels_joined"] == 0
    assert_balanced(r.daemon)

    rows = [_softmax_record(rng, i) for i in range(300)]
    for x in rows:
        x["label"] = "%02d" % x["label"]
    ref = build_reference(rows, calibrate=False)
    assert ref.estimator is None and "is not a class" in " ".join(ref.notes), ref.notes


# --- a reference rebuilt between two runs --------------------------------------------------------
def test_estimates_of_a_rebuilt_reference_are_not_compared_as_this_ones(
        binary_reference, tmp_path) -> None:
    """The estimates waiting for their labels were restored whatever reference made them:
    after `lrwatch baseline build` and a restart, the old estimator's errors were exported
    as the new one's (for up to 256 windows), so ``LrwatchEstimationInaccurate``, which asks
    for that rebuild, kept being fed. With the same reference they are still compared."""
    from lrwatch.daemon import Daemon, DaemonConfig

    rng = random.Random(49)
    rebuilt = build_reference([binary_record(rng, i) for i in range(1500)], window_size=WINDOW,
                              sims=200)
    rebuilt_path = str(tmp_path / "rebuilt.json")
    rebuilt.save(rebuilt_path)
    recs = [binary_record(rng, 5000 + i, t=1000.0 + i) for i in range(2 * WINDOW)]
    labels = [{"id": x["id"], "label": x.pop("label")} for x in recs]

    def run(state: str, reference: str, kind: str, body: list[dict[str, Any]]) -> Any:
        d = Daemon(DaemonConfig(reference=reference, window_size=WINDOW, port=0,
                                state_dir=state, log_alerts=False))
        d.start()
        try:
            status, out = d.submit(kind, _ndjson(body).encode())
            assert status == 200, out
            assert d.drain()
            return d.registry.get_sample_value("lrwatch_estimation_windows_compared_total")
        finally:
            d.stop(timeout=5)

    for name, second, compared in (("same", binary_reference, 2), ("rebuilt", rebuilt_path, 0)):
        state = str(tmp_path / name)
        assert run(state, binary_reference, "predictions", recs) == 0   # estimated, no labels
        assert run(state, second, "labels", labels) == compared, name


# --- the drop rule end to end, on a real dataset -------------------------------------------------
def test_the_drop_rule_fires_on_a_real_drop_and_not_on_an_unshifted_stream(tmp_path) -> None:
    """The audit's end-to-end check (not a defect): a scikit-learn model on breast cancer,
    a labelled reference of its jittered rows, then unlabelled windows through the daemon.
    Unshifted windows leave the serving pack's ``estimated_accuracy_drop`` quiet; windows
    selected towards hard examples (as ``benchmarks/performance_estimation.py`` builds its
    ``drop`` streams), whose realised accuracy is >= 3 points lower, fire it within 2."""
    datasets = pytest.importorskip("sklearn.datasets")
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from lrwatch.daemon import Daemon, DaemonConfig

    x, y = datasets.load_breast_cancer(return_X_y=True)
    x_tr, x_pool, y_tr, y_pool = train_test_split(x, y, train_size=0.4, stratify=y,
                                                  random_state=0)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000))
    model.fit(x_tr, y_tr)
    sd = x_tr.std(axis=0) * 0.1
    rng = np.random.default_rng(1)
    conf = np.abs(model.predict_proba(x_pool)[:, 1] - 0.5) + 0.5
    hard = np.exp(2.0 * (1.0 - conf) / 0.5)
    hard /= hard.sum()
    n = 0

    def rows(count: int, weights: np.ndarray | None, labelled: bool) -> tuple[list, float]:
        nonlocal n
        idx = rng.choice(len(y_pool), count, p=weights)
        xs = x_pool[idx] + rng.standard_normal((count, x.shape[1])) * sd
        p = model.predict_proba(xs)[:, 1]
        out = []
        for j, i in enumerate(idx):
            r = {"id": f"r{n}", "features": {f"f{c}": float(xs[j, c]) for c in range(4)},
                 "prediction": float(p[j])}
            if labelled:
                r["label"] = int(y_pool[i])
            out.append(r)
            n += 1
        return out, float(((p >= 0.5) == y_pool[idx]).mean())

    ref_rows, ref_acc = rows(2000, None, True)
    ref = build_reference(ref_rows, window_size=500, sims=200)
    assert ref.estimator is not None
    path = str(tmp_path / "reference.json")
    ref.save(path)
    d = Daemon(DaemonConfig(reference=path, window_size=500, port=0, log_alerts=False))
    d.start()
    try:
        fired = []
        for w in range(5):
            recs, acc = rows(500, hard if w >= 3 else None, False)
            status, body = d.submit("predictions", _ndjson(recs).encode())
            assert status == 200, body
            assert d.drain()
            fired.append("estimated_accuracy_drop" in d.engine.active)
            if w >= 3:
                assert acc <= ref_acc - 0.03, (w, acc, ref_acc)   # a real drop
            assert abs(d.last["values"]["estimated_accuracy"] - acc) < 0.03
        assert fired == [False, False, False, False, True]
    finally:
        d.stop(timeout=5)


def test_a_reference_of_lists_of_several_widths_says_why_it_fits_no_estimator() -> None:
    """Lists of 3 and 4 class probabilities (two model versions) fitted no estimator, with
    numpy's "inhomogeneous shape" message as the reason."""
    rng = random.Random(50)
    rows = [_softmax_record(rng, i, k=3 if i % 2 else 4) for i in range(200)]
    ref = build_reference(rows, calibrate=False)
    assert ref.estimator is None
    (note,) = ref.notes
    assert "not lists of one width (widths [3, 4]" in note and "inhomogeneous" not in note


def test_labelled_rows_without_a_prediction_do_not_cost_the_reference_its_estimator(
        tmp_path) -> None:
    """Two of 300 labelled rows without a prediction (an empty CSV cell, a JSONL record
    without the key) fitted no estimator, with "proba has 2 NaN or infinite values" as the
    reason; they are left out of the fit, as unlabelled rows are."""
    from lrwatch.daemon import read_data

    rng = random.Random(51)
    rows = [binary_record(rng, i) for i in range(300)]
    jsonl, csv = tmp_path / "ref.jsonl", tmp_path / "ref.csv"
    jsonl.write_text("".join(json.dumps({k: v for k, v in r.items()
                                         if not (i in (3, 4) and k == "prediction")}) + "\n"
                             for i, r in enumerate(rows)))
    csv.write_text("x,y,prediction,label\n" + "".join(
        f"{r['features']['x']},{r['features']['y']},"
        f"{'' if i in (3, 4) else r['prediction']},{r['label']}\n" for i, r in enumerate(rows)))
    for path in (jsonl, csv):
        ref = build_reference(read_data(str(path)), calibrate=False)
        assert ref.prediction_type == "probability" and not ref.notes, (path, ref.notes)
        assert ref.estimator is not None and ref.estimator["reference_rows"] == 298


# --- a reference with nothing to calibrate on ------------------------------------------------------
def _always_right(rng: random.Random, i: int) -> dict[str, Any]:
    """A 3-class model sure enough on its reference to be right on every row."""
    label = rng.randrange(3)
    top = rng.uniform(0.7, 1.0)
    rest = (1.0 - top) * rng.random()
    p = [0.0, 0.0, 0.0]
    p[label], p[(label + 1) % 3], p[(label + 2) % 3] = top, rest, 1.0 - top - rest
    return {"id": f"a{i}", "features": {"x": rng.gauss(0, 1)}, "prediction": p, "label": label}


def test_a_reference_the_model_is_always_right_on_fits_no_estimator() -> None:
    """A multiclass model right on every labelled reference row (an easy problem, a small
    sample) fitted an estimator whose every window read 100% with a band of zero width,
    however unsure the window's predictions, so the drop rule could never fire. Binary labels
    of one class likewise read every class-1 prediction as wrong, for sure. Neither fits one
    now; the note says what to add."""
    rng = random.Random(52)
    rows = [_always_right(rng, i) for i in range(300)]
    ref = build_reference(rows, calibrate=False)
    assert ref.proba_width == 3 and ref.estimator is None, ref.estimator
    (note,) = ref.notes
    assert "right on every one of the 300 labelled reference rows" in note
    with pytest.raises(ConfigError, match="labels are all 0"):
        PerformanceEstimator.fit(np.linspace(0.01, 0.99, 100), np.zeros(100, dtype=int))
    # one wrong row is enough to calibrate on
    rows[0]["label"] = (rows[0]["label"] + 1) % 3
    assert build_reference(rows, calibrate=False).estimator is not None


def test_a_reference_of_one_confidence_fits_no_estimator() -> None:
    """A model that sends hard one-hot outputs (or one constant probability) has one
    confidence on every reference row: the calibrators had one point to learn from, so a
    window of real probabilities extrapolated to an estimated accuracy of 0 with a drop of
    10^5 standard errors (the reference's spread was 0)."""
    rng = random.Random(53)
    rows = []
    for i in range(300):
        c = rng.randrange(3)
        rows.append({"id": f"h{i}", "features": {"x": rng.gauss(0, 1)},
                     "prediction": [1.0 if j == c else 0.0 for j in range(3)],
                     "label": c if rng.random() < 0.7 else (c + 1) % 3})
    ref = build_reference(rows, calibrate=False)
    assert ref.proba_width == 3 and ref.estimator is None, ref.estimator
    (note,) = ref.notes
    assert "confidence is 1 on every one of the 300 labelled reference rows" in note
    with pytest.raises(ConfigError, match="confidence is 0.7 on every one"):
        PerformanceEstimator.fit(np.full(100, 0.7), np.arange(100) % 2)
