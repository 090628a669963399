"""Ablation for issue 13: the pre-flight learning-rate check on the family suite.

Question: does ``recovery={"lr_check": "auto"}`` (a budget-counted range test on the first
batches before the first step; ``RecoveryConfig.lr_check``) heal the would-diverge
configurations that no rule acts on -- runs that never learn, language models stuck at a
constant prediction, 3x runs that learn worse -- without hurting runs at the tuned rate?

For every task and optimizer of ``benchmarks/recovery.py --families``: the tuned rate (x1) and
every multiplier whose bare run ended outside the band (x3, x10, x30: the suite's selection, per
seed). Each is run with the suite's default arm (fixed factors) and with the same Watcher plus
the check (``lr_check_steps`` 11, 15 or 30); the check's cost counts against the budget: its
steps plus its forwards of the fixed batch at a third of a step (11 steps: 11 + 4 = 15, 5% of
the 300-step budget). Judged like the suite: within 2 points (5% of the range for MSE tasks)
of the healthy median of seeds 0-2. Nothing here is tuned: the range (``lr/1000 .. 10 lr``),
the clamp rule (:func:`lrwatch.recovery.curve.preflight_turn`: the fixed batch's loss rose
above its start at a rate up to the configured one and never came back) and the 0.3 of the
largest stable rate are the range test's defaults (``docs/lr-find.md``). Seed 0 is the
suite's; seeds 1 and 2 select and run configurations the suite never ran.

    python benchmarks/recovery_preflight.py                 # seed 0, 11 steps (~10-20 min)
    python benchmarks/recovery_preflight.py --seed 1
    python benchmarks/recovery_preflight.py --steps 15
    python benchmarks/recovery_preflight.py --cost          # a forward's cost, in steps
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import families as fam  # noqa: E402
from benchmarks import recovery as R  # noqa: E402


def _configs(seed: int) -> Iterator[tuple[str, Any, str, float, float]]:
    """(task name, task, optimizer, multiplier, healthy median) of every configuration the
    check is scored on: the tuned rate, and each multiplier whose bare run diverged."""
    for t in R.FAM_TASKS:
        task = fam.TASKS[t]
        for o in R.FAM_OPTS:
            ref = statistics.median(R.fam_value(task, R.fam_run(t, o, 1.0, s))
                                    for s in R.FAM_SEEDS)
            unt = R.fam_run(t, o, 1.0, R.FAM_SEEDS[0])["untrained"]["loss"]
            for m in (1.0,) + R.FAM_MULTS:
                if m == 1.0 or R.fam_bare_diverged(task, R.fam_run(t, o, m, seed), ref, unt):
                    yield t, task, o, m, ref


def _rows(seed: int, arm: str) -> list[dict[str, Any]]:
    rows = []
    for t, task, o, m, ref in _configs(seed):
        unt = R.fam_run(t, o, 1.0, seed)["untrained"]["loss"]
        checked = R.fam_run(t, o, m, seed, arm=arm)
        fixed = R.fam_run(t, o, m, seed, arm="fixed")
        row = {"task": t, "family": task.family, "opt": o, "mult": m,
               "lr_scale": checked.get("lr_scale"),
               "check": R.fam_close(task, R.fam_value(task, checked), ref, unt, 2.0),
               "fixed": R.fam_close(task, R.fam_value(task, fixed), ref, unt, 2.0),
               "probe_steps": checked.get("probe_steps")}
        rows.append(row)
        print(f"{t} {o} x{m:g}: with the check "
              f"{'ok' if row['check'] else 'miss'} ({row['probe_steps']} probe steps), "
              f"fixed arm {'ok' if row['fixed'] else 'miss'}", file=sys.stderr, flush=True)
    return rows


def decisions(seed: int, steps: int) -> list[dict[str, Any]]:
    """What the check decides on each configuration of :func:`_rows` (the same selection),
    without training: :func:`lrwatch.recovery.probe.check_rate` on the model, optimizer and
    first batches that ``fam_run`` would start from. Cheap (one range test each)."""
    import itertools

    import torch

    from lrwatch.recovery.probe import check_rate

    out = []
    for t, task, o, m, _ref in _configs(seed):
        data = task.load(seed)
        torch.manual_seed(seed)
        model = task.build(data)
        lr = task.base_lr[o] * m
        opt = fam.make_optimizer(o, model, lr)
        first = list(itertools.islice(R._fam_stream(task, data, seed), steps))
        factor, _ = check_rate(model, opt, None, None, first,
                               lambda mod, b, task=task: task.loss(mod(b[0]), b[1]), lr, steps)
        out.append({"task": t, "family": task.family, "opt": o, "mult": m, "factor": factor})
    return out


def forward_cost(repeats: int = 3, n: int = 40) -> dict[str, float]:
    """Per task: the wall time of a forward without gradient (the check's reference forward)
    over that of a training step (Adam, one CPU thread), the best of ``repeats``."""
    import itertools
    import time

    import torch

    torch.set_num_threads(1)
    out = {}
    for t in R.FAM_TASKS:
        task = fam.TASKS[t]
        data = task.load(0)
        torch.manual_seed(0)
        model = task.build(data)
        opt = fam.make_optimizer("adam", model, task.base_lr["adam"])
        bs = list(itertools.islice(R._fam_stream(task, data, 0), n))

        def step(b: Any) -> None:
            opt.zero_grad(set_to_none=True)
            loss = task.loss(model(b[0]), b[1])
            loss.backward()
            opt.step()
            float(loss.detach())

        def forward(b: Any) -> None:
            with torch.no_grad():
                float(task.loss(model(b[0]), b[1]))

        best = []
        for fn in (step, forward):
            fn(bs[0])
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for b in bs:
                    fn(b)
                times.append(time.perf_counter() - t0)
            best.append(min(times))
        out[t] = best[1] / best[0]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=11, choices=(11, 15, 30),
                    help="the check's range-test steps (default 11: with its forwards, 5%% of "
                         "the budget)")
    ap.add_argument("--decisions", action="store_true",
                    help="only what the check decides per configuration (no training runs)")
    ap.add_argument("--cost", action="store_true",
                    help="measure a forward's cost in training steps per task, and stop")
    ap.add_argument("--seed", type=int, default=0, help="seed of the runs (default 0)")
    args = ap.parse_args(argv)
    if args.cost:
        for t, ratio in forward_cost().items():
            print(f"{t}: a forward costs {ratio:.2f} of a training step")
        return 0
    logging.getLogger("lrwatch").setLevel(logging.ERROR)
    if args.decisions:
        dec = decisions(args.seed, args.steps)
        for kind, sel in (("tuned rate", [d for d in dec if d["mult"] == 1.0]),
                          ("would-diverge", [d for d in dec if d["mult"] != 1.0])):
            cut = [d for d in sel if d["factor"] is not None]
            print(f"seed {args.seed}, {kind}: rate cut on {len(cut)} of {len(sel)}")
            for d in cut:
                print(f"  {d['task']} {d['opt']} x{d['mult']:g}: x{d['factor']:.3g}")
        return 0
    rows = _rows(args.seed, f"lr_check{args.steps}")
    print(f"\nseed {args.seed}, check of {args.steps} steps\n")
    print("| family | would-diverge | with the check | fixed arm (default) | tuned rate kept "
          "healthy: with / without |")
    print("|---|---|---|---|---|")
    fams = sorted({r["family"] for r in rows}) + ["**all**"]
    for f in fams:
        sel = [r for r in rows if f == "**all**" or r["family"] == f]
        div = [r for r in sel if r["mult"] != 1.0]
        tuned = [r for r in sel if r["mult"] == 1.0]
        print(f"| {f} | {len(div)} | {sum(r['check'] for r in div)}/{len(div)} | "
              f"{sum(r['fixed'] for r in div)}/{len(div)} | "
              f"{sum(r['check'] for r in tuned)} / {sum(r['fixed'] for r in tuned)} of "
              f"{len(tuned)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
