"""Leave-one-family-out tuning and scoring of the default training pack.

The pack's tunable thresholds (``KNOBS``: each a rule, a key and the candidate values, with the
reason it is tunable at all) are chosen on five model/task families and the sixth family is
scored with that choice; the pooled held-out row adds up the six held-out scores. A choice is
the candidate with, on the tuning families and critical firings only: the fewest false alarms
(healthy runs and before the onset), then the most faults caught, then the fewest healthy runs
with any warning, then the smallest median delay. Every candidate configuration is replayed
once over the whole suite and cached (the engine is deterministic); the search is a coordinate
search (each knob in turn, two passes) started from the shipped values.

The shipped pack should be the choice made on all six families; the report says whether it is.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import yaml

from benchmarks import detection as det

__all__ = ["Knob", "KNOBS", "run", "ruleset_for"]


@dataclass(frozen=True)
class Knob:
    """One tunable value of the pack: ``key`` is ``for`` or ``params.NAME`` of rule ``rule``."""

    rule: str
    key: str
    values: tuple[Any, ...]
    why: str

    @property
    def name(self) -> str:
        return f"{self.rule}.{self.key}"


#: What is tuned, and why each value is not a measured quantity already. The first value of
#: each knob is where the coordinate search starts.
KNOBS: tuple[Knob, ...] = (
    Knob("loss_far_above_start", "for", (6, 1, 3, 10),
         "how long the loss must stay 10x above the untrained loss: adaptive optimizers spike "
         "early for a few steps and recover"),
    Knob("loss_falling", "params.min_change", (0.5, 0.3, 0.7),
         "how far (log units) the loss must fall over 6 steps for a loss far above its start "
         "to count as a transient that is recovering (the veto of loss_above_start)"),
    Knob("loss_flat_above_untrained", "params.above", (1.2, 0.9, 1.0, 1.5, 2.0),
         "the share of the untrained loss a dead network sits at: a constant prediction's loss "
         "(the label entropy) is below the untrained loss by a task-dependent amount"),
    Knob("loss_near_untrained", "params.above", (0.7, 0.6, 0.8),
         "how close to its untrained level a dead network's loss sits (the label entropy)"),
    Knob("loss_below_constant", "params.below", (0.85, 0.8, 0.9),
         "how far below the best constant prediction's loss a network must sit to count as "
         "alive (the veto of the dead-network rules; dead networks sit at 0.91-1.4x of it, "
         "batch noise around that)"),
    Knob("loss_near_untrained", "params.window", (80, 40, 60),
         "how many steps of flat loss tell a dead network from a slow start"),
    Knob("eval_accuracy_frozen", "params.count", (3, 4, 5),
         "how many identical held-out accuracies mean a constant prediction"),
    Knob("eval_loss_frozen", "params.rtol", (0.001, 0.003, 0.0003),
         "how still a dead network's evaluation loss is"),
    Knob("loss_above_half_untrained", "params.above", (0.5, 0.4, 0.6),
         "the loss level, as a share of the untrained loss, above which a frozen accuracy "
         "means a constant prediction"),
    Knob("eval_accuracy_stuck", "params.count", (5, 4, 6, 8),
         "how many identical held-out accuracies mean a constant prediction"),
    Knob("grad_explosion", "params.threshold", (6.0, 8.0, 10.0),
         "robust z of a gradient-norm spike that grad_loss_divergence escalates"),
    Knob("loss_shift_persistent", "for", (20, 10, 40),
         "how long a loss shift must persist before it is a sustained episode"),
    Knob("loss_level_shift", "params.alpha", (0.03, 0.01, 0.05),
         "how fast the persistent-shift reference follows the loss: slower lags behind a loss "
         "still falling (blind), faster absorbs a shift before it has persisted"),
    Knob("lr_raised", "params.window", (50, 100, 200),
         "for how long a raised rate explains a higher loss (the veto of "
         "loss_shift_persistent)"),
    Knob("loss_flat_above_untrained", "params.window", (60, 40, 80),
         "how many steps of flat loss tell a dead network from a slow start"),
    Knob("loss_flat_at_constant", "params.above", (1.0, 0.9, 1.1),
         "the share of the constant-prediction loss that a network which never learned still "
         "sits at after `window` steps (never_learned)"),
    Knob("loss_flat_at_constant", "params.window", (80, 100, 150),
         "how many steps of flat loss tell a network that never learned from a slow starter"),
    Knob("loss_excursion", "params.above", (2.0, 1.5, 3.0),
         "how far above the untrained loss an earlier excursion must reach to count as damage "
         "(never_learned's evidence; a slow starter's loss stays within 1.3x of it)"),
    Knob("grad_excursion", "params.above", (5.0, 3.0, 10.0),
         "how far above its start the gradient norm must have reached to count as damage"),
    Knob("grad_faded", "params.below", (0.5, 0.3, 0.7),
         "how far below its start the gradient norm (median of 20 steps) must have faded to "
         "count as damage (a zeroed or saturated network passes almost no gradient)"),
    Knob("eval_accuracy_far_below_best", "params.z", (6.0, 4.0, 5.0, 8.0),
         "how far below its best, in its own noise, the evaluation accuracy must fall"),
    Knob("eval_accuracy_far_below_best", "params.count", (2, 3),
         "how many evaluations in a row must be that far below"),
    Knob("eval_accuracy_far_below_best", "params.min_drop", (0.02, 0.0, 0.01, 0.03),
         "the smallest fall below the best that counts (accuracy points): on a large "
         "evaluation set a point lost to slight over-fitting is many noise sigmas"),
    Knob("eval_accuracy_below_best", "params.min_drop", (0.02, 0.0, 0.01, 0.03),
         "the same floor for eval_regression_both's accuracy half"),
    Knob("eval_loss_far_above_best", "params.z", (10.0, 8.0, 12.0, 15.0, 20.0),
         "the same for the evaluation loss, which over-fitting raises more"),
    Knob("eval_loss_far_above_best", "params.count", (3, 1, 2, 4),
         "how many evaluations in a row"),
    Knob("eval_loss_far_above_best", "params.min_drop", (0.223, 0.095, 0.0, 0.049),
         "the smallest rise above the best that counts (log units: 25%, 10%, 0, 5%): a smooth "
         "evaluation loss makes a slight drift many noise sigmas"),
    Knob("eval_loss_rising", "params.window", (5, 6, 8),
         "how many evaluations the steady rise of the evaluation loss is judged over"),
    Knob("eval_loss_rising", "params.min_change", (0.095, 0.049, 0.182),
         "how far the evaluation loss must rise over that window (log units: 10%, 5%, 20%): "
         "slow over-fitting rises a few percent"),
    Knob("eval_accuracy_falling", "params.min_change", (0.05, 0.03, 0.1),
         "how far the evaluation accuracy must fall over 5 evaluations, relative to its level"),
    Knob("lr_raised_lately", "params.window", (100, 60, 200),
         "how long after a rise of the rate a rising evaluation loss is put down to it (the "
         "held-out loss lags the rate)"),
    Knob("loss_collapse", "params.alpha", (0.00001, 0.0001, 0.000001),
         "per-batch false-alarm probability of the collapse's run-length test: how unlikely a "
         "run of batches at the untrained level must be under the run's own rate"),
    Knob("lr_annealed", "params.factor", (0.05, 0.02, 0.1),
         "the share of its largest rate below which an annealed schedule freezes evaluations "
         "(eval_loss_frozen's rtol over the per-evaluation change of healthy runs at full "
         "rate: 0.02-0.18 by family, 0.05 pooled)"),
    Knob("eval_loss_above_best", "params.z", (4.0, 3.0, 6.0, 8.0),
         "how far above its best the evaluation loss must be when the accuracy fell too "
         "(eval_regression_both)"),
)


def _set(rule: dict[str, Any], key: str, value: Any) -> None:
    if key.startswith("params."):
        rule.setdefault("params", {})[key.split(".", 1)[1]] = value
    else:
        rule[key] = value


def _get(rule: Mapping[str, Any], key: str) -> Any:
    if key.startswith("params."):
        return (rule.get("params") or {}).get(key.split(".", 1)[1])
    return rule.get(key)


def pack_doc(rules: str | None) -> dict[str, Any]:
    from lrwatch.rules.schema import pack_text

    text = open(rules).read() if rules else pack_text("training")
    return yaml.safe_load(text)


def ruleset_for(doc: Mapping[str, Any], config: Mapping[str, Any]) -> Any:
    """The pack ``doc`` with the knob values of ``config`` (knob name -> value) applied."""
    from lrwatch.rules.schema import parse_rules

    d = yaml.safe_load(yaml.safe_dump(doc))
    by_name = {r["name"]: r for r in d["rules"]}
    for knob in KNOBS:
        # a knob the rule file does not set (an older file) keeps the detector's default
        if knob.name in config and knob.rule in by_name and config[knob.name] is not None:
            _set(by_name[knob.rule], knob.key, config[knob.name])
    return parse_rules(yaml.safe_dump(d, sort_keys=False), source="<lofo>")


def shipped_config(doc: Mapping[str, Any]) -> dict[str, Any]:
    by_name = {r["name"]: r for r in doc["rules"]}
    return {k.name: _get(by_name[k.rule], k.key) for k in KNOBS if k.rule in by_name}


# --------------------------------------------------------------------------------------------
# replay (in worker processes: each holds the suite once and replays one chunk of it)
# --------------------------------------------------------------------------------------------

_W: dict[str, Any] = {}
Config = tuple[tuple[str, Any], ...]


def _init(suite: det.Suite, doc: Mapping[str, Any]) -> None:
    _W["suite"], _W["doc"] = suite, doc


def _replay(job: tuple[Config, int, int]) -> dict[str, list[det.Firing]]:
    config, part, parts = job
    rs = ruleset_for(_W["doc"], dict(config))
    suite = _W["suite"]
    return det.replay_all(suite, det.engine_runner(rs), suite.scenarios[part::parts])


def _key(config: Mapping[str, Any]) -> Config:
    return tuple(sorted(config.items()))


def _objective(a: Mapping[str, Any]) -> tuple[float, ...]:
    fa = a["false_alarms_healthy"] + a["false_alarms_before_onset"]
    md = a["median_delay"] if a["median_delay"] is not None else 1e9
    return (fa, -a["caught"], a["warned_healthy"], md)


def _choose(rows_by_cfg: Mapping[Config, Sequence[tuple[det.Scenario, dict[str, Any]]]],
            families: Sequence[str]) -> Config:
    """The configuration with the best objective on ``families`` (first one on ties)."""
    best, best_obj = None, None
    for cfg, rows in rows_by_cfg.items():
        obj = _objective(det.aggregate([x for x in rows if x[0].family in families]))
        if best_obj is None or obj < best_obj:
            best, best_obj = cfg, obj
    assert best is not None
    return best


class _Scorer:
    """Replays (once per configuration, cached) and scores configurations of the pack."""

    def __init__(self, suite: det.Suite, doc: Mapping[str, Any], jobs: int,
                 log: Callable[[str], None]) -> None:
        self.suite, self.doc, self.jobs, self.log = suite, doc, jobs, log
        self.rows: dict[Config, list[tuple[det.Scenario, dict[str, Any]]]] = {}
        self.seconds = 0.0
        self.ex = (ProcessPoolExecutor(jobs, initializer=_init, initargs=(suite, doc))
                   if jobs > 1 else None)
        if self.ex is None:
            _init(suite, doc)
        self.crit = det.Detector("lrwatch", "lrwatch", lambda s: [], frozenset({"critical"}),
                                 frozenset({"critical"}))

    def __call__(self, cfg: Config) -> list[tuple[det.Scenario, dict[str, Any]]]:
        import time
        if cfg not in self.rows:
            t0 = time.perf_counter()
            parts = max(1, self.jobs)
            jobs = [(cfg, i, parts) for i in range(parts)]
            chunks = self.ex.map(_replay, jobs) if self.ex else map(_replay, jobs)
            firings: dict[str, list[det.Firing]] = {}
            for c in chunks:
                firings.update(c)
            self.seconds += time.perf_counter() - t0
            self.rows[cfg] = det.score_firings(self.suite, self.crit, firings)
            if len(self.rows) % 5 == 0:
                self.log(f"    {len(self.rows)} configurations replayed "
                         f"({self.seconds:.0f} s)")
        return self.rows[cfg]

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown()

    def search(self, start: Mapping[str, Any], families: Sequence[str]) -> Config:
        """Coordinate search from ``start``: each knob in turn takes the value with the best
        objective on ``families`` given the others; two passes."""
        cur = dict(start)
        for _ in range(2):
            for knob in KNOBS:
                cands = {}
                for v in knob.values:
                    cfg = _key({**cur, knob.name: v})
                    cands[cfg] = self(cfg)
                cur = dict(_choose(cands, families))
        return _key(cur)


def run(suite: det.Suite, *, rules: str | None = None, lofo: bool = True, jobs: int = 2,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Tune, score and print every table; returns the results document."""
    doc = pack_doc(rules)
    families = sorted({sc.family for sc in suite.scenarios})
    shipped = shipped_config(doc)
    names = {r["name"] for r in doc["rules"]}
    lofo = lofo and all(k.rule in names for k in KNOBS)
    scorer = _Scorer(suite, doc, jobs, log)
    log(f"  replaying the pack over {len(suite.scenarios)} traces ({jobs} processes) ...")
    shipped_rows = scorer(_key(shipped))
    per100 = 100 * scorer.seconds / len(suite.scenarios)
    log(f"  replay: {scorer.seconds:.1f} s for the suite = {per100:.2f} s per 100 traces "
        f"({jobs} processes; x{jobs} for one core)")
    out: dict[str, Any] = {"families": families, "knobs": [k.__dict__ for k in KNOBS],
                           "replay_seconds_per_100_traces": per100, "replay_processes": jobs}
    if lofo:
        start = {k.name: k.values[0] for k in KNOBS}
        held_rows: list[tuple[det.Scenario, dict[str, Any]]] = []
        choices = {}
        for fam in families:
            cfg = scorer.search(start, [f for f in families if f != fam])
            choices[fam] = dict(cfg)
            held_rows += [x for x in scorer(cfg) if x[0].family == fam]
        all_cfg = scorer.search(start, families)
        out["lofo"] = {"choices": choices, "chosen_on_all": dict(all_cfg),
                       "shipped_equals_all": _key(shipped) == all_cfg,
                       "configurations_replayed": len(scorer.rows),
                       **det.summarise(held_rows, families)}
        log("\nLeave-one-family-out (critical firings only): each family scored by the knobs "
            "chosen on the other five")
        tables = [(f"held out: {f}", out["lofo"]["by_family"][f]) for f in families]
        tables.append(("POOLED held-out (LOFO)", out["lofo"]["all"]))
        log(det.format_table(tables))
        log("\nknobs chosen per held-out family:")
        for f, c in choices.items():
            log(f"  without {f}: " + ", ".join(f"{k}={v}" for k, v in c.items()))
        log("  on all families: " + ", ".join(f"{k}={v}" for k, v in dict(all_cfg).items())
            + ("  (= shipped pack)" if out["lofo"]["shipped_equals_all"] else
               "  (!= shipped pack " + str(shipped) + ")"))
    scorer.close()
    out["shipped"] = det.summarise(shipped_rows, families)
    out["pack_name"] = f"lrwatch {rules}" if rules else "lrwatch shipped pack (tuned on all)"
    anchors = {}
    for a in det.anchor_detectors():
        rows = det.score_firings(suite, a, det.replay_all(suite, a.run))
        anchors[a.key] = {"name": a.name, **det.summarise(rows, families)}
    out["anchors"] = anchors
    _report(out, families, log)
    out["misses"] = _misses(shipped_rows)
    log("\nShipped pack: misses and false alarms")
    for line in out["misses"][:60]:
        log("  " + line)
    return out


def _report(out: Mapping[str, Any], families: Sequence[str],
            log: Callable[[str], None]) -> None:
    log("\nPooled over all families, against the anchors (critical only; anchors always stop)")
    pooled = ([("lrwatch LOFO held-out", out["lofo"]["all"])] if "lofo" in out else [])
    pooled += [(out.get("pack_name", "lrwatch shipped pack (tuned on all)"),
                out["shipped"]["all"])]
    pooled += [(a["name"], a["all"]) for a in out["anchors"].values()]
    log(det.format_table(pooled))
    log("\nShipped pack per family:")
    log(det.format_table([(f, out["shipped"]["by_family"][f]) for f in families]))
    log("\nBy kind (caught %, d = median delay in steps, or evaluations: ev):")
    kinds = ([("lrwatch LOFO held-out", out["lofo"])] if "lofo" in out else [])
    kinds += [("lrwatch shipped", out["shipped"])]
    kinds += [(a["name"], a) for a in out["anchors"].values()]
    log(det.format_kinds(kinds))


def _misses(rows: Sequence[tuple[det.Scenario, dict[str, Any]]]) -> list[str]:
    lines = []
    for sc, r in rows:
        if sc.is_fault and not r.get("caught"):
            lines.append(f"MISS {sc.kind:22} {sc.id} onset {sc.label['onset']} first critical "
                         f"{r.get('first_critical')}")
        if r.get("false_alarm") or r.get("false_alarm_before_onset"):
            lines.append(f"FA   {sc.kind:22} {sc.id} onset {sc.label.get('onset')} "
                         f"first critical {r.get('first_critical')} {r.get('false_alarm_rules')}")
    return lines

