"""Helpers shared by the daemon tests (imported by name: conftest puts this folder on the
path)."""

from __future__ import annotations

import random
from typing import Any

WINDOW = 100


def make_record(rng: random.Random, i: int, shift: float = 0.0, **extra: Any) -> dict[str, Any]:
    return {"id": f"r{i}", "features": {"x": rng.gauss(shift, 1.0), "y": rng.gauss(0.0, 1.0),
                                        "c": rng.choice("abc")},
            "prediction": rng.random(), **extra}


def assert_balanced(daemon: Any) -> None:
    """``accepted + rejected == received``, in the counters and in the metrics."""
    from lrwatch.daemon.records import REASONS

    assert daemon.drain()
    c = daemon.counters
    assert c["predictions"] + c["labels"] + sum(c["errors"].values()) == c["received"]
    m = daemon.registry.get_sample_value
    errors = sum(m("lrwatch_ingest_errors_total", {"reason": x}) for x in REASONS)
    assert m("lrwatch_predictions_total") + m("lrwatch_labels_total") + errors == \
        m("lrwatch_ingest_received_total")
