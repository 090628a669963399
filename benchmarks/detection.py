"""Detection-quality benchmark: lrwatch's default training pack against seven anchors.

Records a labelled suite of real training runs (``benchmarks/detection_runs.py``: several
models, optimizers, schedules and learning rates, some of which really reach ``nan``/``inf``,
plus faults injected by real interventions into healthy runs), replays every trace through each
detector, and scores:

* **caught** -- share of faults (natural divergences and injected faults) with an alarm within the
  deadline after the onset;
* **warned before non-finite** -- among faults whose run reaches a non-finite value, share with an
  alarm after the onset and strictly before the first non-finite step;
* **median delay** -- steps from onset to the first alarm, over caught faults;
* **false alarms** -- healthy runs with any critical firing, and faults with a critical firing
  before the onset.

Anchors (``benchmarks/anchors.py``) stop or skip when they fire, so all their firings are
critical. For lrwatch a firing of severity ``critical`` or ``warning`` is an alarm and only
``critical`` firings count as false alarms; a critical-only view is reported as well.

Usage::

    python benchmarks/detection.py            # full suite (~6 min on 2 cores; ~40 s cached)
    python benchmarks/detection.py --quick    # small suite (< 2 min)
    python benchmarks/detection.py --rules my-pack.yml --json results.json

Traces and the ``labels.json`` manifest (``labels-quick.json`` for ``--quick``) are cached in
``benchmarks/.cache/detection/`` (``--rebuild`` to re-record). Seeds are split in two: even seeds
are the *tuning* half, odd seeds the *held-out* half; both are reported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

if __package__ in (None, ""):            # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import detection_runs as dr  # noqa: E402
from benchmarks.anchors import ANCHORS  # noqa: E402
from lrwatch.samples import Sample  # noqa: E402

__all__ = ["Suite", "build_suite", "record_suite", "score_suite", "main"]

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = ROOT / "benchmarks" / ".cache" / "detection"

DEADLINE = 25                   # steps after onset for step-level faults and natural divergences
DEADLINE_EVAL = 120             # steps after onset for the slow eval regression (6 evaluations)
NATURAL_TOLERANCE = 5           # natural onsets are estimated: alarms up to 5 steps early count
LR_MULTS = (1, 1, 3, 10, 30, 100, 300)
ONSET_RANGE = (150, 230)

FULL = {"seeds": (0, 1, 2, 3, 4, 5), "tasks": tuple(dr.TASKS), "natural": 6}
QUICK = {"seeds": (0, 1), "tasks": ("digits_mlp", "diabetes_linear", "synth_reg_mlp",
                                    "chars_mlp"), "natural": 4}

TARGETS = {"caught": 0.95, "warned": 1.0, "median_delay": 2.0, "fa_healthy": 0}


# --------------------------------------------------------------------------------------------
# the suite: which runs, recorded and labelled
# --------------------------------------------------------------------------------------------

@dataclass
class Scenario:
    id: str
    spec: dr.RunSpec
    path: Path
    label: dict[str, Any] = field(default_factory=dict)

    @property
    def split(self) -> str:
        return "tune" if self.spec.seed % 2 == 0 else "heldout"

    @property
    def kind(self) -> str:
        """healthy | ambiguous | natural_divergence | <fault kind>."""
        lab = self.label["label"]
        if lab == "diverged":
            return "natural_divergence"
        if lab == "faulted":
            return str(self.label["fault"])
        return str(lab)

    @property
    def is_fault(self) -> bool:
        return self.label["label"] in ("diverged", "faulted")


@dataclass
class Suite:
    cache: Path
    scenarios: list[Scenario]
    skipped: list[dict[str, Any]]


def natural_specs(seed: int, task: str, n: int) -> list[dr.RunSpec]:
    rng = random.Random(f"natural-{seed}-{task}")
    steps = dr.TASKS[task].steps
    out = []
    for _ in range(n):
        out.append(dr.RunSpec(task, dr.seeded_choice(rng, dr.OPTIMIZERS),
                              dr.seeded_choice(rng, dr.SCHEDULES),
                              float(dr.seeded_choice(rng, LR_MULTS)), seed, steps))
    return out


def base_candidates(seed: int, task: str) -> list[dr.RunSpec]:
    """Tuned-LR runs to inject faults into, in order of preference (first healthy one wins)."""
    ti = list(dr.TASKS).index(task)
    steps = dr.TASKS[task].steps
    return [dr.RunSpec(task, dr.OPTIMIZERS[(seed + ti + i) % len(dr.OPTIMIZERS)],
                       dr.SCHEDULES[(seed + 2 * ti + i) % len(dr.SCHEDULES)], 1.0, seed, steps)
            for i in range(len(dr.OPTIMIZERS))]


def fault_specs(base: dr.RunSpec, base_id: str) -> list[dr.RunSpec]:
    out = []
    for kind in dr.FAULT_KINDS:
        rng = random.Random(f"onset-{base.seed}-{base.task}-{kind}")
        onset = rng.randint(*ONSET_RANGE)
        out.append(dr.RunSpec(base.task, base.optimizer, base.schedule, base.lr_mult, base.seed,
                              base.steps, fault=kind, onset=onset, base=base_id))
    return out


def _trace_path(cache: Path, spec: dr.RunSpec) -> Path:
    return cache / "traces" / f"{dr.run_id(spec)}.trace.jsonl"


def _record_one(args: tuple[dr.RunSpec, str]) -> tuple[str, dict[str, Any], float]:
    spec, path = args
    t0 = time.perf_counter()
    facts = dr.record_run(spec, Path(path))
    return dr.run_id(spec), facts, time.perf_counter() - t0


def _load_manifests(cache: Path) -> dict[str, dict[str, Any]]:
    """Every run any manifest in the cache knows (the quick and full suites share traces)."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(cache.glob("labels*.json")):
        try:
            data = json.loads(path.read_text())
            out.update({r["id"]: r for r in data.get("runs", [])})
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def _record_many(specs: Sequence[dr.RunSpec], cache: Path, jobs: int, rebuild: bool,
                 known: dict[str, dict[str, Any]], done: set[str],
                 log: Callable[[str], None]) -> None:
    """Record the specs not yet in ``done`` whose cached trace is missing or stale."""
    todo = []
    for spec in specs:
        rid = dr.run_id(spec)
        if rid in done:
            continue
        path = _trace_path(cache, spec)
        entry = known.get(rid)
        if (not rebuild and entry is not None and entry.get("hash") == dr.spec_hash(spec)
                and path.exists()):
            done.add(rid)
            continue
        todo.append((spec, str(path)))
    if not todo:
        return
    log(f"  recording {len(todo)} runs ({jobs} process{'es' if jobs > 1 else ''}) ...")
    t0 = time.perf_counter()
    if jobs <= 1:
        results = [_record_one(a) for a in todo]
    else:
        with ProcessPoolExecutor(max_workers=jobs) as ex:
            results = list(ex.map(_record_one, todo, chunksize=4))
    for rid, _facts, _dt in results:
        done.add(rid)
    log(f"  recorded {len(todo)} runs in {time.perf_counter() - t0:.0f} s")


def build_suite(cache: Path = DEFAULT_CACHE, *, seeds: Iterable[int] = FULL["seeds"],
                tasks: Iterable[str] = FULL["tasks"], natural: int = FULL["natural"],
                jobs: int = 2, rebuild: bool = False, manifest: str = "labels.json",
                log: Callable[[str], None] = print) -> Suite:
    """Record (or reuse from the cache) and label every scenario; writes the ``manifest``."""
    cache.mkdir(parents=True, exist_ok=True)
    known = _load_manifests(cache)
    seeds, tasks = list(seeds), list(tasks)
    specs: dict[str, dr.RunSpec] = {}
    for seed in seeds:
        for task in tasks:
            for spec in natural_specs(seed, task, natural):
                specs.setdefault(dr.run_id(spec), spec)
    # Base runs: try candidates until one is labelled healthy; each one tried is also a scenario.
    pending = {(seed, task): base_candidates(seed, task) for seed in seeds for task in tasks}
    bases: dict[tuple[int, str], dr.RunSpec] = {}
    labels: dict[str, dict[str, Any]] = {}
    skipped: list[dict[str, Any]] = []

    def label_of(spec: dr.RunSpec) -> dict[str, Any]:
        rid = dr.run_id(spec)
        if rid not in labels:
            samples = dr.load_samples(_trace_path(cache, spec))
            labels[rid] = (dr.label_natural(samples) if spec.fault is None
                           else dr.label_faulted(samples, spec))
            labels[rid]["steps_recorded"] = len(samples)
        return labels[rid]

    done: set[str] = set()
    while True:
        for cands in pending.values():
            if cands:
                specs.setdefault(dr.run_id(cands[0]), cands[0])
        _record_many(list(specs.values()), cache, jobs, rebuild, known, done, log)
        for key, cands in list(pending.items()):
            if not cands:
                continue
            if label_of(cands[0])["label"] == "healthy":
                bases[key] = cands[0]
                pending[key] = []
            else:
                cands.pop(0)
                if not cands:
                    skipped.append({"seed": key[0], "task": key[1],
                                    "why": "no healthy base run among the candidates"})
        if not any(pending.values()):
            break
    for key, base in sorted(bases.items()):
        for f in fault_specs(base, dr.run_id(base)):
            specs.setdefault(dr.run_id(f), f)
    _record_many(list(specs.values()), cache, jobs, rebuild, known, done, log)

    scenarios = []
    for rid, spec in specs.items():
        sc = Scenario(rid, spec, _trace_path(cache, spec), label_of(spec))
        scenarios.append(sc)
    scenarios.sort(key=lambda s: (s.spec.seed, s.spec.task, s.spec.fault or "", s.id))
    _write_manifest(cache / manifest, scenarios, skipped)
    return Suite(cache, scenarios, skipped)


LABELLING_RULES = {
    "natural": dr.label_natural.__doc__,
    "faulted": dr.label_faulted.__doc__,
    "first_nonfinite": "first step where loss, grad_norm, update_ratio, accuracy, eval_loss, "
                       "eval_accuracy or any lr is nan/inf; training stops "
                       f"{dr.NONFINITE_TAIL} steps later",
    "faults": dr.__doc__,
}


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _write_manifest(path: Path, scenarios: Sequence[Scenario],
                    skipped: Sequence[dict[str, Any]]) -> None:
    cache = path.parent
    runs = []
    for sc in scenarios:
        runs.append({"id": sc.id, "hash": dr.spec_hash(sc.spec),
                     "trace": str(sc.path.relative_to(cache)), "split": sc.split,
                     "kind": sc.kind, "spec": sc.spec.to_json(), **_jsonable(sc.label)})
    doc = {"format": 1, "recording_version": dr.FORMAT_VERSION,
           "labelling_rules": LABELLING_RULES,
           "constants": {"onset_k": dr.ONSET_K, "onset_margin": dr.ONSET_MARGIN,
                         "smooth": dr.SMOOTH, "excursion_gap": dr.EXCURSION_GAP,
                         "healthy_learned": dr.HEALTHY_LEARNED,
                         "healthy_max_rise": dr.HEALTHY_MAX_RISE,
                         "healthy_max_margin": dr.HEALTHY_MAX_MARGIN,
                         "diverged_final": dr.DIVERGED_FINAL, "eval_every": dr.EVAL_EVERY,
                         "spike_window": dr.SPIKE_WINDOW, "regression_ramp": dr.REGRESSION_RAMP,
                         "blowup_factor": dr.BLOWUP_FACTOR, "lr_bug_factor": dr.LR_BUG_FACTOR},
           "skipped": list(skipped), "runs": runs}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False))
    tmp.replace(path)


# --------------------------------------------------------------------------------------------
# detectors
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Firing:
    step: int
    severity: str            # critical | warning | info
    rule: str


@dataclass
class Detector:
    """A named way to turn a trace into firings (fresh state per trace)."""

    key: str
    name: str
    run: Callable[[Sequence[Sample]], list[Firing]]
    alarm: frozenset[str]        # severities that count as an alarm (a catch)
    false_alarm: frozenset[str]  # severities that count as a false alarm


def anchor_detectors() -> list[Detector]:
    out = []
    for key, factory in ANCHORS.items():
        def run(samples: Sequence[Sample], factory: Callable[[], Any] = factory,
                key: str = key) -> list[Firing]:
            a = factory()
            return [Firing(s.step, "critical", key) for s in samples if a.update(s)]
        out.append(Detector(key, factory().name, run, frozenset({"critical"}),
                            frozenset({"critical"})))
    return out


def lrwatch_detectors(rules: str | None) -> tuple[list[Detector], str | None]:
    """lrwatch's pack in two views, or ``([], reason)`` when the engine is not available."""
    try:
        from lrwatch.rules import Engine, load_pack, load_rules
        ruleset = load_rules(rules) if rules else load_pack("training")
    except Exception as exc:  # the engine is optional for the anchors' half of the benchmark
        return [], f"{type(exc).__name__}: {exc}"

    def run(samples: Sequence[Sample]) -> list[Firing]:
        eng = Engine(ruleset)
        out = []
        for s in samples:
            for f in eng.update(s):
                if f.kind == "firing":
                    out.append(Firing(int(f.step), str(f.severity), str(f.rule)))
        return out

    label = f"lrwatch ({Path(rules).name})" if rules else "lrwatch default pack"
    return [Detector("lrwatch", f"{label}: crit+warn", run,
                     frozenset({"critical", "warning"}), frozenset({"critical"})),
            Detector("lrwatch_critical", f"{label}: critical only", run,
                     frozenset({"critical"}), frozenset({"critical"}))], None


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------

def deadline_for(kind: str) -> int:
    return DEADLINE_EVAL if kind == "eval_regression" else DEADLINE


def score_scenario(sc: Scenario, firings: Sequence[Firing], det: Detector) -> dict[str, Any]:
    """Outcome of one detector on one scenario (see module docstring for the measures)."""
    alarms = sorted(f.step for f in firings if f.severity in det.alarm)
    crit = sorted(f.step for f in firings if f.severity in det.false_alarm)
    out: dict[str, Any] = {"first_alarm": alarms[0] if alarms else None,
                           "first_critical": crit[0] if crit else None}
    if alarms:
        out["first_alarm_rules"] = sorted({f.rule for f in firings
                                           if f.step == alarms[0] and f.severity in det.alarm})
    if sc.kind == "healthy":
        out["false_alarm"] = bool(crit)
        if crit:
            out["false_alarm_rules"] = sorted({f.rule for f in firings
                                               if f.severity in det.false_alarm})
        return out
    if not sc.is_fault:
        return out
    onset = int(sc.label["onset"])
    tol = NATURAL_TOLERANCE if sc.kind == "natural_divergence" else 0
    lo, hi = onset - tol, onset + deadline_for(sc.kind)
    hits = [s for s in alarms if lo <= s <= hi]
    out["caught"] = bool(hits)
    out["delay"] = max(0, hits[0] - onset) if hits else None
    early = [s for s in crit if s < lo]
    out["false_alarm_before_onset"] = bool(early)
    if early:
        out["false_alarm_rules"] = sorted({f.rule for f in firings
                                           if f.severity in det.false_alarm and f.step < lo})
    nf = sc.label.get("first_nonfinite")
    if nf is not None:
        out["warned_before_nonfinite"] = any(lo <= s < int(nf) for s in alarms)
    return out


def aggregate(rows: Sequence[tuple[Scenario, dict[str, Any]]]) -> dict[str, Any]:
    faults = [(sc, r) for sc, r in rows if sc.is_fault]
    healthy = [(sc, r) for sc, r in rows if sc.kind == "healthy"]
    nf = [(sc, r) for sc, r in faults if "warned_before_nonfinite" in r]
    delays = [r["delay"] for _, r in faults if r.get("caught")]
    caught = sum(1 for _, r in faults if r.get("caught"))
    warned = sum(1 for _, r in nf if r["warned_before_nonfinite"])
    return {
        "faults": len(faults), "caught": caught,
        "caught_ratio": caught / len(faults) if faults else None,
        "nonfinite_runs": len(nf), "warned": warned,
        "warned_ratio": warned / len(nf) if nf else None,
        "median_delay": statistics.median(delays) if delays else None,
        "healthy": len(healthy),
        "false_alarms_healthy": sum(1 for _, r in healthy if r.get("false_alarm")),
        # any alarm (for lrwatch: warnings too) on a healthy run; not a false alarm by the
        # benchmark's definition, but reported so that noisy warnings stay visible
        "alarms_healthy": sum(1 for _, r in healthy if r.get("first_alarm") is not None),
        "false_alarms_before_onset": sum(1 for _, r in faults
                                         if r.get("false_alarm_before_onset")),
    }


def _rule_counts(rows: Sequence[tuple[Scenario, dict[str, Any]]]) -> dict[str, dict[str, int]]:
    """Which rules raised the first alarm, per scenario kind (false alarms included)."""
    out: dict[str, dict[str, int]] = {}
    for sc, r in rows:
        for rule in r.get("first_alarm_rules", ()):
            d = out.setdefault(sc.kind, {})
            d[rule] = d.get(rule, 0) + 1
    return out


def score_suite(suite: Suite, detectors: Sequence[Detector],
                log: Callable[[str], None] = print) -> dict[str, Any]:
    per: dict[str, list[tuple[Scenario, dict[str, Any]]]] = {d.key: [] for d in detectors}
    cache_runs: dict[int, list[Firing]] = {}
    t0 = time.perf_counter()
    timing: dict[str, float] = {d.key: 0.0 for d in detectors}
    scenario_rows = []
    for sc in suite.scenarios:
        samples = dr.load_samples(sc.path)
        row: dict[str, Any] = {"id": sc.id, "kind": sc.kind, "split": sc.split,
                               "onset": sc.label.get("onset"),
                               "first_nonfinite": sc.label.get("first_nonfinite"),
                               "detectors": {}}
        cache_runs.clear()
        for det in detectors:
            t = time.perf_counter()
            key = id(det.run)
            if key not in cache_runs:      # both lrwatch views share one replay
                cache_runs[key] = det.run(samples)
            firings = cache_runs[key]
            timing[det.key] += time.perf_counter() - t
            res = score_scenario(sc, firings, det)
            per[det.key].append((sc, res))
            row["detectors"][det.key] = res
        scenario_rows.append(row)
    log(f"  scored {len(suite.scenarios)} scenarios x {len(detectors)} detectors in "
        f"{time.perf_counter() - t0:.0f} s")
    kinds = ["natural_divergence", *dr.FAULT_KINDS]
    results: dict[str, Any] = {}
    for det in detectors:
        rows = per[det.key]
        results[det.key] = {
            "name": det.name,
            "all": aggregate(rows),
            "tune": aggregate([x for x in rows if x[0].split == "tune"]),
            "heldout": aggregate([x for x in rows if x[0].split == "heldout"]),
            "by_kind": {k: aggregate([x for x in rows if x[0].kind == k]) for k in kinds},
            "replay_seconds": round(timing[det.key], 3),
            "first_alarm_rules_by_kind": _rule_counts(rows),
        }
    return {"detectors": results, "scenarios": scenario_rows}


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------

def _pct(n: int, d: int) -> str:
    return f"{100 * n / d:5.1f}% ({n}/{d})" if d else "   n/a"


def _delay(v: float | None) -> str:
    return "n/a" if v is None else f"{v:g}"


def meets_targets(agg: dict[str, Any]) -> dict[str, bool]:
    return {
        "caught": agg["caught_ratio"] is not None and agg["caught_ratio"] >= TARGETS["caught"],
        "warned": agg["warned_ratio"] is not None and agg["warned_ratio"] >= TARGETS["warned"],
        "median_delay": agg["median_delay"] is not None
        and agg["median_delay"] <= TARGETS["median_delay"],
        "fa_healthy": agg["false_alarms_healthy"] <= TARGETS["fa_healthy"],
    }


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, str]:
    """lrwatch's aggregate ``a`` against an anchor's ``b``: better | tie | worse per measure."""
    def cmp(x: float | None, y: float | None, higher_better: bool) -> str:
        if x is None and y is None:
            return "tie"
        if x is None:
            return "worse"
        if y is None:
            return "better"
        if x == y:
            return "tie"
        return "better" if (x > y) == higher_better else "worse"

    return {"caught": cmp(a["caught_ratio"], b["caught_ratio"], True),
            "warned": cmp(a["warned_ratio"], b["warned_ratio"], True),
            "median_delay": cmp(a["median_delay"], b["median_delay"], False),
            "fa_healthy": cmp(a["false_alarms_healthy"], b["false_alarms_healthy"], False)}


def format_table(results: dict[str, Any], view: str = "all") -> str:
    head = (f"| {'detector':44} | {'caught':16} | {'warned before non-finite':24} | "
            f"{'median delay':12} | {'FA healthy':14} | {'FA before onset':15} |")
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for key, r in results.items():
        a = r[view]
        lines.append(
            f"| {r['name'][:44]:44} | {_pct(a['caught'], a['faults']):16} | "
            f"{_pct(a['warned'], a['nonfinite_runs']):24} | {_delay(a['median_delay']):>12} | "
            f"{_pct(a['false_alarms_healthy'], a['healthy']):14} | "
            f"{_pct(a['false_alarms_before_onset'], a['faults']):15} |")
    return "\n".join(lines)


def format_kinds(results: dict[str, Any]) -> str:
    kinds = ["natural_divergence", *dr.FAULT_KINDS]
    first = next(iter(results.values()))
    counts = {k: first["by_kind"][k]["faults"] for k in kinds}
    head = "| " + f"{'detector':44}" + " | " + " | ".join(
        f"{k} (n={counts[k]})"[:22].ljust(22) for k in kinds) + " |"
    lines = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
    for key, r in results.items():
        cells = []
        for k in kinds:
            a = r["by_kind"][k]
            if not a["faults"]:
                cells.append("n/a".ljust(22))
                continue
            c = f"{100 * a['caught'] / a['faults']:.0f}% d={_delay(a['median_delay'])}"
            if a["nonfinite_runs"]:
                c += f" w={100 * a['warned'] / a['nonfinite_runs']:.0f}%"
            cells.append(c[:22].ljust(22))
        lines.append(f"| {r['name'][:44]:44} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_suite(suite: Suite) -> str:
    from collections import Counter
    c = Counter((sc.kind, sc.split) for sc in suite.scenarios)
    kinds = ["healthy", "ambiguous", "natural_divergence", *dr.FAULT_KINDS]
    nf = sum(1 for sc in suite.scenarios if sc.label.get("first_nonfinite") is not None
             and sc.is_fault)
    parts = [f"{k}: {c[(k, 'tune')] + c[(k, 'heldout')]} "
             f"({c[(k, 'tune')]} tune / {c[(k, 'heldout')]} held-out)" for k in kinds]
    return (f"{len(suite.scenarios)} recorded runs; faults reaching a non-finite value: {nf}\n  "
            + "\n  ".join(parts))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small suite (< 2 minutes)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="traces + labels.json")
    ap.add_argument("--rebuild", action="store_true", help="re-record every run")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="recording processes")
    ap.add_argument("--seeds", type=str, default=None, help="comma-separated seeds")
    ap.add_argument("--rules", type=str, default=None,
                    help="score this rule file instead of the default training pack")
    ap.add_argument("--no-lrwatch", action="store_true", help="score the anchors only")
    ap.add_argument("--json", type=Path, default=None,
                    help="results file (default: <cache>/results[-quick].json)")
    args = ap.parse_args(argv)

    cfg = dict(QUICK if args.quick else FULL)
    if args.seeds:
        cfg["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    t0 = time.perf_counter()
    print(f"detection benchmark ({'quick' if args.quick else 'full'}): seeds {cfg['seeds']}, "
          f"{len(cfg['tasks'])} tasks", flush=True)
    suite = build_suite(args.cache, seeds=cfg["seeds"], tasks=cfg["tasks"],
                        natural=cfg["natural"], jobs=args.jobs, rebuild=args.rebuild,
                        manifest="labels-quick.json" if args.quick else "labels.json",
                        log=lambda m: print(m, flush=True))
    print(format_suite(suite))
    for s in suite.skipped:
        print(f"  skipped: seed {s['seed']} {s['task']}: {s['why']}")

    detectors: list[Detector] = []
    lrwatch_note = None
    if not args.no_lrwatch:
        lw, lrwatch_note = lrwatch_detectors(args.rules)
        if lrwatch_note:
            print(f"  lrwatch engine not available ({lrwatch_note}); scoring the anchors only")
        detectors += lw
    detectors += anchor_detectors()
    scored = score_suite(suite, detectors, log=lambda m: print(m, flush=True))
    results = scored["detectors"]

    print(f"\nAll scenarios (deadline {DEADLINE} steps, {DEADLINE_EVAL} for eval regressions; "
          f"natural onsets +-{NATURAL_TOLERANCE}):")
    print(format_table(results, "all"))
    print("\nHeld-out half (odd seeds):")
    print(format_table(results, "heldout"))
    print("\nTuning half (even seeds):")
    print(format_table(results, "tune"))
    print("\nBy fault kind (caught %, d = median delay in steps, w = warned before non-finite):")
    print(format_kinds(results))

    verdict = {}
    if "lrwatch" in results:
        print("\nTargets for the default pack (crit+warn view): caught >= 95%, warned before "
              "non-finite = 100%, median delay <= 2, no critical firing on a healthy run")
        for view in ("all", "heldout"):
            agg = results["lrwatch"][view]
            print(f"  {view:8}: healthy runs with any alarm (warnings included): "
                  f"{_pct(agg['alarms_healthy'], agg['healthy']).strip()}")
            ok = meets_targets(agg)
            verdict[view] = ok
            print(f"  {view:8}: " + ", ".join(f"{k} {'PASS' if v else 'MISS'}"
                                               for k, v in ok.items()))
        beats = {}
        a = results["lrwatch"]["all"]
        for key, r in results.items():
            if not key.startswith("lrwatch"):
                beats[key] = compare(a, r["all"])
        verdict["versus_anchors"] = beats
        worse = [(k, m) for k, v in beats.items() for m, st in v.items() if st == "worse"]
        ties = [(k, m) for k, v in beats.items() for m, st in v.items() if st == "tie"]
        if worse:
            print("  worse than an anchor on: " + "; ".join(
                f"{results[k]['name']} ({m})" for k, m in worse))
        if ties:
            print("  tied with an anchor on: " + "; ".join(
                f"{results[k]['name']} ({m})" for k, m in ties))
        if not worse and not ties:
            print("  strictly better than every anchor on all four measures")

    out = args.json or (args.cache / ("results-quick.json" if args.quick else "results.json"))
    doc = {"config": {"mode": "quick" if args.quick else "full", "seeds": list(cfg["seeds"]),
                      "tasks": list(cfg["tasks"]), "natural_per_task": cfg["natural"],
                      "deadline": DEADLINE, "deadline_eval": DEADLINE_EVAL,
                      "natural_tolerance": NATURAL_TOLERANCE, "rules": args.rules or "training",
                      "lrwatch_unavailable": lrwatch_note, "targets": TARGETS},
           "suite": {"runs": len(suite.scenarios), "skipped": suite.skipped,
                     "manifest": str(args.cache / ("labels-quick.json" if args.quick
                                                   else "labels.json"))},
           "results": results, "verdict": verdict,
           "scenarios": scored["scenarios"],
           "seconds": round(time.perf_counter() - t0, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable(doc), indent=1, allow_nan=False))
    print(f"\nresults: {out}  ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
