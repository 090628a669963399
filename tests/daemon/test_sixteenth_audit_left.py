"""Defects the sixteenth round's audit of ``lrwatch daemon`` found and left (6 December), fixed
after it: each reproduced with a real daemon serving HTTP on a loopback port (or a real
process) fed by real clients."""

from __future__ import annotations

import json
import random
from typing import Any, Callable

import pytest

from daemon_helpers import WINDOW, make_record


@pytest.fixture(scope="module")
def regression_reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    from lrwatch.daemon import build_reference

    rng = random.Random(161)
    ref = build_reference([make_record(rng, i, prediction=rng.gauss(10.0, 3.0))
                           for i in range(1500)], window_size=WINDOW, sims=200, seed=0)
    assert ref.prediction_type == "regression"
    path = str(tmp_path_factory.mktemp("reg") / "reference.json")
    ref.save(path)
    return path


def test_the_mean_error_of_finite_errors_near_the_float_range_is_finite(
        run_daemon: Callable[..., Any], regression_reference: str) -> None:
    """100 labels each 2e307 away from their predictions: the window's error sum overflowed,
    so ``lrwatch_model_error`` read +Inf while the mean error is 2e307. The mean is kept as a
    running mean too, used when the sum overflows."""
    d = run_daemon(reference=regression_reference)
    rng = random.Random(162)
    recs = [make_record(rng, i, prediction=2e307, label=0.0) for i in range(WINDOW)]
    recs.append(make_record(rng, WINDOW, prediction=10.0))  # opens the next window
    status, out = d.post("/v1/predictions", "\n".join(map(json.dumps, recs)))
    assert status == 200 and out["accepted"] == WINDOW + 1
    assert d.metric("lrwatch_model_error") == pytest.approx(2e307, rel=1e-9)
    status, body = d.get("/v1/status")
    assert json.loads(body)["last_window"]["values"]["model_error"] == pytest.approx(2e307)


def test_the_status_document_is_a_copy_the_worker_cannot_change_while_it_is_written(
        run_daemon: Callable[..., Any]) -> None:
    """``/v1/status`` handed the worker's live ``counters`` to the HTTP thread to serialise: a
    key the worker added meanwhile (a label held early, a rule's first firing, a new problem)
    could raise "dictionary changed size during iteration" there, a 500. The status holds a
    copy now: what the worker adds after it was taken is not in it (the worker runs here
    between taking the status and reading it, as it can between the HTTP thread's two
    steps)."""
    d = run_daemon()
    st = d.daemon.status()
    counters, errors = st["counters"], st["counters"]["errors"]
    keys, errors_then = set(counters), dict(errors)
    assert "labels_early" not in keys
    status, out = d.post("/v1/labels", [{"id": "not-yet", "label": 1}])  # held: a new key
    assert status == 200
    status, out = d.post("/v1/predictions", "not json")  # a new reason in the nested dict
    assert status == 400
    assert d.daemon.drain()
    assert "labels_early" in d.daemon.counters
    assert d.daemon.counters["errors"]["invalid_json"] == errors_then["invalid_json"] + 1
    assert set(counters) == keys and errors == errors_then
    status, body = d.get("/v1/status")
    assert status == 200 and json.loads(body)["counters"]["labels_early"] == 1
