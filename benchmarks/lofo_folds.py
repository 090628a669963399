"""Leave-one-family-out on the suite, fold by fold, within a wall-clock budget.

The full run (``benchmarks/detection.py`` without ``--no-lofo``) takes 60-70 min of CPU and
writes nothing until every fold and the anchors are done. This runs the same search
(``benchmarks/lofo.py``: same knobs, same objective, same start, one replay cache shared by the
folds) on the cached recordings (it records nothing), held-out families in the given order,
and rewrites the results file after every fold, so a run stopped by ``--budget`` keeps the folds
it finished; the file says which (``held_out_done``) and whether the pooled row covers all six
(``complete``). The search on all six families runs only when every fold is done.

    python benchmarks/lofo_folds.py --json OUT [--families a,b] [--budget MINUTES] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import detection as det  # noqa: E402
from benchmarks import lofo  # noqa: E402


def _write(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(det._jsonable(doc), indent=1, allow_nan=False))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, required=True, help="results file, rewritten per fold")
    ap.add_argument("--families", default=None,
                    help="comma-separated held-out families, in order (default: all, sorted)")
    ap.add_argument("--budget", type=float, default=None,
                    help="start no new fold after this many minutes")
    ap.add_argument("--jobs", type=int, default=2, help="replay processes")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    log = lambda m: print(m, flush=True)  # noqa: E731
    suite = det.build_suite(det.DEFAULT_CACHE, jobs=args.jobs, log=log)
    families = sorted({sc.family for sc in suite.scenarios})
    order = args.families.split(",") if args.families else families
    unknown = [f for f in order if f not in families]
    if unknown:
        ap.error(f"unknown families {unknown}; the suite's are {families}")
    doc = lofo.pack_doc(None)
    start = {k.name: k.values[0] for k in lofo.KNOBS}
    scorer = lofo._Scorer(suite, doc, args.jobs, log)
    out: dict[str, Any] = {"families": families, "knobs": [k.__dict__ for k in lofo.KNOBS],
                           "held_out_order": order, "held_out_done": [], "choices": {}}
    held: list[tuple[det.Scenario, dict[str, Any]]] = []
    try:
        for fam in order:
            if args.budget is not None and time.perf_counter() - t0 > 60 * args.budget:
                log(f"budget spent: {fam} and after not run")
                break
            cfg = scorer.search(start, [f for f in families if f != fam])
            held += [x for x in scorer(cfg) if x[0].family == fam]
            out["choices"][fam] = dict(cfg)
            out["held_out_done"].append(fam)
            done = out["held_out_done"]
            out["lofo"] = det.summarise(held, done)
            out["complete"] = sorted(done) == families
            out["configurations_replayed"] = len(scorer.rows)
            out["seconds"] = round(time.perf_counter() - t0, 1)
            _write(args.json, out)
            log(f"held out {fam}: " + det.format_row(fam, out["lofo"]["by_family"][fam])
                + f"  ({out['seconds']:.0f} s, {len(scorer.rows)} configurations)")
        if out.get("complete"):
            all_cfg = scorer.search(start, families)
            out["chosen_on_all"] = dict(all_cfg)
            out["shipped_equals_all"] = lofo._key(lofo.shipped_config(doc)) == all_cfg
            out["seconds"] = round(time.perf_counter() - t0, 1)
            _write(args.json, out)
    finally:
        scorer.close()
    if "lofo" in out:
        log(det.format_table([(f"held out: {f}", out["lofo"]["by_family"][f])
                              for f in out["held_out_done"]]
                             + [("POOLED over those", out["lofo"]["all"])]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
