"""A binary model that sends its class probabilities as ``[p0, p1]`` in some records and as
the class-1 probability ``p1`` in others (two client versions, say): the daemon reads both as
``p1`` (docs/daemon.md, "Record schema"), so a reference built from such records is one of
class-1 probabilities, with its estimator, and the live records of either form are kept."""

from __future__ import annotations

import json
import math
import random
from typing import Any

from daemon_helpers import WINDOW, assert_balanced
from lrwatch.daemon import build_reference


def _mixed(rng: random.Random, i: int) -> dict[str, Any]:
    x = rng.gauss(0.0, 1.0)
    p = round(1.0 / (1.0 + math.exp(-2.0 * x)), 6)
    return {"id": f"q{i}", "features": {"x": x, "y": rng.gauss(0.0, 1.0)},
            "prediction": [round(1.0 - p, 6), p] if i % 2 else p,
            "label": int(rng.random() < p)}


def test_a_reference_of_both_forms_is_one_of_class_1_probabilities() -> None:
    rng = random.Random(1)
    ref = build_reference([_mixed(rng, i) for i in range(1000)], calibrate=False)
    assert ref.prediction_type == "probability" and ref.proba_width is None
    assert ref.estimator is not None and not ref.notes, ref.notes
    pred = next(f for f in ref.features if f.name == "_prediction")
    assert pred.kind == "numeric" and 0.0 <= pred.min and pred.max <= 1.0


def test_a_live_reference_of_both_forms_keeps_taking_both(run_daemon) -> None:
    rng = random.Random(2)
    r = run_daemon(reference=None, live_records=1000)
    recs = [_mixed(rng, i) for i in range(1000 + 3 * WINDOW)]
    status, body = r.post("/v1/predictions", "\n".join(json.dumps(x) for x in recs))
    assert status == 200 and body["accepted"] == len(recs), body
    r.daemon.drain()
    ref = r.daemon.reference
    assert ref is not None and ref.prediction_type == "probability"
    assert ref.estimator is not None
    # the records after the reference's, validated before it was known: [p0, p1] is p1 there
    # too (read as the class index 0/1, the prediction "drifted")
    assert r.daemon.counters["windows"] == 3
    assert r.daemon.last["values"]["prediction_drift"] == 0.0
    later = [_mixed(rng, i) for i in range(5000, 5000 + WINDOW)]
    status, body = r.post("/v1/predictions", "\n".join(json.dumps(x) for x in later))
    assert status == 200 and body == {"accepted": WINDOW, "rejected": 0}, body
    est = r.metric("lrwatch_estimated_accuracy")
    assert est is not None and 0.6 < est < 0.9
    assert r.daemon.last["values"]["prediction_drift"] == 0.0
    assert_balanced(r.daemon)
