"""What the start check's adoptions do, run by run (issue 13; docs/recovery.md, "The start
check: what its adoptions do, on 36 families").

The start check (``RecoveryConfig.start_check``) trains a *shadow* of the run for its first 10
steps at a tenth of the rate, scores both on the next 6 batches, and adopts the tenth when the
shadow does better with 95% confidence -- behind a gate that opens only when one of steps 2-8
met its batch at more than 1.05x the untouched network's loss on it. This benchmark replays
that decision offline for every task, optimizer, rate multiplier (x1, x3, x10, x30) and seed,
and for every run it would cut, trains both continuations to the budget: the run kept at its
rate, and the run at a tenth from the start (14 steps shorter, what an adoption costs). Each
is scored against the family's healthy band (the recovery benchmark's: within 2 points of the
tuned runs' median, 5% of the range for MSE tasks), and the cut is counted as

``help``     the kept run ends outside the band, the tenth inside;
``harm``     the kept run ends inside, the tenth outside;
``both``     both inside;  ``neither``: both outside.

It also reports the runs at the tuned rate (x1) that the check would cut. It reads no
lrwatch state: the gate (:func:`lrwatch.recovery.start_check.worst_ratio`) and the test
(:func:`lrwatch.recovery.start_check.compare`) are the shipped functions, the training is
``benchmarks/families.py``'s.

    python benchmarks/start_check_adoptions.py                      # the suite, seeds 0,1
    python benchmarks/start_check_adoptions.py --tasks-from my_tasks.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):            # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import families as fam  # noqa: E402
from benchmarks import recovery as R  # noqa: E402
from benchmarks import recovery_ceiling as C  # noqa: E402

MULTS = (1.0, 3.0, 10.0, 30.0)
STEPS, HELD_OUT, GATE, COST = 10, 6, 1.05, 14   # RecoveryConfig's defaults


def _losses(task: Any, model: torch.nn.Module, batches: Sequence[Any]) -> list[float]:
    from lrwatch.recovery.lr_find import reference_loss

    return [reference_loss(model, lambda m, b: task.loss(m(b[0]), b[1]), b) for b in batches]


def decide(t: str, o: str, m: float, s: int) -> dict[str, Any]:
    """The check's inputs and verdict for one run (no training past its first steps)."""
    from lrwatch.recovery.start_check import compare, worst_ratio

    task = fam.TASKS[t]
    lr = task.base_lr[o] * m
    data = task.load(s)
    it = R._fam_stream(task, data, s)
    ahead = [next(it) for _ in range(STEPS + HELD_OUT)]
    torch.manual_seed(s)
    untouched = task.build(data)
    untrained = _losses(task, untouched, ahead[:8])
    torch.manual_seed(s)
    model = task.build(data)
    opt = fam.make_optimizer(o, model, lr)
    met = []
    for xb, yb in ahead[:STEPS]:
        loss = task.loss(model(xb), yb)
        met.append(float(loss.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    real = _losses(task, model, ahead[STEPS:])
    shadow_model, _ = C._scheduled(t, o, s, lambda i: lr * 0.1, STEPS)
    shadow = _losses(task, shadow_model, ahead[STEPS:])
    ratio = worst_ratio(met[:8], untrained)
    v = compare(real, shadow)
    return {"task": t, "opt": o, "mult": m, "seed": s, "gate": ratio, "adopt": v.adopt,
            "t": v.t, "real": v.real, "shadow": v.shadow,
            "untrained": sum(_losses(task, untouched, ahead[STEPS:])) / HELD_OUT,
            "cut": v.adopt and (ratio is None or ratio > GATE)}


def outcome(row: dict[str, Any]) -> dict[str, Any]:
    """Both continuations of a run the check cuts, to the budget, and the verdict."""
    t, o, m, s = row["task"], row["opt"], row["mult"], row["seed"]
    task = fam.TASKS[t]
    lr, budget = task.base_lr[o] * m, R.fam_steps(task)
    _, keep = C._scheduled(t, o, s, lambda i: lr, budget)
    _, tenth = C._scheduled(t, o, s, lambda i: lr * 0.1, budget - COST)
    med, unt = C._ref(t, o)
    k = R.fam_close(task, keep, med, unt, 2.0)
    ten = R.fam_close(task, tenth, med, unt, 2.0)
    kind = {(False, True): "help", (True, False): "harm", (True, True): "both",
            (False, False): "neither"}[(bool(k), bool(ten))]
    return {**row, "keep": keep, "tenth": tenth, "median": med, "outcome": kind}


def _one(args: tuple[str, str, float, int]) -> dict[str, Any]:
    torch.set_num_threads(1)
    row = decide(*args)
    return outcome(row) if row["cut"] else row


def run(tasks: Sequence[str], opts: Sequence[str], seeds: Sequence[int], jobs: int = 1,
        mults: Sequence[float] = MULTS, progress: Any = lambda msg: None) -> dict[str, Any]:
    for t in tasks:            # the healthy medians first (cached bare runs), in this process
        for o in opts:
            C._ref(t, o)
    work = [(t, o, m, s) for t in tasks for o in opts for m in mults for s in seeds]
    rows: list[dict[str, Any]] = []
    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            for row in pool.imap_unordered(_one, work):
                rows.append(row)
                if len(rows) % 20 == 0:
                    progress(f"  {len(rows)}/{len(work)} runs")
    else:
        threads = torch.get_num_threads()
        try:
            rows = [_one(w) for w in work]
        finally:
            torch.set_num_threads(threads)
    rows.sort(key=lambda r: (r["task"], r["opt"], r["mult"], r["seed"]))
    counts = Counter(r["outcome"] for r in rows if r["cut"])
    tuned = [r for r in rows if r["mult"] == 1.0]
    return {"rows": rows, "cuts": sum(r["cut"] for r in rows), "runs": len(rows),
            "outcomes": {k: counts.get(k, 0) for k in ("help", "harm", "both", "neither")},
            "tuned_cut": sum(r["cut"] for r in tuned), "tuned": len(tuned)}


def table(res: dict[str, Any]) -> str:
    o = res["outcomes"]
    lines = [f"runs {res['runs']}; the check cuts {res['cuts']} "
             f"(tuned runs cut: {res['tuned_cut']}/{res['tuned']})",
             "| help | harm | both in the band | neither |", "|---|---|---|---|",
             f"| {o['help']} | {o['harm']} | {o['both']} | {o['neither']} |"]
    bad = [f"{r['task']}/{r['opt']}/x{r['mult']:g}/s{r['seed']}" for r in res["rows"]
           if r.get("outcome") == "harm"]
    if bad:
        lines.append("harmed: " + ", ".join(bad))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--tasks", default=None, help="comma-separated (default: all)")
    ap.add_argument("--opts", default=None, help="comma-separated (default: all)")
    ap.add_argument("--mults", default=None, help="comma-separated (default: 1,3,10,30)")
    ap.add_argument("--tasks-from", default=None, metavar="FILE",
                    help="families from a task file (benchmarks/external.py)")
    ap.add_argument("--jobs", type=int, default=2, help="processes (default 2)")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write every row")
    a = ap.parse_args(argv)
    try:
        tasks, opts = R.family_args(a.tasks_from, a.tasks, a.opts)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mults = tuple(float(x) for x in a.mults.split(",")) if a.mults else MULTS
    res = run(tasks, opts, [int(x) for x in a.seeds.split(",")], a.jobs, mults,
              progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(table(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
