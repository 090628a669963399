"""`benchmarks/firing_probe.py`: the four probe arms on a replayed run, and how runs are grouped.
The measurement's numbers are not asserted here."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import family_runs as fr  # noqa: E402
from benchmarks import firing_probe  # noqa: E402


def test_firing_probe_measures_four_arms_on_a_replayed_run() -> None:
    spec = fr.RunSpec("synth_ae", "adam", "constant", 1.0, seed=0)
    run = {"id": fr.run_id(spec), "kind": "healthy", "label": "healthy", "onset": None,
           "spec": spec.to_json()}
    arms = firing_probe.probe(run, step=12, steps=3)
    assert arms is not None and set(arms) == {"start x1", "start x0.1", "now x1", "now x0.1"}
    assert all(math.isfinite(v) and v > 0 for v in arms.values())
    assert firing_probe.group(run, 12) == "healthy (false alarm)"
    reset = {**run, "kind": "never_learned", "label": "diverged", "onset": 8,
             "spec": {**run["spec"], "fault": "never_learned", "onset": 8}}
    assert firing_probe.group(reset, 80) == "injected reset" and firing_probe.group(reset, 5) is None
