"""Detection-quality benchmark: the default training pack, scored leave-one-family-out.

Records a labelled suite of real training runs of six model/task families
(``benchmarks/families.py``: MLP classifiers, CNNs, recurrent and transformer character LMs, MSE
regression, autoencoders; ``benchmarks/family_runs.py`` records, injects and labels), replays
every trace through lrwatch's rules and through re-implementations of seven well-known monitors,
and scores them on the same scenarios:

* **caught** -- share of faults (natural divergences and injected faults) with an alarm within
  the fault's deadline after the onset;
* **warned before non-finite** -- among faults whose run reaches a non-finite value, share with
  an alarm after the onset and strictly before the first non-finite step;
* **median delay** -- steps from onset to the first alarm, over caught faults (evaluation faults
  also in evaluations);
* **false alarms** -- healthy runs with any critical firing, and faults with a critical firing
  before the onset; **warned healthy** -- healthy runs with any warning or critical firing.

The headline is **leave-one-family-out** (``benchmarks/lofo.py``): every tunable threshold of the
pack is chosen on five families and the sixth is scored with that choice; the pooled row adds
up the six held-out scores. The shipped pack (tuned on all six) is scored too, for reference.

Usage::

    python benchmarks/detection.py              # full suite (~10 min from scratch, cached after)
    python benchmarks/detection.py --quick      # one seed, fewer runs
    python benchmarks/detection.py --rules my-pack.yml --no-lofo
    python benchmarks/detection.py --tasks-from my_tasks.py --no-lofo   # your own families

Traces and ``labels.json`` are cached in ``benchmarks/.cache/detection-families/``
(``--rebuild`` re-records).
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
from benchmarks import external  # noqa: E402
from benchmarks import family_runs as fr  # noqa: E402
from benchmarks.anchors import ANCHORS  # noqa: E402
from lrwatch.exporters.trace import read_trace  # noqa: E402
from lrwatch.samples import Sample  # noqa: E402

__all__ = ["Suite", "Scenario", "build_suite", "deadline_for", "main"]

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = ROOT / "benchmarks" / ".cache" / "detection-families"

DEADLINE = 25                   # steps after onset for step-level faults and natural divergences
DEADLINE_EARLY = 100            # never learned / stuck above: telling a dead start from a slow
                                # one takes evidence (a third of the run; delays are reported)
# evaluation faults: the slow training-label ramp has 120 steps (12 evaluations); the silent
# drop must be caught within 3 evaluations of its first affected one
DEADLINE_EVAL = {"eval_regression": 120, "eval_drop": 3 * fr.EVAL_EVERY}
NATURAL_TOLERANCE = 5           # natural onsets are estimated: alarms up to 5 steps early count
LR_MULTS = (1, 1, 3, 10, 30, 100)
ONSET_RANGE = (100, 180)
EARLY_ONSET_RANGE = (3, 20)

FULL = {"seeds": (0, 1), "tasks": tuple(fr.TASKS), "natural": 8}
QUICK = {"seeds": (0,), "tasks": tuple(fr.TASKS), "natural": 4}

TARGETS = {"caught": 0.92, "warned": 1.0, "median_delay": 2.0, "median_delay_evals": 1.0,
           "fa": 0, "warned_healthy": 0.05}
KINDS = ("natural_divergence", "never_learned_natural", "stuck_above_natural", *fr.FAULT_KINDS)


# --------------------------------------------------------------------------------------------
# the suite
# --------------------------------------------------------------------------------------------

@dataclass
class Scenario:
    id: str
    spec: fr.RunSpec
    path: Path
    label: dict[str, Any] = field(default_factory=dict)
    _samples: list[Sample] | None = None

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def kind(self) -> str:
        """healthy | ambiguous | natural_divergence | <kind>_natural | <fault kind>."""
        lab = self.label["label"]
        if lab == "diverged":
            k = self.label.get("kind")
            return f"{k}_natural" if k else "natural_divergence"
        if lab == "faulted":
            return str(self.label["fault"])
        if lab == "healthy" and self.label.get("over_fit"):
            return "over_fit"
        return str(lab)

    @property
    def is_fault(self) -> bool:
        return self.label["label"] in ("diverged", "faulted")

    def samples(self) -> list[Sample]:
        if self._samples is None:
            self._samples = read_trace(self.path)
        return self._samples


@dataclass
class Suite:
    cache: Path
    scenarios: list[Scenario]
    skipped: list[dict[str, Any]]


def natural_specs(seed: int, task: str, n: int) -> list[fr.RunSpec]:
    rng = random.Random(f"natural-{seed}-{task}")
    out = []
    for _ in range(n):
        out.append(fr.RunSpec(task, dr.seeded_choice(rng, fr.OPTIMIZERS),
                              dr.seeded_choice(rng, fr.SCHEDULES),
                              float(dr.seeded_choice(rng, LR_MULTS)), seed,
                              float(dr.seeded_choice(rng, fr.BATCH_MULTS))))
    return out


def base_candidates(seed: int, task: str) -> list[fr.RunSpec]:
    """Tuned-LR runs to inject faults into, in order of preference (first healthy one wins)."""
    ti = list(fr.TASKS).index(task)
    n_opt, n_sch = len(fr.OPTIMIZERS), len(fr.SCHEDULES)
    return [fr.RunSpec(task, fr.OPTIMIZERS[(seed + ti + i) % n_opt],
                       fr.SCHEDULES[(seed + 2 * ti + i) % n_sch], 1.0, seed)
            for i in range(n_opt)]


def fault_specs(base: fr.RunSpec, base_id: str) -> list[fr.RunSpec]:
    out = []
    for kind in fr.FAULT_KINDS:
        rng = random.Random(f"onset-{base.seed}-{base.task}-{kind}")
        lo, hi = EARLY_ONSET_RANGE if kind in fr.EARLY_FAULTS else ONSET_RANGE
        onset = rng.randint(lo, hi)
        if kind in fr.EVAL_FAULTS:      # the first affected evaluation is the onset
            onset = (onset // fr.EVAL_EVERY + 1) * fr.EVAL_EVERY
        out.append(fr.RunSpec(base.task, base.optimizer, base.schedule, base.lr_mult, base.seed,
                              base.batch_mult, fault=kind, onset=onset, base=base_id))
    return out


def _trace_path(cache: Path, spec: fr.RunSpec) -> Path:
    return cache / "traces" / f"{fr.run_id(spec)}.trace.jsonl"


#: task files a recording worker must load first (``--tasks-from``): a worker that does not
#: fork from the main process starts with the suite's own tasks
_WORKER_TASKS: list[str] = []


def _init_worker(task_files: Sequence[str]) -> None:
    for f in task_files:
        external.load(f)


def _record_one(args: tuple[fr.RunSpec, str]) -> tuple[str, dict[str, Any], float]:
    spec, path = args
    t0 = time.perf_counter()
    try:
        facts = fr.record_run(spec, Path(path))
    except Exception as exc:  # name the run: a pool's traceback alone does not
        raise RuntimeError(f"recording {fr.run_id(spec)} failed: {exc!r}") from exc
    return fr.run_id(spec), facts, time.perf_counter() - t0


def _known_hashes(cache: Path) -> dict[str, str]:
    try:
        data = json.loads((cache / "hashes.json").read_text())
        return {str(k): str(v) for k, v in data.items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _record_many(specs: Sequence[fr.RunSpec], cache: Path, jobs: int, rebuild: bool,
                 done: set[str], log: Callable[[str], None]) -> None:
    """Record the specs not yet in ``done`` whose cached trace is missing or stale."""
    known = _known_hashes(cache)
    todo = []
    for spec in specs:
        rid = fr.run_id(spec)
        if rid in done:
            continue
        path = _trace_path(cache, spec)
        if not rebuild and known.get(rid) == fr.spec_hash(spec) and path.exists():
            done.add(rid)
            continue
        todo.append((spec, str(path)))
    if not todo:
        return
    log(f"  recording {len(todo)} runs ({jobs} process{'es' if jobs > 1 else ''}) ...")
    t0 = time.perf_counter()
    results = []
    if jobs <= 1:
        it: Iterable[Any] = map(_record_one, todo)
    else:
        ex = ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker,
                                 initargs=(list(_WORKER_TASKS),))
        it = ex.map(_record_one, todo, chunksize=2)
    for i, res in enumerate(it, 1):
        results.append(res)
        if i % 50 == 0 or i == len(todo):
            log(f"    {i}/{len(todo)} recorded ({time.perf_counter() - t0:.0f} s)")
    if jobs > 1:
        ex.shutdown()
    for rid, _facts, _dt in results:
        done.add(rid)
    for spec, _ in todo:
        known[fr.run_id(spec)] = fr.spec_hash(spec)
    (cache / "hashes.json").write_text(json.dumps(known, indent=0, sort_keys=True))


def build_suite(cache: Path = DEFAULT_CACHE, *, seeds: Iterable[int] = FULL["seeds"],
                tasks: Iterable[str] = FULL["tasks"], natural: int = FULL["natural"],
                jobs: int = 2, rebuild: bool = False, manifest: str = "labels.json",
                log: Callable[[str], None] = print) -> Suite:
    """Record (or reuse from the cache) and label every scenario; writes the ``manifest``."""
    cache.mkdir(parents=True, exist_ok=True)
    seeds, tasks = list(seeds), list(tasks)
    specs: dict[str, fr.RunSpec] = {}
    for seed in seeds:
        for task in tasks:
            for spec in natural_specs(seed, task, natural):
                specs.setdefault(fr.run_id(spec), spec)
    pending = {(seed, task): base_candidates(seed, task) for seed in seeds for task in tasks}
    bases: dict[tuple[int, str], fr.RunSpec] = {}
    labels: dict[str, dict[str, Any]] = {}
    skipped: list[dict[str, Any]] = []

    def label_of(spec: fr.RunSpec) -> dict[str, Any]:
        rid = fr.run_id(spec)
        if rid not in labels:
            samples = read_trace(_trace_path(cache, spec))
            labels[rid] = (fr.label_natural(samples, fr.chance_accuracy(spec.task, spec.seed))
                           if spec.fault is None else fr.label_faulted(samples, spec))
            labels[rid]["steps_recorded"] = len(samples)
        return labels[rid]

    done: set[str] = set()
    while True:
        for cands in pending.values():
            if cands:
                specs.setdefault(fr.run_id(cands[0]), cands[0])
        _record_many(list(specs.values()), cache, jobs, rebuild, done, log)
        for key, cands in list(pending.items()):
            if not cands:
                continue
            lab = label_of(cands[0])
            # a clean base: an over-fitting one is rightly stopped before the fault's onset
            if lab["label"] == "healthy" and not lab.get("transient") \
                    and not lab.get("over_fit"):
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
        for f in fault_specs(base, fr.run_id(base)):
            specs.setdefault(fr.run_id(f), f)
    _record_many(list(specs.values()), cache, jobs, rebuild, done, log)
    scenarios = [Scenario(rid, spec, _trace_path(cache, spec), label_of(spec))
                 for rid, spec in specs.items()]
    scenarios.sort(key=lambda s: (s.family, s.spec.task, s.spec.seed, s.spec.fault or "", s.id))
    _write_manifest(cache / manifest, scenarios, skipped)
    return Suite(cache, scenarios, skipped)


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
    runs = [{"id": sc.id, "hash": fr.spec_hash(sc.spec), "family": sc.family,
             "trace": str(sc.path.relative_to(cache)), "kind": sc.kind,
             "spec": sc.spec.to_json(), **_jsonable(sc.label)} for sc in scenarios]
    doc = {"format": 2, "recording_version": fr.FORMAT_VERSION,
           "labelling_rules": {"natural": fr.label_natural.__doc__,
                               "faulted": fr.label_faulted.__doc__, "faults": fr.__doc__},
           "deadlines": {"step": DEADLINE, "early": DEADLINE_EARLY, **DEADLINE_EVAL},
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


def engine_runner(ruleset: Any) -> Callable[[Sequence[Sample]], list[Firing]]:
    """Replays a trace through a fresh :class:`lrwatch.rules.Engine` of ``ruleset``."""
    from lrwatch.rules import Engine

    def run(samples: Sequence[Sample]) -> list[Firing]:
        eng = Engine(ruleset)
        out = []
        for s in samples:
            for f in eng.update(s):
                if f.kind == "firing":
                    out.append(Firing(int(f.step), str(f.severity), str(f.rule)))
        return out
    return run


def lrwatch_detector(ruleset: Any, name: str, key: str = "lrwatch") -> Detector:
    """lrwatch's pack, critical firings only: the view the issue's targets use."""
    return Detector(key, name, engine_runner(ruleset), frozenset({"critical"}),
                    frozenset({"critical"}))


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------

def deadline_for(kind: str) -> int:
    if kind in DEADLINE_EVAL:
        return DEADLINE_EVAL[kind]
    if kind in fr.EARLY_FAULTS or kind in ("never_learned_natural", "stuck_above_natural"):
        return DEADLINE_EARLY
    return DEADLINE


def score_scenario(sc: Scenario, firings: Sequence[Firing], det: Detector) -> dict[str, Any]:
    """Outcome of one detector on one scenario (see module docstring for the measures)."""
    alarms = sorted(f.step for f in firings if f.severity in det.alarm)
    crit = sorted(f.step for f in firings if f.severity in det.false_alarm)
    warn = sorted(f.step for f in firings if f.severity in ("critical", "warning"))
    out: dict[str, Any] = {"first_alarm": alarms[0] if alarms else None,
                           "first_critical": crit[0] if crit else None,
                           "any_warning": bool(warn)}
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
    tol = NATURAL_TOLERANCE if sc.label["label"] == "diverged" else 0
    lo, hi = onset - tol, onset + deadline_for(sc.kind)
    hits = [s for s in alarms if lo <= s <= hi]
    out["caught"] = bool(hits)
    out["delay"] = max(0, hits[0] - onset) if hits else None
    if sc.kind in DEADLINE_EVAL and hits:
        out["delay_evals"] = out["delay"] // fr.EVAL_EVERY
    early = [s for s in crit if s < lo]
    out["false_alarm_before_onset"] = bool(early)
    if early:
        out["false_alarm_rules"] = sorted({f.rule for f in firings
                                           if f.severity in det.false_alarm and f.step < lo})
    nf = sc.label.get("first_nonfinite")
    if nf is not None:
        out["warned_before_nonfinite"] = any(lo <= s < int(nf) for s in warn)
    return out


def aggregate(rows: Sequence[tuple[Scenario, dict[str, Any]]]) -> dict[str, Any]:
    faults = [(sc, r) for sc, r in rows if sc.is_fault]
    healthy = [(sc, r) for sc, r in rows if sc.kind == "healthy"]
    over = [(sc, r) for sc, r in rows if sc.kind == "over_fit"]
    nf = [(sc, r) for sc, r in faults if "warned_before_nonfinite" in r]
    step_delays = [r["delay"] for sc, r in faults
                   if r.get("caught") and sc.kind not in DEADLINE_EVAL]
    eval_delays = [r["delay_evals"] for _, r in faults if "delay_evals" in r]
    caught = sum(1 for _, r in faults if r.get("caught"))
    warned = sum(1 for _, r in nf if r["warned_before_nonfinite"])
    return {
        "faults": len(faults), "caught": caught,
        "caught_ratio": caught / len(faults) if faults else None,
        "nonfinite_runs": len(nf), "warned": warned,
        "warned_ratio": warned / len(nf) if nf else None,
        "median_delay": statistics.median(step_delays) if step_delays else None,
        "median_delay_evals": statistics.median(eval_delays) if eval_delays else None,
        "healthy": len(healthy),
        "over_fit": len(over),
        "stopped_over_fit": sum(1 for _, r in over if r.get("first_critical") is not None),
        "false_alarms_healthy": sum(1 for _, r in healthy if r.get("false_alarm")),
        "warned_healthy": sum(1 for _, r in healthy if r.get("any_warning")),
        "false_alarms_before_onset": sum(1 for _, r in faults
                                         if r.get("false_alarm_before_onset")),
    }


def replay_all(suite: Suite, run: Callable[[Sequence[Sample]], list[Firing]],
               scenarios: Sequence[Scenario] | None = None) -> dict[str, list[Firing]]:
    """Firings of one detector on every scenario (id -> firings)."""
    return {sc.id: run(sc.samples()) for sc in (scenarios or suite.scenarios)}


def score_firings(suite: Suite, det: Detector, firings: dict[str, list[Firing]],
                  scenarios: Sequence[Scenario] | None = None
                  ) -> list[tuple[Scenario, dict[str, Any]]]:
    return [(sc, score_scenario(sc, firings[sc.id], det))
            for sc in (scenarios or suite.scenarios) if sc.id in firings]


def summarise(rows: Sequence[tuple[Scenario, dict[str, Any]]],
              families: Sequence[str]) -> dict[str, Any]:
    """Pooled, per-family and per-kind aggregates of one detector's scored rows."""
    return {"all": aggregate(rows),
            "by_family": {f: aggregate([x for x in rows if x[0].family == f]) for f in families},
            "by_kind": {k: aggregate([x for x in rows if x[0].kind == k]) for k in KINDS}}


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------

def _pct(n: int, d: int) -> str:
    return f"{100 * n / d:5.1f}% ({n}/{d})" if d else "   n/a"


def _delay(v: float | None) -> str:
    return "n/a" if v is None else f"{v:g}"


_HEAD = ("| {:44} | {:16} | {:16} | {:6} | {:10} | {:14} | {:14} | {:14} |".format(
    "detector", "caught", "warned before NF", "delay", "delay eval", "FA healthy",
    "FA before onset", "warned healthy"))


def format_row(name: str, a: dict[str, Any]) -> str:
    return ("| {:44} | {:16} | {:16} | {:>6} | {:>10} | {:14} | {:14} | {:14} |".format(
        name[:44], _pct(a["caught"], a["faults"]), _pct(a["warned"], a["nonfinite_runs"]),
        _delay(a["median_delay"]), _delay(a["median_delay_evals"]),
        _pct(a["false_alarms_healthy"], a["healthy"]),
        _pct(a["false_alarms_before_onset"], a["faults"]),
        _pct(a["warned_healthy"], a["healthy"])))


def format_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    sep = "|" + "|".join("-" * len(c) for c in _HEAD.split("|")[1:-1]) + "|"
    return "\n".join([_HEAD, sep, *(format_row(n, a) for n, a in rows)])


def format_kinds(results: Sequence[tuple[str, dict[str, Any]]]) -> str:
    first = results[0][1]
    kinds = [k for k in KINDS if first["by_kind"][k]["faults"]]
    head = "| " + f"{'detector':44}" + " | " + " | ".join(
        f"{k} ({first['by_kind'][k]['faults']})"[:24].ljust(24) for k in kinds) + " |"
    lines = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
    for name, r in results:
        cells = []
        for k in kinds:
            a = r["by_kind"][k]
            c = f"{100 * a['caught'] / a['faults']:.0f}% d={_delay(a['median_delay'])}"
            if a["median_delay_evals"] is not None:
                c = f"{100 * a['caught'] / a['faults']:.0f}% d={_delay(a['median_delay_evals'])}ev"
            cells.append(c[:24].ljust(24))
        lines.append(f"| {name[:44]:44} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_suite(suite: Suite) -> str:
    from collections import Counter
    c = Counter((sc.family, sc.kind) for sc in suite.scenarios)
    fams = sorted({sc.family for sc in suite.scenarios})
    kinds = ["healthy", "over_fit", "ambiguous", *KINDS]
    head = "| kind | " + " | ".join(fams) + " | all |"
    lines = [head, "|---" * (len(fams) + 2) + "|"]
    for k in kinds:
        n = [c[(f, k)] for f in fams]
        if sum(n):
            lines.append(f"| {k} | " + " | ".join(map(str, n)) + f" | {sum(n)} |")
    trans = sum(1 for sc in suite.scenarios if sc.label.get("transient"))
    nf = sum(1 for sc in suite.scenarios if sc.is_fault and sc.label.get("first_nonfinite"))
    return (f"{len(suite.scenarios)} recorded runs; {nf} faults reach a non-finite value; "
            f"{trans} healthy runs have an early transient\n" + "\n".join(lines))


def _config(args: argparse.Namespace, ap: argparse.ArgumentParser) -> dict[str, Any]:
    """The run's seeds, tasks and natural-run count; loads ``--tasks-from`` and settles the
    cache (an error exits through ``ap``)."""
    cfg = dict(QUICK if args.quick else FULL)
    if args.tasks_from is not None:
        try:
            cfg["tasks"] = tuple(external.load(args.tasks_from)[0])
        except external.TaskFileError as exc:
            ap.error(str(exc))
        _WORKER_TASKS[:] = [str(args.tasks_from)]
    if args.cache is None:
        args.cache = (DEFAULT_CACHE if args.tasks_from is None
                      else external.cache_dir("detection", args.tasks_from))
    if args.seeds:
        cfg["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks import lofo

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one seed, 4 natural runs per task")
    ap.add_argument("--cache", type=Path, default=None,
                    help="traces + labels.json (default: benchmarks/.cache/detection-families; "
                         "with --tasks-from: benchmarks/.cache/detection-<file stem>)")
    ap.add_argument("--tasks-from", type=Path, default=None, metavar="FILE",
                    help="record and score the model/task families of a task file instead of "
                         "the suite's (benchmarks/external.py says what it defines)")
    ap.add_argument("--record-only", action="store_true",
                    help="record and label the runs, score nothing")
    ap.add_argument("--rebuild", action="store_true", help="re-record every run")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="recording and replay processes")
    ap.add_argument("--seeds", type=str, default=None, help="comma-separated seeds")
    ap.add_argument("--rules", type=str, default=None,
                    help="score this rule file instead of the default training pack")
    ap.add_argument("--no-lofo", action="store_true",
                    help="skip the leave-one-family-out tuning (score the pack as given)")
    ap.add_argument("--json", type=Path, default=None,
                    help="results file (default: <cache>/results[-quick].json)")
    args = ap.parse_args(argv)
    cfg = _config(args, ap)
    t0 = time.perf_counter()
    log = lambda m: print(m, flush=True)  # noqa: E731
    log(f"detection benchmark ({'quick' if args.quick else 'full'}): seeds {cfg['seeds']}, "
        f"{len(cfg['tasks'])} tasks in {len(fr.FAMILIES)} families")
    suite = build_suite(args.cache, seeds=cfg["seeds"], tasks=cfg["tasks"],
                        natural=cfg["natural"], jobs=args.jobs, rebuild=args.rebuild,
                        manifest="labels-quick.json" if args.quick else "labels.json", log=log)
    log(format_suite(suite))
    for s in suite.skipped:
        log(f"  skipped: seed {s['seed']} {s['task']}: {s['why']}")
    if suite.skipped:
        log(f"WARNING: {len(suite.skipped)} task/seed pair(s) got no injected faults (no "
            "healthy run at the tuned rate to inject them into); their families are scored on "
            "natural runs only. Check the tuned rates (benchmarks/external.py --sweep).")
    if args.record_only:
        log(f"recorded and labelled in {args.cache} ({time.perf_counter() - t0:.0f} s)")
        return 0
    doc = lofo.run(suite, rules=args.rules, lofo=not args.no_lofo, jobs=args.jobs, log=log)
    out = args.json or (args.cache / ("results-quick.json" if args.quick else "results.json"))
    doc.update({"config": {"mode": "quick" if args.quick else "full",
                           "seeds": list(cfg["seeds"]), "tasks": list(cfg["tasks"]),
                           "natural_per_task": cfg["natural"],
                           "deadlines": {"step": DEADLINE, "early": DEADLINE_EARLY,
                                         **DEADLINE_EVAL},
                           "natural_tolerance": NATURAL_TOLERANCE,
                           "rules": args.rules or "training", "targets": TARGETS},
                "seconds": round(time.perf_counter() - t0, 1)})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable(doc), indent=1, allow_nan=False))
    log(f"\nresults: {out}  ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
