"""What a rate probe would see when a lack-of-progress rule fires (issues 12 and 13).

A slow starter (a healthy run at a constant prediction's loss for 60-180 steps before it
learns) and a network that never learned look the same in the trace when `never_learned` or
`loss_not_learning` fires (docs/detection.md, "Blind sets W, X and Y, and slow starters on
design set V"). This measures what the trace lacks. For every run of the detection suite (or of
a task file, ``--tasks-from``) on which one of those rules fires first at step ``s`` with the
shipped pack (or ``--rules``), the run is trained again -- recording is deterministic -- to step
``s``; then ``--steps`` steps on copies at the current rate and at a tenth of it ("now"), and
from the start state, where a restart goes, at the configured rate and at a tenth ("start").
Each arm's number is the held-out loss after its steps over the held-out loss before them.
Rows are grouped by what the run is: healthy (the firing is a false alarm), a natural failure
(never learned, stuck above, diverged), an injected reset (the ``never_learned`` fault). Nothing
is decided here; docs/design.md ("Slow starters") has the reading.

    python benchmarks/firing_probe.py                  # the suite (a few minutes on one core)
    python benchmarks/firing_probe.py --tasks-from my_tasks.py --cache DIR --steps 20
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

if __package__ in (None, ""):            # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import detection, external  # noqa: E402
from benchmarks import family_runs as fr  # noqa: E402
from lrwatch.exporters.trace import read_trace  # noqa: E402
from lrwatch.rules import Engine, load_pack, load_rules  # noqa: E402

RULES = ("never_learned", "loss_not_learning")
FACTORS = (1.0, 0.1)


def first_firings(cache: Path, rules_file: str | None) -> Iterator[tuple[dict[str, Any], int]]:
    """(label record, step) of every run whose first lack-of-progress firing is at ``step``."""
    doc = json.loads((cache / "labels.json").read_text())
    for run in doc["runs"]:
        eng = Engine(load_rules(rules_file) if rules_file else load_pack("training"))
        step = None
        for sample in read_trace(cache / run["trace"]):
            if any(e.kind == "firing" and e.rule in RULES for e in eng.update(sample)):
                step = sample.step
                break
        if step is not None:
            yield run, step


def _eval_loss(rec: Any) -> float:
    values: dict[str, float] = {}
    rec.evaluate(0, values)
    return values["eval_loss"]


def _arm(rec: Any, factor: float, first: int, steps: int) -> float:
    """Held-out loss after ``steps`` steps at ``factor`` x the rate, over the loss before."""
    before = _eval_loss(rec)
    r = copy.deepcopy(rec)
    for g in r.opt.param_groups:
        g["lr"] *= factor
    r.sched.base_lrs = [b * factor for b in r.sched.base_lrs]
    for s in range(first, first + steps):
        if not all(math.isfinite(v) for v in r.step(s).values()):
            return math.inf
    return _eval_loss(r) / before


def probe(run: dict[str, Any], step: int, steps: int) -> dict[str, float] | None:
    """The four arms for one run, or None when its replay turns non-finite before ``step``."""
    spec = fr.RunSpec(**run["spec"])
    rec = fr._Recorder(spec)
    out: dict[str, float] = {}
    clean = fr.RunSpec(**{**run["spec"], "fault": None, "onset": None, "base": None})
    for f in FACTORS:
        out[f"start x{f:g}"] = _arm(fr._Recorder(clean), f, 1, steps)
    for s in range(1, step + 1):
        if not all(math.isfinite(v) for v in rec.step(s).values()):
            return None
    for f in FACTORS:
        out[f"now x{f:g}"] = _arm(rec, f, step + 1, steps)
    return out


def group(run: dict[str, Any], step: int) -> str | None:
    if run["kind"] == "healthy":
        return "healthy (false alarm)"
    if run["label"] == "ambiguous" or (run.get("onset") and step < run["onset"]):
        return None
    if run["spec"]["fault"] == "never_learned":
        return "injected reset"
    return "natural failure" if run["spec"]["fault"] is None else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks-from", default=None, metavar="FILE",
                    help="a task file (benchmarks/external.py) whose recorded runs to probe")
    ap.add_argument("--cache", type=Path, default=None,
                    help="the detection cache with labels.json (default: the suite's, or the "
                         "task file's)")
    ap.add_argument("--rules", default=None, help="a rule file instead of the shipped pack")
    ap.add_argument("--steps", type=int, default=20, help="steps per arm (default 20)")
    ap.add_argument("--json", type=Path, default=None, help="also write every row as JSON")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    # a deep-copied optimizer loses the scheduler's step counter wrapper; the order is right
    warnings.filterwarnings("ignore", message="Seems like `optimizer.step\\(\\)` has been")
    cache = a.cache or detection.DEFAULT_CACHE
    if a.tasks_from:
        try:
            external.load(a.tasks_from)
        except external.TaskFileError as exc:
            ap.error(str(exc))
        cache = a.cache or external.cache_dir("detection", a.tasks_from)
    if not (cache / "labels.json").exists():
        ap.error(f"{cache}: no labels.json; record the runs first (benchmarks/detection.py)")
    rows = []
    for run, step in first_firings(cache, a.rules):
        g = group(run, step)
        if g is None:
            continue
        arms = probe(run, step, a.steps)
        if arms is None:
            continue
        rows.append({"id": run["id"], "group": g, "step": step, **arms})
        print(f"{g:22s} {run['id'][:58]:58s} s{step:3d} "
              + " ".join(f"{k} {v:.3f}" for k, v in arms.items()), flush=True)
    print("\nmedians (held-out loss after / before), by group:")
    for g in sorted({r["group"] for r in rows}):
        sub = [r for r in rows if r["group"] == g]
        gain = [r["now x1"] - r["now x0.1"] for r in sub]
        meds = {k: statistics.median(r[k] for r in sub) for k in sub[0] if " x" in k}
        print(f"  {g:22s} n={len(sub):3d} " + " ".join(f"{k} {v:.3f}" for k, v in meds.items())
              + f"; the tenth better now by > 0.1: {sum(x > 0.1 for x in gain)}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
