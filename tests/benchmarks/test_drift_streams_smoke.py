"""Smoke test of the generated drift streams (benchmarks/drift_streams.py) on a tiny size.

Structural checks: each stream has the tails and atoms its description claims, a numeric shift
moves the feature by the asked number of standard deviations, the categorical shuffle keeps the
category's shares, and a run writes the JSON. The benchmark's rates are not asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import drift_streams as bench  # noqa: E402


def _kurtosis(x: np.ndarray) -> np.ndarray:
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    return (z ** 4).mean(axis=0) - 3.0


def test_the_streams_are_what_they_say() -> None:
    rng = np.random.default_rng(0)
    amounts, _ = bench.STREAMS["amounts8"]().draw(rng, 50_000)
    assert (amounts > 0).all() and (_kurtosis(amounts) > 20).all()  # far from Gaussian
    zinfl, _ = bench.STREAMS["zinfl6"]().draw(rng, 50_000)
    share0 = (zinfl == 0).mean(axis=0)
    assert ((share0 > 0.15) & (share0 < 0.65)).all()
    counts, _ = bench.STREAMS["negbin8"]().draw(rng, 50_000)
    assert np.array_equal(counts, np.round(counts))
    x, cats = bench.STREAMS["mixcat"]().draw(rng, 50_000)
    assert set(cats) == {"c1", "c2", "c3"} and x.shape == (50_000, 6)
    assert abs((cats["c3"] == "z").mean() - 0.005) < 0.002


def test_a_shift_moves_one_feature_by_delta_sds() -> None:
    s = bench.STREAMS["tmix10"]()
    a, _ = s.draw(np.random.default_rng(1), 200_000)
    b, _ = s.draw(np.random.default_rng(1), 200_000, shift=(3, 0.25))
    moved = (b.mean(axis=0) - a.mean(axis=0)) / s.sd
    assert moved[3] == pytest.approx(0.25, abs=1e-9)
    assert np.allclose(np.delete(moved, 3), 0.0)


def test_a_tiny_run_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "streams.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "drift_streams.py"),
                          "--streams", "mixcat", "--references", "1", "--null-windows", "3",
                          "--json", str(out)], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert "mixcat" in res.stdout
    data = json.loads(out.read_text())
    (row,) = data["results"]
    assert row["windows"] == 3 and len(row["per_reference"]) == 1


def test_the_category_shuffle_keeps_the_shares() -> None:
    b = bench.Bench(bench.STREAMS["mixcat"](), "mixcat", 0, 100.0)
    x, cats = b.stream.draw(np.random.default_rng(2), bench.WINDOW)
    before = {k: (cats["c1"] == k).sum() for k in ("lo", "mid", "hi")}
    rng = np.random.default_rng(3)
    idx = rng.permutation(bench.WINDOW)[:500]
    cats["c1"][idx] = cats["c1"][rng.permutation(idx)]
    assert before == {k: (cats["c1"] == k).sum() for k in ("lo", "mid", "hi")}
    b.det.reset()
    assert isinstance(b.window(shuffle=("c1", 1.0)), bool)
