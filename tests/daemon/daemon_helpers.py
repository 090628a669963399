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
