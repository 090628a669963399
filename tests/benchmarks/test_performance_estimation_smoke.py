"""Smoke test of the performance-estimation benchmark on a tiny size (no NannyML).

Structural checks: the shifts really shift, the drop streams really drop, the leave-one-dataset-
out choice never looks at the held-out dataset, and a run produces every table and the JSON.
The benchmark's numbers are not asserted here.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import performance_estimation as bench  # noqa: E402


@pytest.fixture(scope="module")
def case() -> bench.Case:
    return bench.make_case("breast_cancer", "forest", 0, 0.1)


def test_variants_shift_the_pool_as_described(case):
    rng = np.random.default_rng(0)
    none = [bench.window(case, rng, None) for _ in range(3)]
    hard = [bench.window(case, rng, bench.weights(case, "hard")) for _ in range(3)]
    conf = lambda ws: np.mean([bench.naive(p) for p, _ in ws])  # noqa: E731
    assert conf(hard) < conf(none) - 0.01
    sel = bench.weights(case, "selection")
    col = case.pool_x[:, case.feature]
    assert sel[col > np.median(col)].sum() > 0.7
    s = bench.drop_strength(case)
    assert s is not None
    w = bench.weights(case, "hard", s)
    assert case.pool_correct.mean() - w @ case.pool_correct >= 0.04


def test_shared_mode_draws_the_reference_from_the_pool_rows():
    c = bench.make_case("iris", "logreg", 0, 0.1, mode="shared")
    assert len(c.ref_y) == bench.SHARED_REFERENCE
    d = bench.make_case("iris", "logreg", 0, 0.1, mode="disjoint")
    assert len(d.ref_y) + len(d.pool_y) < 110


def _row(dataset: str, k: int, errs: dict[str, float]) -> dict:
    return {"dataset": dataset, "variant": "none", "k": k, "realised": 0.9,
            "lrwatch": {n: {"accuracy": 0.9 + e} for n, e in errs.items()}}


def test_lodo_choice_ignores_the_held_out_dataset():
    names = list(bench.CONFIGS)
    good, bad = names[0], names[1]
    errs = {n: 0.05 for n in names}
    rows = [_row("a", 2, dict(errs, **{good: 0.0})), _row("b", 3, dict(errs, **{good: 0.0})),
            _row("c", 2, dict(errs, **{bad: 0.0, good: 0.5}))]
    assert bench.lodo_choice(rows, "c") == good
    assert bench.lodo_choice([rows[2]], None) == bad  # c alone would have chosen otherwise
    chosen = bench.attach_lodo(rows)
    assert chosen["c"] == good and rows[2]["lr"] is rows[2]["lrwatch"][good]


def test_tiny_run_writes_every_table(tmp_path):
    out = tmp_path / "pe.json"
    args = bench.parse_args(["--seeds", "1", "--windows", "2", "--datasets", "breast_cancer,iris",
                             "--models", "logreg", "--out", str(out)])
    res = bench.run(args)
    saved = json.loads(out.read_text())
    assert set(saved["modes"]) == set(bench.MODES)
    for mode in bench.MODES:
        s = saved["modes"][mode]
        for d, c in s["lodo_choice"].items():
            assert d not in c["tuned_on"] and c["config"] in bench.CONFIGS
        table = s["mae_real_by_variant"]
        assert {"none/binary", "hard/multiclass", "selection/binary"} <= set(table)
        for t in table.values():
            assert math.isfinite(t["lrwatch"]) and math.isfinite(t["naive"])
            assert t["nannyml"] is None  # not run here
        assert s["detection"]["false_alarms_per_100"]["windows"] > 0
        # hard outputs on every row are withheld; the ordinary windows keep their estimates
        sup = s["support"]
        for kd in ("binary", "multiclass"):
            hard = sup[f"hard_outputs/{kd}"]
            assert hard["withheld"] == hard["windows"] > 0 and hard["extrapolated_mae"] >= 0
            assert sup[f"none/{kd}"]["withheld"] == 0
        for cov in s["band_coverage"]["by_dataset"].values():
            assert cov["scale"] in bench.CAL_SCALES
            assert all(0.0 <= cov[v] <= 1.0 for v in bench.VARIANTS)
    assert res["timing"]["ms_per_window"] > 0 and res["nannyml"] == {"skipped": True}
    bench.print_tables(res)
