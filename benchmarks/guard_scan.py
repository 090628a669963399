"""The gradient guard's spike rule replayed on recorded traces: how often it would hold a step
of a healthy run, and how often twice within ``good_after`` steps (the second hold is a
failure, ``dropped_again``, and rolls the run back), for the shipped fixed ratio and for
candidates (issue 13; docs/recovery.md, "Blind set AJ").

Every healthy run of every detection cache under ``benchmarks/.cache/detection-*`` (the
suite's and the blind sets' recorded traces; none is recorded here) is replayed through the
guard's rule as :class:`lrwatch.probe.HostGradGuard` states it: a step's gradient norm over
the median of the last 50 kept norms, once 20 exist; a held step does not enter the median.
Candidates:

``fixed R``
    hold above ``R`` (the shipped rule with ``guard_ratio=R``; 100 by default).
``adaptive F xM``
    hold above ``max(F, M x the largest ratio of a kept step so far)``: a run whose ordinary
    steps spike (a NALU, a keypoint locator) raises its own threshold, a quiet one keeps a
    low one (a poisoned batch 40x a quiet pointer network's median is held).

Prints the table, and per task the largest kept ratio before step 150 of its tuned runs (the
threshold an adaptive rule would stand at when the recovery benchmark's one-off fault hits).
Nothing is chosen here. ``--skip`` leaves caches out (a blind set not to be read).

    python benchmarks/guard_scan.py --skip taskfile_ak      # seconds
"""

from __future__ import annotations

import argparse
import collections
import json
import math
from pathlib import Path
from typing import Callable, Iterator, Sequence

CACHES = Path(__file__).resolve().parent / ".cache"
WINDOW, WARMUP, GOOD_AFTER = 50, 20, 50
Rule = Callable[[float], float]   # the largest kept ratio so far -> the threshold
RULES: dict[str, Rule] = {
    "fixed 100 (shipped)": lambda m: 100.0,
    "fixed 30": lambda m: 30.0,
    "adaptive 20 x3": lambda m: max(20.0, 3.0 * m),
    "adaptive 30 x3": lambda m: max(30.0, 3.0 * m),
    "adaptive 20 x2": lambda m: max(20.0, 2.0 * m),
}


def held_steps(norms: Sequence[float | None], rule: Rule) -> tuple[list[int], float]:
    """The indices the rule holds (non-finite ones too), and the largest kept ratio."""
    kept: list[float] = []
    held: list[int] = []
    largest = 0.0
    for t, g in enumerate(norms):
        if g is None or not math.isfinite(g):
            held.append(t)
            continue
        if len(kept) >= WARMUP:
            last = sorted(kept[-WINDOW:])
            med = last[(len(last) - 1) // 2]
            r = g / med if med > 0 else math.inf
            if r > rule(largest):
                held.append(t)
                continue
            largest = max(largest, r)
        kept.append(g)
    return held, largest


def healthy_runs(skip: Sequence[str]) -> Iterator[tuple[str, dict, list[float | None]]]:
    for cache in sorted(CACHES.glob("detection-*")):
        if any(s in cache.name for s in skip) or not (cache / "labels.json").exists():
            continue
        for run in json.loads((cache / "labels.json").read_text())["runs"]:
            if run["kind"] != "healthy":
                continue
            lines = (cache / run["trace"]).read_text().splitlines()
            yield cache.name, run, [json.loads(x).get("grad_norm") for x in lines if x]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip", action="append", default=[],
                    help="leave out caches whose name contains this (repeatable)")
    a = ap.parse_args(argv)
    counts = {k: collections.Counter() for k in RULES}
    before_150: dict[str, list[float]] = collections.defaultdict(list)
    for _, run, norms in healthy_runs(a.skip):
        tuned = run["spec"]["lr_mult"] == 1.0
        for name, rule in RULES.items():
            held, _ = held_steps(norms, rule)
            twice = any(b - a_ <= GOOD_AFTER for a_, b in zip(held, held[1:]))
            c = counts[name]
            c["runs"] += 1
            c["tuned"] += tuned
            c["held"] += bool(held)
            c["twice"] += twice
            c["tuned_twice"] += tuned and twice
        if tuned:
            shipped = RULES["fixed 100 (shipped)"]
            before_150[run["spec"]["task"]].append(held_steps(norms[:150], shipped)[1])
    print("| rule | healthy runs with a held step | ... held twice within 50 steps | "
          "tuned runs held twice |")
    print("|---|---:|---:|---:|")
    for name, c in counts.items():
        print(f"| {name} | {c['held']}/{c['runs']} | {c['twice']}/{c['runs']} | "
              f"{c['tuned_twice']}/{c['tuned']} |")
    print("\n| task | largest kept ratio before step 150, tuned runs: max | median |")
    print("|---|---:|---:|")
    for task, v in sorted(before_150.items()):
        print(f"| {task} | {max(v):.1f} | {sorted(v)[len(v) // 2]:.1f} |")


if __name__ == "__main__":
    main()
