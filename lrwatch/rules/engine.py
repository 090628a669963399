"""The rules engine: samples in, firings and resolutions out. Pure, deterministic, resumable.

The engine never touches a model, a socket or a file: it keeps one detector per (rule, metric)
plus a few counters per rule, so the Watcher (live) and ``lrwatch replay`` (recorded traces) get
exactly the same events from the same samples.

Per rule and sample, each watched metric that the sample carries updates its detector; the rule
is *anomalous* if any detector answers ``True``, *normal* if none does and at least one answers
``False``, and unjudged (counters untouched) otherwise. Then:

* ``for``: the rule fires after that many consecutive anomalous judgements (or once the anomaly
  has lasted that long, by sample time);
* ``hysteresis``: a firing rule resolves after that many consecutive normal judgements (or that
  long);
* ``cooldown``: after a resolution the rule does not fire again for that many steps (or that
  long).

A rule with ``given: METRIC`` hands its detector the latest value of that other metric with
every value (carried over from earlier samples when this one lacks it; ``None`` before it has
been seen): the ``drop`` detector judges an evaluation against earlier ones made at a comparable
learning rate. The engine keeps those latest values in its state.

Rules with ``when`` fire on other rules (escalation). They are judged on every sample, after all
metric rules and after the rules they refer to: anomalous while the condition holds (``firing``:
the rule is firing; ``all``/``any`` with ``within: k``: every/any named rule was firing on a
sample at most ``k`` steps back), normal otherwise, through the same ``for``/``hysteresis``/
``cooldown`` counters. The engine remembers the last step each referenced rule was firing.

Examples
--------
>>> from lrwatch.samples import Sample
>>> from lrwatch.rules.schema import parse_rules
>>> rules = parse_rules('''
... rules:
...   - name: nan_loss
...     metric: loss
...     detector: nonfinite
...     severity: critical
...     actions: [rollback]
...     annotations: {summary: "loss is {value} at step {step}"}
... ''')
>>> eng = Engine(rules)
>>> eng.update(Sample(step=1, values={"loss": 2.0}))
[]
>>> [(e.kind, e.step, e.message) for e in eng.update(Sample(step=2, values={"loss": float("nan")}))]
[('firing', 2, 'loss is nan at step 2')]
>>> list(eng.active)
['nan_loss']
>>> [(e.kind, e.step) for e in eng.update(Sample(step=3, values={"loss": 1.9}))]
[('resolved', 3)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from operator import attrgetter
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Tuple

from ..errors import ConfigError, DamagedStateError
from ..samples import Sample, encode_number
from .detectors import Detector
from .schema import Rule, RuleSet, Span, when_order
from .templates import render

__all__ = ["Engine", "Firing", "STEP_METRIC"]

#: Pseudo-metric that every sample carries: its step number (for ``rate`` and ``staleness``).
STEP_METRIC = "step"
#: Set by the Watcher's guard on a step it kept off the parameters (docs/recovery.md).
DROPPED_METRIC = "grad_dropped"
#: What a dropped step still tells the rules: its settings, evaluations (of a model the step
#: did not change), the levels measured before training, and that something was not finite
#: (the non-finite rules fire, and the recovery policy knows the step was dealt with). Its
#: finite loss, gradient norms and the like describe a batch that never reached the
#: parameters (a spike: a gradient norm 1e5 times the usual one), and are not judged: they
#: would stay in the detectors' windows and make the next ordinary steps look vanished.
_KEPT_WHEN_DROPPED = ("eval_", "lr", "momentum", "step_time_seconds", "samples_per_second",
                      "untrained_loss", "constant_loss", "nonfinite_", DROPPED_METRIC)


def judged_values(sample: Sample) -> Mapping[str, float]:
    """The values of ``sample`` the rules judge: all of them, unless the step was dropped.

    >>> judged_values(Sample(step=3, values={"loss": 9e9, "lr": 0.1, "grad_dropped": 1.0}))
    {'lr': 0.1, 'grad_dropped': 1.0}
    >>> judged_values(Sample(step=4, values={"loss": float("nan"), "grad_dropped": 1.0}))
    {'loss': nan, 'grad_dropped': 1.0}
    """
    vals = sample.values
    if not vals.get(DROPPED_METRIC, 0.0) >= 0.5:
        return vals
    return {k: v for k, v in vals.items()
            if k.startswith(_KEPT_WHEN_DROPPED) or not math.isfinite(v)}
_DEFAULT_SUMMARY = "{rule}: {metric} = {value:.4g} at step {step}"
#: The saved state of a rule that has seen nothing (for 'when' rules added since a state was saved).
_FRESH: Mapping[str, Any] = MappingProxyType({
    "pending": 0, "pending_since": None, "pending_step": None, "clear": 0, "clear_since": None,
    "resolved_step": None, "resolved_time": None, "detectors": {}, "firing": None})
_SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
#: A rule state's firing (the tracked rules firing now are picked by it, in C).
_FIRING = attrgetter("firing")
#: The most sets of metric names whose rule plans an engine keeps (a run logs a handful).
_MOST_PLANS = 64


def _num(v: float | None) -> float | str | None:
    return encode_number(v)


def _unnum(v: Any) -> float | None:
    return None if v is None else float(v)


@dataclass(frozen=True)
class Firing:
    """One event of a rule: it started firing (``kind='firing'``) or stopped (``'resolved'``).

    ``value`` is the watched metric's value that triggered the event (for staleness: the age in
    seconds), ``message`` the rendered ``summary`` annotation, ``annotations`` every rendered
    annotation, ``labels`` the rule's labels, ``metric`` the metric that triggered.
    """

    rule: str
    step: int
    time: float | None
    severity: str
    actions: tuple[str, ...]
    value: float | None
    message: str
    kind: str = "firing"
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    metric: str | None = None
    #: For a ``when`` rule: the step at which its evidence began (the earliest start of the
    #: referenced firings it relied on), so that a rollback can go back before it.
    since: int | None = None
    #: The step the failure began: the first anomalous judgement of the streak that made the
    #: rule fire (a ``for:`` window's first pending step; the firing step without ``for:``),
    #: and for a ``when`` rule the earliest onset of the firings it combines. The recovery
    #: policy compares it with a resumed run's start (``None``: unknown, from a state saved
    #: before onsets were kept).
    onset: int | None = None

    def to_json(self, trace: str) -> dict[str, Any]:
        """The ``lrwatch replay --json`` record (non-finite values as ``"nan"``/``"inf"``).

        >>> f = Firing("r", 3, None, "info", ("alert",), 1.5, "m")
        >>> f.to_json("t.jsonl")
        {'trace': 't.jsonl', 'rule': 'r', 'step': 3, 'severity': 'info', 'actions': ['alert'], 'value': 1.5, 'message': 'm'}
        """
        return {"trace": trace, "rule": self.rule, "step": self.step, "severity": self.severity,
                "actions": list(self.actions), "value": _num(self.value), "message": self.message}

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-serialisable (used by ``Engine.state_dict``)."""
        return {"rule": self.rule, "step": self.step, "time": _num(self.time),
                "severity": self.severity, "actions": list(self.actions),
                "value": _num(self.value), "message": self.message, "kind": self.kind,
                "labels": dict(self.labels), "annotations": dict(self.annotations),
                "metric": self.metric, "since": self.since, "onset": self.onset}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Firing":
        return cls(rule=d["rule"], step=int(d["step"]), time=_unnum(d.get("time")),
                   severity=d["severity"], actions=tuple(d.get("actions", ())),
                   value=_unnum(d.get("value")), message=d.get("message", ""),
                   kind=d.get("kind", "firing"), labels=dict(d.get("labels", {})),
                   annotations=dict(d.get("annotations", {})), metric=d.get("metric"),
                   since=d.get("since"), onset=d.get("onset"))

    @property
    def severity_rank(self) -> int:
        """0 for info, 1 for warning, 2 for critical (for ``--fail-on``-style comparisons)."""
        return _SEVERITY_RANK.get(self.severity, 0)


def _names(names: Iterable[str], most: int = 8) -> str:
    """Up to ``most`` names, sorted, and how many more.

    >>> _names(["b", "a"]), _names("abcde", most=2)
    ('a, b', 'a, b and 3 more')
    """
    ordered = sorted(names)
    more = len(ordered) - most
    return ", ".join(ordered[:most]) + (f" and {more} more" if more > 0 else "")


def _mismatch(saved: set[str], expected: set[str]) -> str:
    """Why a saved state does not load: the rules it holds that the engine lacks and those it
    lacks, by name (the two whole lists, 60 names each, hid a single turned-off rule).

    >>> print(_mismatch({"a", "b", "stalled"}, {"a", "b", "mine"}))
    the engine state was saved under other rules: it holds rules these rules lack (turned off, renamed or removed since): stalled; it lacks rules these rules have (added since): mine. Load it with the rules it was saved with (the same packs and files, in the same order)
    """
    parts = []
    if saved - expected:
        parts.append(f"it holds rules these rules lack (turned off, renamed or removed since): "
                     f"{_names(saved - expected)}")
    if expected - saved:
        parts.append(f"it lacks rules these rules have (added since): {_names(expected - saved)}")
    return (f"the engine state was saved under other rules: {'; '.join(parts)}. Load it with "
            f"the rules it was saved with (the same packs and files, in the same order)")


def _latest(firings: Iterable[Firing | None]) -> Firing | None:
    """The firing that started latest (the first of equals), ignoring ``None``."""
    best: Firing | None = None
    for f in firings:
        if f is not None and (best is None or f.step > best.step):
            best = f
    return best


class _HasStatistic(Protocol):
    @property
    def statistic(self) -> float | None: ...


#: What triggered an event: the metric, its value, and what reports the statistic (a detector,
#: or for a 'when' rule its state: the number of samples the condition has held).
_Hit = Tuple[Optional[str], Optional[float], _HasStatistic]


def _met(span: Span, count: int, since: float | None, t: float | None) -> bool:
    if span.seconds is None:
        return count >= span.count
    if since is None or t is None:  # no sample times: a duration cannot be measured, so it is met
        return True
    return t - since >= span.seconds


class _RuleState:
    """Mutable per-rule state: the detectors and the for/hysteresis/cooldown counters.

    For a rule that ``when`` rules refer to (``tracked``), also the last step at which it was
    firing and that firing event; for a ``when`` rule, the states of the rules it refers to.
    """

    __slots__ = ("rule", "pairs", "absent", "given", "pending", "pending_since", "pending_step",
                 "clear", "clear_since",
                 "resolved_step", "resolved_time", "firing", "refs", "unless", "tracked",
                 "last_step", "last_firing", "needed", "within")

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.pairs: list[tuple[str, Detector]] = [(m, rule.make_detector()) for m in rule.metrics]
        self.absent = any(d.watches_absence for _, d in self.pairs)
        self.given = rule.given
        self.pending = 0
        self.pending_since: float | None = None
        self.pending_step: int | None = None   # the step of the streak's first anomalous judgement
        self.clear = 0
        self.clear_since: float | None = None
        self.resolved_step: int | None = None
        self.resolved_time: float | None = None
        self.firing: Firing | None = None
        self.refs: tuple[_RuleState, ...] = ()
        self.unless: tuple[_RuleState, ...] = ()   # a 'when' rule's vetoes: judged before it
        self.tracked = False
        self.last_step: int | None = None
        self.last_firing: Firing | None = None
        self.needed: _RuleState | None = None   # for a 'when' rule: see Engine.__init__
        self.within: int | None = None

    _COUNTERS = ("pending", "pending_since", "clear", "clear_since", "resolved_step",
                 "resolved_time")

    @property
    def statistic(self) -> float:
        """For a ``when`` rule's events: the number of samples its condition has held."""
        return float(self.pending)

    def state_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: getattr(self, k) for k in self._COUNTERS}
        d["pending_step"] = self.pending_step
        d["detectors"] = {m: det.state_dict() for m, det in self.pairs}
        d["firing"] = self.firing.to_dict() if self.firing is not None else None
        if self.tracked:  # only referenced rules: packs without 'when' keep their state as it was
            d["last_firing_step"] = self.last_step
            d["last_firing"] = self.last_firing.to_dict() if self.last_firing else None
        return d

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        dets = d["detectors"]
        if set(dets) != {m for m, _ in self.pairs}:
            raise ConfigError(f"rule {self.rule.name!r}: saved metrics {sorted(dets)} do not "
                              f"match the rule's {list(self.rule.metrics)}")
        for m, det in self.pairs:
            try:
                det.load_state_dict(dets[m])
            except DamagedStateError as exc:
                raise DamagedStateError(f"rule {self.rule.name!r}, metric {m!r}: {exc}") \
                    from None
            except ConfigError as exc:
                raise ConfigError(f"rule {self.rule.name!r}, metric {m!r}: {exc} (the rule "
                                  f"was changed since the state was saved)") from None
        for k in self._COUNTERS:
            setattr(self, k, d[k])
        # saved before onsets were kept: a streak's first step is unknown (None)
        step = d.get("pending_step")
        self.pending_step = int(step) if step is not None and self.pending else None
        self.firing = Firing.from_dict(d["firing"]) if d.get("firing") else None
        # states saved before 'when' rules existed carry no last firing: never fired
        step, last = d.get("last_firing_step"), d.get("last_firing")
        self.last_step = int(step) if step is not None and last else None
        self.last_firing = Firing.from_dict(last) if step is not None and last else None


def _held_refs(rs: _RuleState, step: int) -> list[Firing]:
    """The referenced firings that make ``rs``'s condition hold at ``step`` (firing now,
    or within its ``within`` window)."""
    when = rs.rule.when
    assert when is not None
    lo = step - when.within if when.within is not None else step
    return [f for r in rs.refs for f in ((r.firing or r.last_firing),)
            if f is not None and (r.firing is not None
                                  or (r.last_step is not None and r.last_step >= lo))]


def _since(rs: _RuleState, step: int) -> int:
    """The earliest start among the referenced firings that make ``rs``'s condition hold."""
    starts = [f.since if f.since is not None else f.step for f in _held_refs(rs, step)]
    return min(starts) if starts else step


def _onset(rs: _RuleState, step: int) -> int | None:
    """When the failure behind ``rs`` began: its own streak's first step, and for a
    ``when`` rule the earliest of that (the onset of the firings that held when its
    streak began) and the onsets of the referenced firings that make its condition hold
    (their starts where they carry no onset). ``None``: unknown."""
    if rs.rule.when is None:
        return rs.pending_step
    starts = [f.onset if f.onset is not None else f.since if f.since is not None else f.step
              for f in _held_refs(rs, step)]
    if rs.pending_step is not None:
        starts.append(rs.pending_step)
    return min(starts) if starts else None


def _holds(rs: _RuleState, step: int) -> Firing | None:
    """If ``rs``'s condition holds: the firing of the referenced rule that started latest.

    Without ``within`` the named rules must be firing now; with it, have been firing on a
    sample whose step is ``>= step - within``. Ties go to the rule listed first.
    """
    when = rs.rule.when
    assert when is not None
    every = when.mode == "all"
    ok: list[Firing | None] = []
    if when.within is None:
        for r in rs.refs:
            if r.firing is not None:
                ok.append(r.firing)
            elif every:
                return None  # the common case, decided without looking further
    else:
        lo = step - when.within
        for r in rs.refs:
            if r.last_step is not None and r.last_step >= lo:
                ok.append(r.last_firing)
            elif every:
                return None
    return _latest(ok) if ok else None


def _current(rs: _RuleState, vals: Mapping[str, float],
             step: int) -> _Hit:
    for metric, det in rs.pairs:
        x = vals.get(metric)
        if x is not None:
            return metric, (det.statistic if det.watches_absence else x), det
    metric, det = rs.pairs[0]
    return metric, (float(step) if metric == STEP_METRIC else None), det


def _quiet(rs: _RuleState, step: int, t: float | None) -> bool:
    """In the cooldown after the last resolution."""
    cd = rs.rule.cooldown
    if rs.resolved_step is None:
        return False
    if cd.seconds is not None:
        return t is not None and rs.resolved_time is not None and \
            t - rs.resolved_time < cd.seconds
    return step - rs.resolved_step < cd.count


def _event(rule: Rule, kind: str, step: int, t: float | None,
           hit: _Hit, onset: int | None = None) -> Firing:
    metric, value, det = hit
    stat = det.statistic
    # a sample without a time renders {time} as nan, as a missing value does: formatting
    # None failed ("{time:.0f}") and left the raw template as the message
    ctx = dict(rule=rule.name, metric="" if metric is None else metric, step=step,
               time=math.nan if t is None else t,
               severity=rule.severity, value=math.nan if value is None else value,
               statistic=math.nan if stat is None else stat,
               detector="when" if rule.when is not None else rule.detector,
               labels=dict(rule.labels))
    annotations = {}
    for key, template in rule.annotations.items():
        try:
            # fields and labels[NAME] only: str.format follows attributes ({value.__class__})
            annotations[key] = render(template, ctx)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            annotations[key] = template  # validated at load; never fail the run over text
    message = annotations.get("summary")
    if not message:
        message = render(_DEFAULT_SUMMARY, ctx) if rule.when is None else \
            f"{rule.name}: {rule.when.describe()} at step {step}"
    if kind == "resolved":
        message = f"resolved: {message}"
    return Firing(rule=rule.name, step=step, time=t, severity=rule.severity,
                  actions=rule.actions, value=value, message=message, kind=kind,
                  labels=dict(rule.labels), annotations=annotations, metric=metric,
                  onset=onset)


#: One metric rule of a sample's plan (``Engine._plan``): its state, and for a rule on one
#: metric that metric, its detector, the detector's bound ``update`` (or ``update_given``)
#: and the 'given' metric.
_Step = Tuple[_RuleState, Optional[str], Optional[Detector], Optional[Callable[..., Any]],
              Optional[str]]


def _fast_step(rs: _RuleState) -> _Step:
    """The plan entry of a rule on one metric (``Engine._plan``): the detector's method is
    bound once per plan, not on every value."""
    metric, det = rs.pairs[0]
    judge = det.update if rs.given is None else det.update_given
    return rs, metric, det, judge, rs.given


class Engine:
    """Evaluates a :class:`RuleSet` over a stream of samples.

    Parameters
    ----------
    rules:
        The rules (a :class:`RuleSet` or any iterable of :class:`Rule`); disabled rules are
        skipped.

    Notes
    -----
    Deterministic: the same samples give the same events: those of the metric rules in rule
    order, then those of the ``when`` rules in evaluation order (each after the rules it refers
    to). The engine holds no global state; build one per run (``lrwatch replay`` builds one per
    trace).

    Raises
    ------
    ConfigError
        Duplicate names, or a ``when`` rule that refers to a rule that is not among the enabled
        ``rules``, or a cycle of references.
    """

    def __init__(self, rules: RuleSet | Iterable[Rule]) -> None:
        self._rules = tuple(r for r in rules if r.enabled)
        names = [r.name for r in self._rules]
        if len(set(names)) != len(names):
            raise ConfigError("rule names must be unique")
        self._states = [_RuleState(r) for r in self._rules]
        self._absent = [s for s in self._states if s.absent]
        self._last_step: int | None = None
        self._last_time: float | None = None
        # the latest value of every metric some rule takes as 'given' (None: not seen yet)
        self._given: dict[str, float | None] = {
            s.rule.given: None for s in self._states if s.rule.given is not None}
        by_name = {s.rule.name: s for s in self._states}
        # 'when' rules run after the metric rules, each after the rules it refers to; packs
        # without them keep the plain loop over metric rules (the replay fast path)
        self._metric = [s for s in self._states if s.rule.when is None]
        self._when = [by_name[r.name] for r in when_order(self._rules)]
        for ws in self._when:
            assert ws.rule.when is not None
            ws.refs = tuple(by_name[n] for n in ws.rule.when.rules)
            ws.unless = tuple(by_name[n] for n in ws.rule.when.unless)
            # a rule the condition cannot hold without: the first of 'all' (or 'firing')
            ws.needed = ws.refs[0] if ws.rule.when.mode == "all" or len(ws.refs) == 1 else None
            ws.within = ws.rule.when.within
            for ref in ws.refs:
                ref.tracked = True
        self._tracked = [s for s in self._metric if s.tracked]
        self._plans: dict[tuple[str, ...], list[_Step]] = {}
        # on tick (no sample), judge only the 'when' rules that depend on time-based rules
        timed = {s.rule.name for s in self._absent}
        for ws in self._when:  # evaluation order: references are classified first
            if any(r.rule.name in timed for r in ws.refs + ws.unless):
                timed.add(ws.rule.name)
        self._when_timed = [ws for ws in self._when if ws.rule.name in timed]

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self._rules

    @property
    def active(self) -> dict[str, Firing]:
        """Rule name to the :class:`Firing` event of every rule that is firing now."""
        return {s.rule.name: s.firing for s in self._states if s.firing is not None}

    @property
    def last_step(self) -> int | None:
        return self._last_step

    def update(self, sample: Sample) -> list[Firing]:
        """Feed one sample; returns the firings and resolutions it caused, in rule order."""
        step = sample.step
        t = sample.time
        if t is not None and not math.isfinite(t):
            t = None
        vals = judged_values(sample)
        events: list[Firing] = []
        if self._given:
            self._see_given(vals, step)
        given = self._given
        for rs, metric, det, judge, gkey in self._plan(vals):
            if judge is None:
                self._judge_pairs(rs, vals, step, t, events)
                continue
            x = vals.get(metric)
            if x is None:
                if metric != STEP_METRIC:
                    continue
                x = float(step)
            r = judge(x, t) if gkey is None else judge(x, given[gkey], t)
            if r is None or (not r and rs.pending == 0 and rs.firing is None):
                continue  # the common case: nothing to do
            self._judge(rs, r, step, t, (metric, x, det), events)
        if self._when:
            self._judge_when(self._when, step, t, events)
        self._last_step = step
        if t is not None:
            self._last_time = t
        return events

    def _judge_pairs(self, rs: _RuleState, vals: Mapping[str, float], step: int,
                     t: float | None, events: list[Firing]) -> None:
        """Judge a rule over several metrics, or one that watches a metric's absence: anomalous
        if any detector answers ``True``, normal if none does and one answers ``False``."""
        verdict: bool | None = None
        hit: _Hit | None = None
        for metric, det in rs.pairs:
            x = vals.get(metric)
            if x is None and metric == STEP_METRIC:
                x = float(step)
            if x is None:
                if not rs.absent:
                    continue
                r = det.miss(t)
                if r and hit is None:
                    hit = (metric, det.statistic, det)
            else:
                if rs.absent and det.watches_absence and t is not None and det.check(t):
                    # the gap before this sample was too long: fire for it, then judge it
                    self._judge(rs, True, step, t, (metric, det.statistic, det), events)
                r = det.update(x, t) if rs.given is None else \
                    det.update_given(x, self._given[rs.given], t)
                if r and hit is None:
                    hit = (metric, x, det)
            if r:
                verdict = True
            elif r is not None and verdict is None:
                verdict = False
        if verdict is None or (not verdict and rs.pending == 0 and rs.firing is None):
            return  # the common case: nothing to do
        if hit is None:
            hit = _current(rs, vals, step)
        self._judge(rs, verdict, step, t, hit, events)

    def _plan(self, vals: Mapping[str, float]) -> list[_Step]:
        """The metric rules a sample with these metrics can make judge anything, in rule order:
        those that watch one of them, the step or an absence. The others would skip every
        metric; the plan is kept per set of metric names (a run logs few different sets).
        A rule on one metric comes with it, its detector, the detector's bound ``update``
        (``update_given`` with a 'given' metric) and that metric (the fast path); any other
        with ``None`` for all four."""
        key = tuple(vals)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _MOST_PLANS:
                self._plans.clear()
            names = set(key) | {STEP_METRIC}
            plan = self._plans[key] = [
                _fast_step(rs) if len(rs.pairs) == 1 and not rs.absent else
                (rs, None, None, None, None)
                for rs in self._metric
                if rs.absent or any(m in names for m, _ in rs.pairs)]
        return plan

    def _see_given(self, vals: Mapping[str, float], step: int) -> None:
        """Remember the latest value of every 'given' metric this sample carries."""
        for m in self._given:
            x = float(step) if m == STEP_METRIC else vals.get(m)
            if x is not None:
                self._given[m] = x

    def tick(self, now: float) -> list[Firing]:
        """Judge time-based rules (``staleness``) at wall-clock time ``now`` without a sample."""
        events: list[Firing] = []
        if not math.isfinite(now):
            return events
        step = self._last_step if self._last_step is not None else 0
        for rs in self._absent:
            verdict: bool | None = None
            hit = None
            for metric, det in rs.pairs:
                r = det.check(now)
                if r:
                    verdict = True
                    hit = hit or (metric, det.statistic, det)
                elif r is not None and verdict is None:
                    verdict = False
            if verdict is None or (not verdict and rs.pending == 0 and rs.firing is None):
                continue
            self._judge(rs, verdict, step, now, hit or _current(rs, {}, step), events)
        if self._when_timed:
            self._judge_when(self._when_timed, step, now, events)
        return events

    def _judge_when(self, states: list[_RuleState], step: int, t: float | None,
                    events: list[Firing]) -> None:
        """Judge ``when`` rules (in evaluation order) after the metric rules of a sample."""
        for rs in filter(_FIRING, self._tracked):   # (a Firing is never falsy)
            rs.last_step, rs.last_firing = step, rs.firing
        for rs in states:
            if rs.pending == 0 and rs.firing is None:   # idle: skip it while it cannot hold
                need = rs.needed
                if need is not None:
                    if need.firing is None if rs.within is None else (
                            need.last_step is None or need.last_step < step - rs.within):
                        continue  # a rule the condition needs does not hold: the common case
                elif rs.within is None:
                    for r in rs.refs:
                        if r.firing is not None:
                            break
                    else:
                        continue  # 'any' of rules none of which is firing
            src = _holds(rs, step)
            if src is not None:
                for u in rs.unless:
                    if u.firing is not None:
                        src = None  # explained away: a rule in 'unless' is firing now
                        break
            if src is None and rs.pending == 0 and rs.firing is None:
                continue  # normal and idle: judging would change nothing
            # the event reports the referenced rule that fired most recently: its metric, value
            last = src or _latest(r.last_firing for r in rs.refs) or rs.firing
            hit: _Hit = (last.metric, last.value, rs) if last is not None else (None, None, rs)
            n = len(events)
            self._judge(rs, src is not None, step, t, hit, events)
            if rs.pending == 1:
                # the streak began with the failures held now: with 'any' (or 'within') the
                # rules that hold change during a 'for:' window, and one that began it may
                # hold no longer when the rule fires
                rs.pending_step = _onset(rs, step)
            if len(events) > n and events[-1] is rs.firing:
                rs.firing = events[-1] = replace(rs.firing, since=_since(rs, step),
                                                 onset=_onset(rs, step))
            if rs.tracked and rs.firing is not None:
                rs.last_step, rs.last_firing = step, rs.firing

    def open_onsets(self) -> dict[str, int]:
        """The rules whose condition holds but that have not fired yet (a ``for:`` window
        under way), each with the step its failure began (:attr:`Firing.onset`, as it would
        fire now): a checkpoint written now resumes inside that failure."""
        step = self._last_step if self._last_step is not None else 0
        out: dict[str, int] = {}
        for rs in self._states:
            if rs.pending and rs.firing is None:
                onset = _onset(rs, step)
                if onset is not None:
                    out[rs.rule.name] = onset
        return out

    def firing_onsets(self) -> dict[str, int]:
        """The rules firing now, each with the step its failure began (:attr:`Firing.onset`;
        its start where the firing carries none): a building block that fires while a veto
        (``unless``) holds back the escalation above it is a failure not answered yet."""
        out: dict[str, int] = {}
        for rs in self._states:
            f = rs.firing
            if f is not None:
                out[rs.rule.name] = min(x for x in (f.onset, f.since, f.step) if x is not None)
        return out

    def _judge(self, rs: _RuleState, verdict: bool, step: int, t: float | None,
               hit: _Hit, events: list[Firing]) -> None:
        rule = rs.rule
        if verdict:
            rs.clear, rs.clear_since = 0, None
            rs.pending += 1
            if rs.pending_since is None:
                rs.pending_since = t
            if rs.pending == 1:
                rs.pending_step = step
            if rs.firing is None and _met(rule.for_, rs.pending, rs.pending_since, t) \
                    and not _quiet(rs, step, t):
                rs.firing = _event(rule, "firing", step, t, hit, rs.pending_step)
                events.append(rs.firing)
            return
        rs.pending, rs.pending_since, rs.pending_step = 0, None, None
        if rs.firing is None:
            return
        rs.clear += 1
        if rs.clear_since is None:
            rs.clear_since = t
        if _met(rule.hysteresis, rs.clear, rs.clear_since, t):
            events.append(_event(rule, "resolved", step, t, hit))
            rs.firing = None
            rs.clear, rs.clear_since = 0, None
            rs.resolved_step, rs.resolved_time = step, t

    def state_dict(self) -> dict[str, Any]:
        """Every detector's state and every rule's counters; JSON-serialisable.

        For rules that ``when`` rules refer to, also the last step at which each was firing and
        that firing, so a resumed engine gives exactly the events of an uninterrupted one.
        """
        d = {"version": 1, "last_step": self._last_step, "last_time": self._last_time,
             "rules": {s.rule.name: s.state_dict() for s in self._states}}
        if self._given:  # only with 'given' rules: other packs keep their state as it was
            d["given"] = {m: _num(v) for m, v in self._given.items()}
        return d

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the engine must have been built from the same rules.

        ``when`` rules missing from ``state`` (saved before they were added: they hold no
        detector) start fresh; a state saved without last firings counts as never fired.
        All or nothing: a state that does not load (``ConfigError`` naming the rules that
        differ) leaves the engine as it was.
        """
        if state.get("version") != 1:
            raise ConfigError(f"unsupported engine state version {state.get('version')!r}")
        saved = state["rules"]
        names = {s.rule.name for s in self._states}
        fresh = {s.rule.name for s in self._when} - set(saved)
        if set(saved) != names - fresh:
            raise ConfigError(_mismatch(set(saved), names - fresh))
        before = self.state_dict()
        try:
            self._load(state)
        except Exception:
            self._load(before)   # a half-loaded engine judges wrongly
            raise

    def _load(self, state: Mapping[str, Any]) -> None:
        saved = state["rules"]
        for s in self._states:
            s.load_state_dict(saved.get(s.rule.name, _FRESH))
        self._last_step = state.get("last_step")
        self._last_time = state.get("last_time")
        saved_given = state.get("given") or {}
        for m in self._given:
            # A value the saved state had not seen yet (saved before the rule took 'given',
            # or before the metric was first logged: a restart to the state before the first
            # step, which the untrained loss was measured after) is not forgotten: the level
            # measured is still the run's.
            v = _unnum(saved_given.get(m))
            if v is not None:
                self._given[m] = v
