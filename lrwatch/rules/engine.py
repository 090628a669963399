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
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from ..errors import ConfigError
from ..samples import Sample
from .detectors import Detector
from .schema import Rule, RuleSet, Span

__all__ = ["Engine", "Firing", "STEP_METRIC"]

#: Pseudo-metric that every sample carries: its step number (for ``rate`` and ``staleness``).
STEP_METRIC = "step"
_DEFAULT_SUMMARY = "{rule}: {metric} = {value:.4g} at step {step}"
_SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}


def _num(v: float | None) -> float | str | None:
    if v is None or math.isfinite(v):
        return v
    return "nan" if v != v else ("inf" if v > 0 else "-inf")


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
                "metric": self.metric}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Firing":
        return cls(rule=d["rule"], step=int(d["step"]), time=_unnum(d.get("time")),
                   severity=d["severity"], actions=tuple(d.get("actions", ())),
                   value=_unnum(d.get("value")), message=d.get("message", ""),
                   kind=d.get("kind", "firing"), labels=dict(d.get("labels", {})),
                   annotations=dict(d.get("annotations", {})), metric=d.get("metric"))

    @property
    def severity_rank(self) -> int:
        """0 for info, 1 for warning, 2 for critical (for ``--fail-on``-style comparisons)."""
        return _SEVERITY_RANK.get(self.severity, 0)


class _Ctx(dict):  # type: ignore[type-arg]
    def __missing__(self, key: str) -> str:
        return ""


def _met(span: Span, count: int, since: float | None, t: float | None) -> bool:
    if span.seconds is None:
        return count >= span.count
    if since is None or t is None:  # no sample times: a duration cannot be measured, so it is met
        return True
    return t - since >= span.seconds


class _RuleState:
    """Mutable per-rule state: the detectors and the for/hysteresis/cooldown counters."""

    __slots__ = ("rule", "pairs", "absent", "pending", "pending_since", "clear", "clear_since",
                 "resolved_step", "resolved_time", "firing")

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.pairs: list[tuple[str, Detector]] = [(m, rule.make_detector()) for m in rule.metrics]
        self.absent = any(d.watches_absence for _, d in self.pairs)
        self.pending = 0
        self.pending_since: float | None = None
        self.clear = 0
        self.clear_since: float | None = None
        self.resolved_step: int | None = None
        self.resolved_time: float | None = None
        self.firing: Firing | None = None

    _COUNTERS = ("pending", "pending_since", "clear", "clear_since", "resolved_step",
                 "resolved_time")

    def state_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: getattr(self, k) for k in self._COUNTERS}
        d["detectors"] = {m: det.state_dict() for m, det in self.pairs}
        d["firing"] = self.firing.to_dict() if self.firing is not None else None
        return d

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        dets = d["detectors"]
        if set(dets) != {m for m, _ in self.pairs}:
            raise ConfigError(f"rule {self.rule.name!r}: saved metrics {sorted(dets)} do not "
                              f"match the rule's {list(self.rule.metrics)}")
        for m, det in self.pairs:
            det.load_state_dict(dets[m])
        for k in self._COUNTERS:
            setattr(self, k, d[k])
        self.firing = Firing.from_dict(d["firing"]) if d.get("firing") else None


class Engine:
    """Evaluates a :class:`RuleSet` over a stream of samples.

    Parameters
    ----------
    rules:
        The rules (a :class:`RuleSet` or any iterable of :class:`Rule`); disabled rules are
        skipped.

    Notes
    -----
    Deterministic: the same samples give the same events, in rule order. The engine holds no
    global state; build one per run (``lrwatch replay`` builds one per trace).
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
        vals = sample.values
        events: list[Firing] = []
        for rs in self._states:
            verdict: bool | None = None
            hit: tuple[str, float | None, Detector] | None = None
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
                    r = det.update(x, t)
                    if r and hit is None:
                        hit = (metric, x, det)
                if r:
                    verdict = True
                elif r is not None and verdict is None:
                    verdict = False
            if verdict is None or (not verdict and rs.pending == 0 and rs.firing is None):
                continue  # the common case: nothing to do
            if hit is None:
                hit = self._current(rs, vals, step)
            self._judge(rs, verdict, step, t, hit, events)
        self._last_step = step
        if t is not None:
            self._last_time = t
        return events

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
            self._judge(rs, verdict, step, now, hit or self._current(rs, {}, step), events)
        return events

    @staticmethod
    def _current(rs: _RuleState, vals: Mapping[str, float],
                 step: int) -> tuple[str, float | None, Detector]:
        for metric, det in rs.pairs:
            x = vals.get(metric)
            if x is not None:
                return metric, (det.statistic if det.watches_absence else x), det
        metric, det = rs.pairs[0]
        return metric, (float(step) if metric == STEP_METRIC else None), det

    def _judge(self, rs: _RuleState, verdict: bool, step: int, t: float | None,
               hit: tuple[str, float | None, Detector], events: list[Firing]) -> None:
        rule = rs.rule
        if verdict:
            rs.clear, rs.clear_since = 0, None
            rs.pending += 1
            if rs.pending_since is None:
                rs.pending_since = t
            if rs.firing is None and _met(rule.for_, rs.pending, rs.pending_since, t) \
                    and not self._quiet(rs, step, t):
                rs.firing = self._event(rule, "firing", step, t, hit)
                events.append(rs.firing)
            return
        rs.pending, rs.pending_since = 0, None
        if rs.firing is None:
            return
        rs.clear += 1
        if rs.clear_since is None:
            rs.clear_since = t
        if _met(rule.hysteresis, rs.clear, rs.clear_since, t):
            events.append(self._event(rule, "resolved", step, t, hit))
            rs.firing = None
            rs.clear, rs.clear_since = 0, None
            rs.resolved_step, rs.resolved_time = step, t

    @staticmethod
    def _quiet(rs: _RuleState, step: int, t: float | None) -> bool:
        """In the cooldown after the last resolution."""
        cd = rs.rule.cooldown
        if rs.resolved_step is None:
            return False
        if cd.seconds is not None:
            return t is not None and rs.resolved_time is not None and \
                t - rs.resolved_time < cd.seconds
        return step - rs.resolved_step < cd.count

    @staticmethod
    def _event(rule: Rule, kind: str, step: int, t: float | None,
               hit: tuple[str, float | None, Detector]) -> Firing:
        metric, value, det = hit
        stat = det.statistic
        ctx = _Ctx(rule=rule.name, metric=metric, step=step, time=t, severity=rule.severity,
                   value=math.nan if value is None else value,
                   statistic=math.nan if stat is None else stat, detector=rule.detector,
                   labels=_Ctx(rule.labels))
        annotations = {}
        for key, template in rule.annotations.items():
            try:
                annotations[key] = template.format_map(ctx)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                annotations[key] = template  # validated at load; never fail the run over text
        message = annotations.get("summary") or _DEFAULT_SUMMARY.format_map(ctx)
        if kind == "resolved":
            message = f"resolved: {message}"
        return Firing(rule=rule.name, step=step, time=t, severity=rule.severity,
                      actions=rule.actions, value=value, message=message, kind=kind,
                      labels=dict(rule.labels), annotations=annotations, metric=metric)

    def state_dict(self) -> dict[str, Any]:
        """Every detector's state and every rule's counters; JSON-serialisable."""
        return {"version": 1, "last_step": self._last_step, "last_time": self._last_time,
                "rules": {s.rule.name: s.state_dict() for s in self._states}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the engine must have been built from the same rules."""
        if state.get("version") != 1:
            raise ConfigError(f"unsupported engine state version {state.get('version')!r}")
        saved = state["rules"]
        names = [s.rule.name for s in self._states]
        if set(saved) != set(names):
            raise ConfigError(f"saved rules {sorted(saved)} do not match the engine's "
                              f"{sorted(names)}")
        for s in self._states:
            s.load_state_dict(saved[s.rule.name])
        self._last_step = state.get("last_step")
        self._last_time = state.get("last_time")
