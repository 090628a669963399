"""Labels against a reference of class probabilities must be classes of that model, as
``lrwatch baseline build`` requires of the reference's own labels: anything else is
``invalid_label`` (counted, with what to send), never a made-up accuracy.

Predictions in [0, 1] are a binary classifier's probabilities or a regression's outputs (a
click-through rate): the reference's labels tell which, so that a regression's real-valued
labels are kept and scored as errors instead of all being refused."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest

from daemon_helpers import WINDOW, make_record
from lrwatch.daemon import Daemon, DaemonConfig, Reference, build_reference
from lrwatch.daemon.records import dumps
from lrwatch.daemon.reference import profile_records


def test_labels_that_are_no_class_of_a_binary_model_are_invalid_label(run_daemon):
    r = run_daemon()  # the reference's predictions are class-1 probabilities
    d = r.daemon
    rng = random.Random(9)
    recs = [make_record(rng, i, prediction=0.9) for i in range(WINDOW)]
    assert r.post("/v1/predictions", recs)[0] == 200
    bad = ["yes", 2, "1.0", -1, 0.5]
    status, out = r.post("/v1/labels", [{"id": f"r{i}", "label": v}
                                        for i, v in enumerate(bad)])
    assert status == 400 and out["reasons"] == {"invalid_label": 5}
    assert "not a class" in out["errors"][0] and "send 0 or 1" in out["errors"][0]
    good = [1, True, "1", 1.0]
    status, out = r.post("/v1/labels", [{"id": f"r{10 + i}", "label": v}
                                        for i, v in enumerate(good)])
    assert status == 200 and out["accepted"] == 4
    # inline labels, on every path (JSON array, NDJSON through the chunk decoder)
    inline = [make_record(rng, 500 + i, prediction=0.9, label=v) for i, v in enumerate(bad)]
    status, out = r.post("/v1/predictions",
                         inline + [make_record(rng, 600, prediction=0.1, label=0)])
    assert out["accepted"] == 1 and out["reasons"] == {"invalid_label": 5}
    ndjson = "\n".join(json.dumps(x) for x in
                       [make_record(rng, 700, prediction=0.1, label=0),
                        make_record(rng, 701, label="yes")])
    assert r.post("/v1/predictions", ndjson)[1]["reasons"] == {"invalid_label": 1}
    assert r.post("/v1/predictions", [make_record(rng, 800 + i, prediction=0.9)
                                      for i in range(WINDOW)])[0] == 200
    d.drain()
    assert d.counters["errors"]["invalid_label"] == 5 + 5 + 1
    # the good labels joined predictions of their class: all right
    assert d.last["values"]["model_accuracy"] == 1.0


def _ctr(rng: random.Random, i: int, *, label: str | None = "share") -> dict[str, Any]:
    """A regression of a click-through rate: a prediction in (0, 1), not a probability of a
    class, and its label the share of clicks seen (``"share"``), a 0/1 label of a binary
    classifier with the same outputs (``"class"``), or none."""
    x = rng.gauss(0.0, 1.0)
    p = round(0.05 + 0.4 / (1.0 + math.exp(-x)), 6)
    r: dict[str, Any] = {"id": f"r{i}", "features": {"x": x, "y": rng.gauss(0.0, 1.0)},
                         "prediction": p}
    if label == "share":
        r["label"] = round(min(1.0, max(0.0, p + rng.gauss(0.0, 0.05))), 4)
    elif label == "class":
        r["label"] = int(rng.random() < p)
    return r


def _saved(tmp_path: Any, ref: Reference) -> str:
    path = str(tmp_path / "reference.json")
    ref.save(path)
    return path


@pytest.mark.parametrize("labels, kind, basis", [
    ([0.37, 0.0, 1.0, 0.5], "regression", "labels"),   # values, some of them 0/1
    ([3, 0, 1, 2], "regression", "labels"),            # numbers, not all 0/1
    ([0, 1, True, "1", 1.0, None], "probability", "labels"),
    ([None, None], "probability", None),               # no labels: read as before
    (["yes", "no"], "probability", None),              # class names: nothing to go by
    ([0.5, "no"], "probability", None),
])
def test_the_labels_tell_a_regression_in_0_1_from_probabilities(labels, kind, basis):
    rng = random.Random(1)
    rows = [_ctr(rng, i, label=None) for i in range(40)]
    for r, v in zip(rows, labels):
        if v is not None:
            r["label"] = v
    ref = profile_records(rows)
    assert (ref.prediction_type, ref.prediction_basis) == (kind, basis)
    d = ref.to_dict()
    assert ("prediction_basis" in d) == (basis is not None)  # the old format, when unset
    assert Reference.from_dict(d).prediction_basis == basis


def test_integer_or_wide_predictions_are_not_decided_by_the_labels():
    rows = [{"features": {"x": i}, "prediction": i % 2, "label": 0.5} for i in range(20)]
    assert profile_records(rows).prediction_type == "class"
    rows = [{"features": {"x": i}, "prediction": i / 7, "label": i % 2} for i in range(20)]
    assert profile_records(rows).prediction_type == "regression"  # outside [0, 1]


def test_a_regression_in_0_1_keeps_its_fractional_labels_and_reports_an_error(
        run_daemon, tmp_path):
    rng = random.Random(2)
    ref = build_reference([_ctr(rng, i) for i in range(1500)], window_size=WINDOW, sims=300)
    assert ref.prediction_type == "regression" and ref.prediction_basis == "labels"
    assert ref.estimator is None   # no probabilities to estimate an accuracy from
    path = _saved(tmp_path, ref)
    assert Reference.load(path).prediction_type == "regression"
    r = run_daemon(reference=path)
    d = r.daemon
    assert not d.limits.binary_probability and not d.ingest.limits.binary_probability
    recs = [_ctr(rng, i, label=None) for i in range(WINDOW)]
    assert r.post("/v1/predictions", recs)[0] == 200
    labels = [0.37, 0.0, 1.0, 0.125, 0.9]
    status, out = r.post("/v1/labels", [{"id": f"r{i}", "label": v}
                                        for i, v in enumerate(labels)])
    assert status == 200 and out["accepted"] == len(labels) and not out.get("reasons")
    # inline fractional labels too, on the JSON array and the NDJSON paths
    inline = [_ctr(rng, 500 + i) for i in range(4)]
    status, out = r.post("/v1/predictions", inline[:2])
    assert status == 200 and out["accepted"] == 2
    status, out = r.post("/v1/predictions", "\n".join(json.dumps(x) for x in inline[2:]))
    assert status == 200 and out["accepted"] == 2
    assert r.post("/v1/predictions", [_ctr(rng, 800 + i, label=None)
                                      for i in range(WINDOW)])[0] == 200
    d.drain()
    assert d.counters["errors"].get("invalid_label", 0) == 0
    errs = [abs(p["prediction"] - v) for p, v in zip(recs, labels)] + \
        [abs(x["prediction"] - x["label"]) for x in inline]
    vals = d.last["values"]
    assert "model_accuracy" not in vals and "estimated_accuracy" not in vals
    assert vals["model_error"] == pytest.approx(sum(errs) / len(errs))
    assert r.metric("lrwatch_model_error") == pytest.approx(sum(errs) / len(errs))


def test_a_binary_classifier_with_0_1_reference_labels_still_refuses_other_labels(
        run_daemon, tmp_path):
    rng = random.Random(3)
    ref = build_reference([_ctr(rng, i, label="class") for i in range(1500)],
                          window_size=WINDOW, sims=300)
    assert ref.prediction_type == "probability" and ref.prediction_basis == "labels"
    assert ref.estimator is not None
    r = run_daemon(reference=_saved(tmp_path, ref))
    assert r.daemon.limits.binary_probability and r.daemon.limits.binary_from_labels
    recs = [_ctr(rng, i, label=None) for i in range(WINDOW)]
    assert r.post("/v1/predictions", recs)[0] == 200
    status, out = r.post("/v1/labels", [{"id": f"r{i}", "label": v}
                                        for i, v in enumerate([2, "yes", 0.37])])
    assert status == 400 and out["reasons"] == {"invalid_label": 3}
    for err in out["errors"]:   # its own labels were classes: no regression to suggest
        assert "send 0 or 1" in err and "regression" not in err
    status, out = r.post("/v1/labels", [{"id": "r10", "label": 1}, {"id": "r11", "label": 0}])
    assert status == 200 and out["accepted"] == 2


def test_a_fractional_label_against_a_reference_without_labels_says_what_to_do(
        run_daemon, reference_path):
    with open(reference_path) as fh:   # built from predictions in [0, 1] without labels
        assert "prediction_basis" not in json.load(fh)
    r = run_daemon()
    assert r.daemon.limits.binary_probability and not r.daemon.limits.binary_from_labels
    rng = random.Random(4)
    assert r.post("/v1/predictions", [make_record(rng, i) for i in range(WINDOW)])[0] == 200
    status, out = r.post("/v1/labels", [{"id": f"r{i}", "label": v}
                                        for i, v in enumerate([0.37, 2, "yes"])])
    assert status == 400 and out["reasons"] == {"invalid_label": 3}
    frac, two, yes = out["errors"]
    assert "label 0.37 is not a class" in frac and "send 0 or 1" in frac
    assert "regression with outputs in [0, 1]" in frac and "with its labels" in frac
    assert "regression" not in two and "regression" not in yes   # no regression's labels
    status, out = r.post("/v1/predictions", [make_record(rng, 900, label=0.37)])
    assert status == 400 and "regression with outputs in [0, 1]" in out["errors"][0]


def test_a_live_reference_with_fractional_inline_labels_is_a_regression():
    d = Daemon(DaemonConfig(window_size=WINDOW, port=0, log_alerts=False,
                            calibration_sims=200, live_records=200))
    d.start()
    try:
        rng = random.Random(5)
        recs = [_ctr(rng, i) for i in range(200 + 2 * WINDOW)]
        for k in range(0, len(recs), WINDOW):
            d.submit("predictions", "\n".join(dumps(x) for x in recs[k:k + WINDOW]).encode())
        assert d.drain(timeout=120)
        assert d.status()["reference"]["prediction_type"] == "regression"
        assert d.counters["errors"].get("invalid_label", 0) == 0
        assert "model_error" in d.last["values"]
    finally:
        d.stop(timeout=5)
