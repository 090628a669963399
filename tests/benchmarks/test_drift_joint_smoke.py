"""Smoke test of the drift benchmark's decorrelation variants and held-out data sets.

Structural checks on tiny runs (a decorrelation window keeps every marginal, the held-out data
sets load, the JSON has the numbers the docs quote); the benchmark's numbers are not asserted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import drift_detection as bench  # noqa: E402


@pytest.mark.parametrize("variant", ["decor_1", "decor_3"])
def test_decorrelation_keeps_marginals_and_breaks_the_relation(variant: str) -> None:
    x, cat, _ = bench.dataset("breast_cancer")
    calm, _ = bench.make_window(x, cat, np.random.default_rng(0), 1000, "none", 0.1, feat=5)
    moved, _ = bench.make_window(x, cat, np.random.default_rng(0), 1000, variant, 0.1, feat=5)
    hit = bench.decor_features(5, variant, x.shape[1])
    assert len(hit) == (1 if variant == "decor_1" else 3)
    for j in range(x.shape[1]):
        if j in hit:
            assert np.array_equal(np.sort(calm[:, j]), np.sort(moved[:, j]))
            assert not np.array_equal(calm[:, j], moved[:, j])
        else:
            assert np.array_equal(calm[:, j], moved[:, j])
    j = hit[0]
    others = [k for k in range(x.shape[1]) if k not in hit]
    before = max(abs(np.corrcoef(calm[:, j], calm[:, k])[0, 1]) for k in others)
    after = max(abs(np.corrcoef(moved[:, j], moved[:, k])[0, 1]) for k in others)
    assert after < 0.15 < before


@pytest.mark.parametrize("name", ["wine", "diabetes", "digits"])
def test_held_out_datasets_load(name: str) -> None:
    x, cat, names = bench.dataset(name)
    assert x.shape[1] == len(names) >= 10 and len(cat) == len(x)
    assert set(cat) <= set("abcd") and np.isfinite(x).all()


def test_tiny_run_reports_joint_numbers(tmp_path: Path) -> None:
    out = tmp_path / "drift.json"
    res = bench.main(["--dataset", "wine", "--references", "1", "--null-windows", "4",
                      "--streams", "1", "--windows", "4", "--anchor-null-windows", "1",
                      "--variants", "decor_1,decor_3", "--target-windows", "100",
                      "--json", str(out)])
    saved = json.loads(out.read_text())
    assert res is not None and saved["dataset"] == "wine" and saved["held_out"]
    assert saved["target_rate"] == pytest.approx(0.01) and saved["joint"]
    assert saved["false_alarms"]["lrwatch"]["windows"] == 4
    assert set(saved["false_alarm_sources"]) == {"per_feature", "joint", "both"}
    for v in ("decor_1", "decor_3"):
        lr = saved["detection"][v]["lrwatch"]
        assert lr["n"] == 1 and 0.0 <= lr["within_3"] <= 1.0
        assert saved["detection"][v]["ks_bonferroni"]["n"] == 1
    assert saved["ms_per_window"]["lrwatch"]["median"] > 0
