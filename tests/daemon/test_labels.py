"""Labels against a reference of class probabilities must be classes of that model, as
``lrwatch baseline build`` requires of the reference's own labels: anything else is
``invalid_label`` (counted, with what to send), never a made-up accuracy."""

from __future__ import annotations

import json
import random

from daemon_helpers import WINDOW, make_record


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
