"""Hard outputs on part of the traffic against a reference whose largest confidence is exactly
1.0 on many rows (docs/design.md, Open item 6; docs/performance-estimation.md, "Windows outside
the reference's confidences"): can a test of the *share* of a window's rows at the reference's
largest confidence tell them from ordinary windows?

Neither of the support checks sees them: no row can be above 1.0, and only part of the window
is at it. A third exact test would be: ``k`` of the window's ``n`` rows at or above the
reference's largest confidence, reached by ``t`` of its ``m`` rows; under the null (window and
reference rows exchangeable), ``k`` is hypergeometric (``n`` draws from ``n + m`` rows of which
``k + t`` are at the top), and its upper tail is the p-value. A covariate shift towards the
model's surest rows raises ``k`` too, which is why it was not adopted unmeasured. This script
scores the test, with a floor on the excess share, on the windows of
``benchmarks/performance_estimation.py``: ordinary windows (none, selection, hard, noise) of
the cases whose reference saturates (``t > 1``), and unshifted windows with 30% of their rows
made hard outputs. Nothing is chosen here; it prints the separation.

    python benchmarks/support_share_check.py --mode shared
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):            # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from scipy.stats import hypergeom  # noqa: E402

from benchmarks import performance_estimation as pe  # noqa: E402

ORDINARY = ("none", "selection", "hard", "noise")


def share_test(conf: np.ndarray, top: float, t: int, m: int) -> tuple[float, float]:
    """The window's excess share at the top (its share minus the reference's) and the
    hypergeometric upper-tail p-value of its count there."""
    n = len(conf)
    k = int((conf >= top).sum())
    p = float(hypergeom.sf(k - 1, n + m, k + t, n)) if k else 1.0
    return k / n - t / m, p


def run(mode: str, datasets: list[str], models: list[str], windows: int) -> list[dict[str, Any]]:
    from lrwatch.daemon.estimation import PerformanceEstimator
    from lrwatch.daemon.support import confidence

    rows: list[dict[str, Any]] = []
    for ds in datasets:
        for mn in models:
            for seed in (0, 1):
                case = pe.make_case(ds, mn, seed, 0.1, mode)
                est = PerformanceEstimator.fit(case.ref_proba, case.ref_y, seed=case.seed)
                top, t, m = est.support_top, est.support_top_rows, est.reference_rows
                if top is None or t < 2:
                    continue   # the existing checks see hard outputs there
                rng = np.random.default_rng(case.seed * 7919 + 3)
                lvl = pe.noise_level(case, rng)
                plan = [(v, pe.weights(case, v), lvl if v == "noise" else 0.0)
                        for v in ORDINARY if not (v == "noise" and lvl is None)]
                for variant, w, noise in plan + [("hard_outputs_30", None, 0.0)]:
                    for _ in range(windows):
                        p, _ = pe.window(case, rng, w, noise)
                        if variant == "hard_outputs_30":
                            p = pe.hard_outputs(p, 0.3, rng)
                        withheld = bool(est.estimate(p).get("withheld"))
                        excess, pval = share_test(confidence(p), top, t, m)
                        rows.append({"dataset": ds, "model": mn, "seed": seed,
                                     "variant": variant, "excess": excess, "p": pval,
                                     "withheld": withheld, "top_share": t / m})
        print(f"done {ds}", file=sys.stderr, flush=True)
    return rows


def report(rows: list[dict[str, Any]]) -> None:
    hard = [r for r in rows if r["variant"] == "hard_outputs_30" and not r["withheld"]]
    ords = [r for r in rows if r["variant"] != "hard_outputs_30"]
    print(f"cases whose reference saturates: "
          f"{len({(r['dataset'], r['model'], r['seed']) for r in rows})}; 30%-hard windows "
          f"the existing checks miss: {len(hard)}; ordinary windows: {len(ords)}")
    for v in ORDINARY + ("hard_outputs_30",):
        sel = [r for r in rows if r["variant"] == v and not r["withheld"]]
        if sel:
            ex = np.array([r["excess"] for r in sel])
            lp = np.array([math.log10(max(r["p"], 1e-300)) for r in sel])
            print(f"{v:16s} windows {len(sel):4d}  excess share at the top: median "
                  f"{np.median(ex):+.3f}, max {ex.max():+.3f}, min {ex.min():+.3f}; log10 p: "
                  f"median {np.median(lp):.1f}, min {lp.min():.1f}")
    print("| alpha | excess floor | 30%-hard caught | ordinary windows flagged (by variant) |")
    print("|---|---:|---:|---|")
    for alpha in (1e-6, 1e-10, 1e-20):
        for floor in (0.0, 0.1, 0.15, 0.2):
            def flag(r: dict[str, Any]) -> bool:
                return r["p"] < alpha and r["excess"] >= floor
            caught = np.mean([flag(r) for r in hard]) if hard else float("nan")
            by = {v: sum(flag(r) for r in ords if r["variant"] == v) for v in ORDINARY}
            print(f"| {alpha:g} | {floor:g} | {100 * caught:.0f}% | {by} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=pe.MODES, default="shared")
    ap.add_argument("--datasets", default=",".join(pe.REAL))
    ap.add_argument("--models", default="forest,gnb,mlp,hgb,svc,logreg")
    ap.add_argument("--windows", type=int, default=6)
    a = ap.parse_args(argv)
    report(run(a.mode, a.datasets.split(","), a.models.split(","), a.windows))


if __name__ == "__main__":
    main()
