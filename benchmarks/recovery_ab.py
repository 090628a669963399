"""Two recovery settings side by side on the recovery benchmark's family protocol.

A change to the self-healing defaults is judged against the same runs with the default turned
off, in one invocation (these machines are noisy; each run is cached by its settings and the
code's hash, ``benchmarks/recovery.py`` ``fam_run``). Each part is scored as in
``python benchmarks/recovery.py --families``:

``faults``
    one-off faults (a NaN batch, a poisoned batch) on the tuned run: within 1 point (5% of the
    range for MSE tasks) of the bare run without the fault, and of the watched one;
``tuned``
    the tuned run watched: within 2 points of the healthy median (seeds 0-2);
``wd``
    every rate x3, x10, x30 whose bare run ended outside the band ("would-diverge"): within 2
    points of the healthy median.

Arms are recovery settings on top of the suite's ``fixed`` arm (``--arm NAME=JSON``, twice or
more; ``{}`` is the defaults). Every row whose arms differ is printed; the summary counts each
arm. Used for ``RecoveryConfig.sudden_hold`` (docs/recovery.md, "A sudden failure watched
before its rollback").

    python benchmarks/recovery_ab.py --arm hold='{}' --arm nohold='{"sudden_hold": 0}'
    python benchmarks/recovery_ab.py --arm a='{}' --arm b='{"start_check": "off"}' \\
        --parts faults,tuned --seeds 0 --tasks-from my_tasks.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

if __package__ in (None, ""):            # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import families as fam  # noqa: E402
from benchmarks import recovery as R  # noqa: E402

PARTS = ("faults", "tuned", "wd")


def _run(arms: Mapping[str, Mapping[str, Any]], name: str, *a: Any, **k: Any) -> dict[str, Any]:
    """``fam_run`` with the recovery settings of arm ``name`` on top of its own arm's."""
    R.FAM_RECOVERY = dict(arms[name])
    try:
        return R.fam_run(*a, **k)
    finally:
        R.FAM_RECOVERY = {}


def _refs(tasks: Sequence[str], opts: Sequence[str]) -> dict[tuple[str, str], tuple[float, float]]:
    """The healthy median (tuned rate, seeds 0-2) and the untrained loss of each task/optimizer."""
    out = {}
    for t in tasks:
        task = fam.TASKS[t]
        for o in opts:
            vals = [R.fam_value(task, R.fam_run(t, o, 1.0, s)) for s in R.FAM_SEEDS]
            out[(t, o)] = (statistics.median(vals),
                           R.fam_run(t, o, 1.0, R.FAM_SEEDS[0])["untrained"]["loss"])
    return out


def _rows(part: str, t: str, o: str, s: int, ref: tuple[float, float],
          arms: Mapping[str, Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
    """The rows of one part for one task, optimizer and seed, every arm's outcome in each."""
    task, (med, unt) = fam.TASKS[t], ref
    clean = R.fam_value(task, R.fam_run(t, o, 1.0, s))
    if part == "faults":
        for f in R.FAM_FAULTS:
            row: dict[str, Any] = {"task": t, "opt": o, "fault": f, "seed": s, "clean": clean}
            for arm in arms:
                watched = R.fam_value(task, _run(arms, arm, t, o, 1.0, s, arm="fixed"))
                r = _run(arms, arm, t, o, 1.0, s, fault=f, arm="fixed")
                v = R.fam_value(task, r)
                row[arm] = {"value": v, "watched": watched, "rollbacks": r.get("rollbacks"),
                            "ok": R.fam_close(task, v, clean, unt, 1.0),
                            "ok_watched": R.fam_close(task, v, watched, unt, 1.0)}
            yield row
        return
    mults = (1.0,) if part == "tuned" else R.FAM_MULTS
    for m in mults:
        if part == "wd" and not R.fam_bare_diverged(task, R.fam_run(t, o, m, s), med, unt):
            continue
        row = {"task": t, "opt": o, "mult": m, "seed": s, "clean": clean}
        for arm in arms:
            r = _run(arms, arm, t, o, m, s, arm="fixed")
            v = R.fam_value(task, r)
            row[arm] = {"value": v, "rollbacks": r.get("rollbacks"),
                        "ok": R.fam_close(task, v, med, unt, 2.0)}
        yield row


def compare(arms: Mapping[str, Mapping[str, Any]], tasks: Sequence[str], opts: Sequence[str],
            seeds: Sequence[int], parts: Sequence[str] = PARTS,
            progress: Callable[[str], None] = lambda m: None) -> dict[str, list[dict[str, Any]]]:
    """Every row of ``parts`` with each arm's outcome (see the module docstring)."""
    refs = _refs(tasks, opts)
    res: dict[str, list[dict[str, Any]]] = {p: [] for p in parts}
    t0 = time.time()
    for part in parts:
        for t in tasks:
            for o in opts:
                for s in seeds:
                    for row in _rows(part, t, o, s, refs[(t, o)], arms):
                        res[part].append(row)
                        if len({json.dumps(row[a], sort_keys=True) for a in arms}) > 1:
                            progress(f"{part} differs: {_label(row)} " + ", ".join(
                                f"{a} {row[a]['value']:.4g} ({'ok' if row[a]['ok'] else 'out'}, "
                                f"{row[a]['rollbacks']} rollbacks)" for a in arms))
            progress(f"{part}: done in {time.time() - t0:.0f} s")
    return res


def _label(row: Mapping[str, Any]) -> str:
    what = row.get("fault") or f"x{row['mult']:g}"
    return f"{row['task']} {row['opt']} {what} seed {row['seed']}"


def summary(res: Mapping[str, Sequence[Mapping[str, Any]]], arms: Sequence[str]) -> str:
    """One markdown table: each part's count in band per arm."""
    lines = ["| part | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for part, rows in res.items():
        cells = []
        for a in arms:
            ok = sum(bool(r[a]["ok"]) for r in rows)
            cell = f"{ok}/{len(rows)}"
            if part == "faults":
                cell += f" ({sum(bool(r[a]['ok_watched']) for r in rows)} vs the watched run)"
            cells.append(cell)
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parse_arm(text: str) -> tuple[str, dict[str, Any]]:
    name, sep, spec = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--arm needs NAME=JSON, got {text!r}")
    try:
        value = json.loads(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--arm {name}: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--arm {name}: a JSON object of recovery settings, "
                                         f"e.g. '{{\"sudden_hold\": 0}}'")
    return name, value


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arm", action="append", type=_parse_arm, required=True,
                    metavar="NAME=JSON", help="recovery settings of one arm (twice or more)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated of {PARTS}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tasks", default=None, help="comma-separated (default: the suite's)")
    ap.add_argument("--tasks-from", default=None, metavar="FILE",
                    help="the families of a task file (benchmarks/external.py)")
    ap.add_argument("--json", default=None, metavar="FILE", help="every row, as JSON")
    a = ap.parse_args(argv)
    arms = dict(a.arm)
    parts = [p for p in a.parts.split(",") if p]
    if len(arms) < 2 or any(p not in PARTS for p in parts):
        ap.error(f"need two arms or more and parts from {PARTS}")
    try:
        tasks, opts = R.family_args(a.tasks_from, a.tasks, None)
    except ValueError as exc:
        ap.error(str(exc))
    import torch
    threads, logger = torch.get_num_threads(), logging.getLogger("lrwatch")
    level = logger.level
    torch.set_num_threads(1)      # tiny steps: OpenMP threads waiting on a busy core are slow
    logger.setLevel(logging.CRITICAL)
    try:
        res = compare(arms, tasks, opts, [int(s) for s in a.seeds.split(",")], parts,
                      progress=lambda m: print(m, file=sys.stderr, flush=True))
    finally:   # in-process callers (the smoke test) get their settings back
        torch.set_num_threads(threads)
        logger.setLevel(level)
    print(summary(res, list(arms)))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
