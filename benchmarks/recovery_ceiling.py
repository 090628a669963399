"""How far can any recovery go on the family suite? Three measurements for issue 13.

The issue asks for 90% of would-diverge runs within 2 points of the family's healthy median
(the median of the tuned rate's runs on seeds 0-2; 5% of the range for MSE tasks), on a
300-step budget. What bounds that, measured on the recovery benchmark's own selection
(``benchmarks/recovery.py --families``: every multiplier x3, x10, x30 whose bare run ends
outside the band):

``ceiling`` (default; reads the cached bare runs, seconds)
    An oracle that knows the tuned rate and restarts at it after ``s`` steps: the run's own
    tuned run, stopped ``s`` steps short of the budget (its evaluations every 20 steps), in the
    band? At ``s = 0`` this is the tuned run itself: the band is narrower than the spread
    between seeds of the tuned runs on some families, so even a perfect restart misses there.
``--cuts`` (trains, ~4 min per seed on 2 cores)
    One cut of the rate by ``f`` at step ``s`` of the run, from the run's own state (what a
    mid-run "rate too high" verdict could do without going back): would-diverge runs healed
    and tuned runs kept.
``--second-check`` (trains, ~3 min per seed)
    The start check (``RecoveryConfig.start_check``, docs/recovery.md "The start check") run a
    second time, 10 steps after it adopted a tenth: a shadow from the adopted state at a
    hundredth of the configured rate. How often it would adopt, and what that would do.
``--mid-check`` (trains, ~1 min per seed)
    The pre-flight range test (``RecoveryConfig.lr_check``) run from the state at step 20 or
    40 instead of the untrained one: does a sharper, trained network show its rate past the
    edge? Cuts of tuned runs, cuts of would-diverge runs, and what a restart from the start at
    the rate it gives (with the budget left) scores.

    python benchmarks/recovery_ceiling.py                       # the oracle, seeds 0-2
    python benchmarks/recovery_ceiling.py --cuts --seeds 0
    python benchmarks/recovery_ceiling.py --mid-check --seeds 0
    python benchmarks/recovery_ceiling.py --second-check --seeds 0
    python benchmarks/recovery_ceiling.py --tasks-from my_tasks.py --seeds 0,1

docs/recovery.md ("What bounds the would-diverge target") has the numbers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

if __package__ in (None, ""):            # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import families as fam  # noqa: E402
from benchmarks import recovery as R  # noqa: E402

DELAYS = (0, 20, 40, 60, 80, 100, 140)
CUTS = tuple((s, f) for s in (30, 60, 100, 150) for f in (0.3, 0.1))
CHECK_AT = (20, 40)
CHECK_STEPS = 11      # the pre-flight check's default
CHECK_COST = 15       # its booking: 11 steps + 12 forwards at a third


def _ref(t: str, o: str) -> tuple[float, float]:
    task = fam.TASKS[t]
    med = statistics.median(R.fam_value(task, R.fam_run(t, o, 1.0, s)) for s in R.FAM_SEEDS)
    return med, R.fam_run(t, o, 1.0, R.FAM_SEEDS[0])["untrained"]["loss"]


def selection(tasks: Sequence[str], opts: Sequence[str], seeds: Sequence[int]
              ) -> Iterator[tuple[str, str, float, int, float, float]]:
    """(task, optimizer, multiplier, seed, healthy median, untrained loss): the tuned runs
    (multiplier 1) and the would-diverge runs of the recovery benchmark."""
    for t in tasks:
        task = fam.TASKS[t]
        for o in opts:
            med, unt = _ref(t, o)
            for s in seeds:
                yield t, o, 1.0, s, med, unt
                for m in R.FAM_MULTS:
                    if R.fam_bare_diverged(task, R.fam_run(t, o, m, s), med, unt):
                        yield t, o, m, s, med, unt


def ceiling(rows: Sequence[tuple]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": 0, "by_delay": {d: 0 for d in DELAYS}, "by_family": {}}
    for t, o, m, s, med, unt in rows:
        if m == 1.0:
            continue
        task = fam.TASKS[t]
        evals = {int(a): b for a, b in R.fam_run(t, o, 1.0, s)["evals"]}
        steps = R.fam_steps(task)
        out["n"] += 1
        f = out["by_family"].setdefault(task.family, [0, 0])
        f[1] += 1
        for d in DELAYS:
            v = evals.get(steps - d)
            if v is not None and R.fam_close(task, v, med, unt, 2.0):
                out["by_delay"][d] += 1
                f[0] += d == 0
    return out


def _train(t: str, o: str, lr: float, seed: int, steps: int, *, cut_at: int | None = None,
           factor: float = 1.0) -> tuple[Any, Any, Iterator[Any], float]:
    """A bare run of ``steps`` steps at ``lr`` (cut by ``factor`` at step ``cut_at``); the
    model, optimizer, the rest of its stream, and its score."""
    task = fam.TASKS[t]
    data = task.load(seed)
    torch.manual_seed(seed)
    model = task.build(data)
    opt = fam.make_optimizer(o, model, lr)
    it = R._fam_stream(task, data, seed)
    done = 0
    while done < steps:
        xb, yb = next(it)
        if done == cut_at:
            for g in opt.param_groups:
                g["lr"] *= factor
        loss = task.loss(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done += 1
        if not math.isfinite(float(loss.detach())):
            break
    final = R._fam_score(task, data, model)
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    value = R.fam_value(task, {"final": final, "finite": finite and math.isfinite(final["loss"])})
    return model, opt, it, value


def cuts(rows: Sequence[tuple]) -> dict[str, Any]:
    out = {f"{s}/{f}": {"healed": 0, "tuned": 0} for s, f in CUTS}
    for t, o, m, s, med, unt in rows:
        task = fam.TASKS[t]
        for at, f in CUTS:
            _, _, _, v = _train(t, o, task.base_lr[o] * m, s, R.fam_steps(task), cut_at=at,
                                factor=f)
            if R.fam_close(task, v, med, unt, 2.0):
                out[f"{at}/{f}"]["tuned" if m == 1.0 else "healed"] += 1
    return out


def mid_check(rows: Sequence[tuple]) -> dict[str, Any]:
    from lrwatch.recovery.probe import check_rate

    out = {str(at): {"tuned_cut": 0, "cut": 0, "healed": 0} for at in CHECK_AT}
    for t, o, m, s, med, unt in rows:
        task = fam.TASKS[t]
        lr = task.base_lr[o] * m
        for at in CHECK_AT:
            model, opt, it, _ = _train(t, o, lr, s, at)
            first = list(itertools.islice(it, CHECK_STEPS))
            factor, _ = check_rate(model, opt, None, None, first,
                                   lambda mod, b, task=task: task.loss(mod(b[0]), b[1]), lr,
                                   CHECK_STEPS)
            if factor is None:
                continue
            if m == 1.0:
                out[str(at)]["tuned_cut"] += 1
                continue
            out[str(at)]["cut"] += 1
            _, _, _, v = _train(t, o, lr * factor, s, R.fam_steps(task) - at - CHECK_COST)
            out[str(at)]["healed"] += R.fam_close(task, v, med, unt, 2.0)
    return out


def _held_out(task: Any, model: Any, batches: Sequence[Any]) -> list[float]:
    from lrwatch.recovery.lr_find import reference_loss

    return [reference_loss(model, lambda m, b: task.loss(m(b[0]), b[1]), b) for b in batches]


def _scheduled(t: str, o: str, seed: int, rates: Any, steps: int) -> tuple[Any, float]:
    """A bare run whose rate at step ``i`` is ``rates(i)``: its model and score."""
    task = fam.TASKS[t]
    data = task.load(seed)
    torch.manual_seed(seed)
    model = task.build(data)
    opt = fam.make_optimizer(o, model, rates(0))
    it = R._fam_stream(task, data, seed)
    for i in range(steps):
        for g in opt.param_groups:
            g["lr"] = rates(i)
        xb, yb = next(it)
        loss = task.loss(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not math.isfinite(float(loss.detach())):
            break
    final = R._fam_score(task, data, model)
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return model, R.fam_value(task, {"final": final,
                                     "finite": finite and math.isfinite(final["loss"])})


def second_check(rows: Sequence[tuple]) -> dict[str, Any]:
    """The start check at step 10 (a tenth against the run), and where it adopts, again at step
    20 from the adopted state (a hundredth against the tenth); both budgets less 2 x 14."""
    from lrwatch.recovery.start_check import compare

    n, k = 10, 6
    out = {"adopted": 0, "adopted_again": 0, "healed_once": 0, "healed_twice": 0}
    for t, o, m, s, med, unt in rows:
        if m == 1.0:
            continue
        task = fam.TASKS[t]
        lr = task.base_lr[o] * m
        data = task.load(s)
        it = R._fam_stream(task, data, s)
        ahead = [next(it) for _ in range(2 * n + k)]
        real, _ = _scheduled(t, o, s, lambda i: lr, n)
        shadow, _ = _scheduled(t, o, s, lambda i: lr * 0.1, n)
        if not compare(_held_out(task, real, ahead[n:n + k]),
                       _held_out(task, shadow, ahead[n:n + k])).adopt:
            continue
        out["adopted"] += 1
        budget = R.fam_steps(task) - 28
        tenth, _ = _scheduled(t, o, s, lambda i: lr * 0.1, 2 * n)
        hundredth, _ = _scheduled(t, o, s, lambda i: lr * (0.1 if i < n else 0.01), 2 * n)
        again = compare(_held_out(task, tenth, ahead[2 * n:]),
                        _held_out(task, hundredth, ahead[2 * n:])).adopt
        _, once = _scheduled(t, o, s, lambda i: lr * 0.1, budget)
        twice = once
        if again:
            out["adopted_again"] += 1
            _, twice = _scheduled(t, o, s, lambda i: lr * (0.1 if i < n else 0.01), budget)
        out["healed_once"] += R.fam_close(task, once, med, unt, 2.0)
        out["healed_twice"] += R.fam_close(task, twice, med, unt, 2.0)
    return out


def measure(rows: Sequence[tuple], a: argparse.Namespace) -> dict[str, Any]:
    """Run the measurements ``a`` asks for on ``rows`` and print their tables."""
    res: dict[str, Any] = {"ceiling": ceiling(rows)}
    c = res["ceiling"]
    n, tuned = c["n"], sum(r[2] == 1.0 for r in rows)
    print(f"would-diverge runs: {n}; tuned runs: {tuned} (seeds {a.seeds})")
    print("| restart at the tuned rate after | in the band |\n|---|---|")
    for d in DELAYS:
        k = c["by_delay"][d]
        print(f"| {d} steps | {k}/{n} ({k / max(n, 1):.0%}) |")
    print("by family (after 0 steps): " + ", ".join(
        f"{f} {k}/{m}" for f, (k, m) in sorted(c["by_family"].items())))
    if a.cuts:
        res["cuts"] = cuts(rows)
        print("| one cut at step s by f | would-diverge healed | tuned kept |\n|---|---|---|")
        for key, v in res["cuts"].items():
            s, f = key.split("/")
            print(f"| step {s}, x{f} | {v['healed']}/{n} | {v['tuned']}/{tuned} |")
    if a.mid_check:
        res["mid_check"] = mid_check(rows)
        print("| range test at step | tuned runs cut | would-diverge cut | healed by a restart "
              "at its rate |\n|---|---|---|---|")
        for at, v in res["mid_check"].items():
            print(f"| {at} | {v['tuned_cut']}/{tuned} | {v['cut']}/{n} | {v['healed']} |")
    if a.second_check:
        sc = res["second_check"] = second_check(rows)
        print(f"start check at step 10 adopts a tenth in {sc['adopted']}/{n} would-diverge runs; "
              f"a second check at step 20 adopts a hundredth in {sc['adopted_again']} of them; "
              f"healed: {sc['healed_once']} with one check, {sc['healed_twice']} with two")
    return res


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the selection (default 0,1,2)")
    ap.add_argument("--tasks", default=None, help="comma-separated tasks (default: all)")
    ap.add_argument("--opts", default=None, help="comma-separated optimizers (default: all)")
    ap.add_argument("--tasks-from", default=None, metavar="FILE",
                    help="families from a task file (benchmarks/external.py); the recovery "
                         "benchmark's cache for it")
    ap.add_argument("--cuts", action="store_true", help="also one rate cut at step s by f")
    ap.add_argument("--mid-check", action="store_true",
                    help="also the pre-flight range test from the state at step 20 and 40")
    ap.add_argument("--second-check", action="store_true",
                    help="also a second start check 10 steps after one that adopted a tenth")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write the results")
    a = ap.parse_args(argv)
    try:
        tasks, opts = R.family_args(a.tasks_from, a.tasks, a.opts)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seeds = [int(x) for x in a.seeds.split(",")]
    rows = list(selection(tasks, opts, seeds))
    res = measure(rows, a)
    res.update(seeds=seeds, tasks=list(tasks))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
