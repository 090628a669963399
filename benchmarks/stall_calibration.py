"""How often the ``stall`` detector calls an improving run stalled: its stated false-call rate.

``loss_plateau`` (the ``stall`` detector) fires when, with 95% confidence, the loss improves by
less than 1% (log units) per window, the window a quarter of the run so far. Its docstring
states the price: a run that improves by exactly ``progress`` per window is called stalled with
probability about ``1 - confidence`` per decision, and less the faster it improves. This script
measures that on synthetic losses ``t**-c`` (which improve by ``c * log(4/3)`` per window at any
length) with multiplicative noise: independent (the detector's assumption) and AR(1)
(correlated batches, a slow oscillation: where the bound is too narrow and calls more often).

    python benchmarks/stall_calibration.py                  # ~20 s, prints the table
    python benchmarks/stall_calibration.py --reps 2 --steps 500 --json out.json
    python benchmarks/stall_calibration.py --long 100000    # + stall episodes per long run

The second table (``--long N``) is what the default cut costs a healthy run without a
scheduler: each stall episode (the verdict turning true, at least 40 steps after the last one:
the rule's cooldown) halves its rate, so it counts the episodes over runs of ``N`` values, per
exponent.

Pure Python: no torch, no data.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):            # run as a script: make `lrwatch` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lrwatch.rules.detectors.stall import Stall  # noqa: E402

#: Power-law exponents: the per-window improvement c * log(4/3) is 1% (the threshold), 2%, 3%.
EXPONENTS = (0.0348, 0.0695, 0.1043)
NOISES = (("iid", 0.05, 0.0), ("iid", 0.3, 0.0), ("ar1", 0.1, 0.5), ("ar1", 0.1, 0.9))


def false_calls(c: float, sigma: float, phi: float, steps: int, reps: int,
                seed: int) -> dict[str, Any]:
    """Decisions made on ``reps`` runs of ``steps`` values, and how many called a stall."""
    rng = random.Random(seed)
    calls = decisions = 0
    scale = math.sqrt(1.0 - phi * phi)   # AR(1) with the same marginal spread as iid noise
    for _ in range(reps):
        det = Stall()
        e = rng.gauss(0.0, sigma)
        for t in range(1, steps + 1):
            e = phi * e + scale * rng.gauss(0.0, sigma)
            due = det._next              # the detector decides when its count reaches this
            verdict = det.update(t ** -c * math.exp(e))
            if det._n == due and det._n >= det.min_window and det._next != due:
                decisions += 1
                calls += bool(verdict)
    return {"decisions": decisions, "calls": calls,
            "rate": calls / decisions if decisions else math.nan}


def episodes(c: float, sigma: float, steps: int, reps: int, seed: int,
             cooldown: int = 40) -> dict[str, Any]:
    """Stall episodes per run of ``steps`` values ``t**-c`` with iid noise: a verdict that
    turns true ``cooldown`` or more steps after the last episode began (the rule fires once
    per episode; each firing would be one cut)."""
    rng = random.Random(seed)
    counts, firsts = [], []
    for _ in range(reps):
        det, last, n, was = Stall(), None, 0, False
        for t in range(1, steps + 1):
            now = bool(det.update(t ** -c * math.exp(rng.gauss(0.0, sigma))))
            if now and not was and (last is None or t - last >= cooldown):
                if last is None:
                    firsts.append(t)
                last, n = t, n + 1
            was = now
        counts.append(n)
    return {"mean": sum(counts) / reps, "max": max(counts), "runs_with_any": sum(
        k > 0 for k in counts), "first_median": sorted(firsts)[len(firsts) // 2]
        if firsts else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4000, help="values per run (default 4000)")
    p.add_argument("--reps", type=int, default=30, help="runs per row (default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--long", type=int, default=0, metavar="N",
                   help="also count stall episodes (cuts) per run of N values (10 runs per "
                        "exponent, noise 10%%)")
    a = p.parse_args(argv)
    rows = []
    print("| noise | sigma | phi | per-window improvement | decisions | called stalled |")
    print("|---|---|---|---|---|---|")
    for kind, sigma, phi in NOISES:
        for c in EXPONENTS:
            r = false_calls(c, sigma, phi, a.steps, a.reps, a.seed)
            improvement = c * math.log(4.0 / 3.0)
            rows.append({"noise": kind, "sigma": sigma, "phi": phi, "c": c,
                         "improvement_per_window": improvement, **r})
            print(f"| {kind} | {sigma:g} | {phi:g} | {improvement:.1%} | {r['decisions']} | "
                  f"{r['rate']:.2%} |", flush=True)
    long_rows = []
    if a.long:
        print(f"\n| per-window improvement | stall episodes per run of {a.long:,} values "
              f"(mean, max; 10 runs) | runs with any | median step of the first |")
        print("|---|---|---|---|")
        for c in (*EXPONENTS, 2 * EXPONENTS[-1]):
            r = episodes(c, 0.1, a.long, 10, a.seed)
            long_rows.append({"c": c, "improvement_per_window": c * math.log(4.0 / 3.0), **r})
            print(f"| {c * math.log(4.0 / 3.0):.1%} | {r['mean']:.1f}, {r['max']} | "
                  f"{r['runs_with_any']}/10 | {r['first_median']} |", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"benchmark": "stall_calibration", "steps": a.steps,
                                            "reps": a.reps, "rows": rows,
                                            "long": long_rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
