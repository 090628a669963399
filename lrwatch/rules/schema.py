"""Rule files: YAML parsed with line numbers, validated into immutable :class:`Rule` objects.

A rule file is a mapping with a ``rules`` list (see ``docs/rules.md``)::

    version: 1
    rules:
      - name: loss_spike
        metric: loss                 # or metrics: [loss, eval_loss]
        detector: spike
        params: {window: 50, threshold: 6, log: true}
        for: 2                       # consecutive anomalous samples, or a duration: 30s
        cooldown: 20                 # steps (or a duration) after a resolution before re-firing
        hysteresis: 3                # consecutive normal samples (or a duration) to resolve
        severity: critical           # critical | warning | info
        actions: [rollback]          # rollback | reduce_lr | skip | stop | alert | hook
        labels: {team: ml}
        annotations:
          summary: "loss spiked to {value:.3g} at step {step}"
          description: "robust z = {statistic:.1f}"
      - name: loss_spike_persistent  # a rule on other rules: 'when' instead of metric/detector
        when: {firing: loss_spike}   # or {all: [a, b], within: 20} or {any: [a, b]}
        for: 10
        severity: critical

Validation collects *every* problem, each as ``FILE:LINE: key 'PATH': message (valid choices:
...)``, and raises one :class:`~lrwatch.errors.RuleError` carrying them all.

A file joined after other rule sets (``lrwatch.rules.layering``) may also turn a rule of
theirs off, ``{name: X, enabled: false}``, or replace it, the full rule with ``override: true``;
here each file is parsed alone into a ``Layer`` and the join resolves names across them.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

import yaml

from ..errors import ConfigError, RuleError
from .detectors import DETECTORS, Detector
from .detectors.base import MAX_COUNT, short
from .templates import FIELDS, check_template

if TYPE_CHECKING:
    from .layering import Layer

__all__ = ["Rule", "RuleSet", "Span", "When", "load_rules", "load_pack", "parse_rules",
           "parse_layer", "load_layer", "pack_layer", "pack_text", "when_order", "PACKS",
           "SEVERITIES", "ACTIONS", "TEMPLATE_FIELDS", "WHEN_KEYS", "WHEN_MODES"]

SEVERITIES = ("critical", "warning", "info")
ACTIONS = ("rollback", "reduce_lr", "skip", "stop", "alert", "hook")
PACKS = ("training", "serving", "plateau_cut")
#: Fields a summary/description template may use, e.g. ``"{metric} = {value:.3g}"``.
TEMPLATE_FIELDS = FIELDS
#: The forms of ``when`` (a rule on other rules) and every key a ``when`` mapping may have.
WHEN_MODES = ("firing", "all", "any")
WHEN_KEYS = WHEN_MODES + ("within", "unless")
#: ``within: run``: at any step of the run so far (stored as this many steps).
WITHIN_RUN = 2 ** 62
_RULE_KEYS = ("name", "metric", "metrics", "detector", "params", "given", "when", "for",
              "cooldown", "hysteresis", "severity", "actions", "labels", "annotations", "enabled",
              "override")
#: The keys of an entry that turns off a rule of an earlier rule set: ``{name: X, enabled: false}``
#: (docs/rules.md, "Layering rule sets").
_STUB_KEYS = ("name", "enabled", "override")
_TOP_KEYS = ("version", "rules")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
#: Label names every alert of a rule sets itself (lrwatch.actions.alerts.Alert.for_rule).
RESERVED_LABELS = ("alertname", "severity", "rule")
#: Annotation names every alert of a rule sets itself, and from what
#: (lrwatch.actions.alerts.Alert.from_firing); a rule's own would replace them without a word.
RESERVED_ANNOTATIONS = {"value": "the firing's value", "step": "the firing's step",
                        "metric": "the metric that fired"}
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]*$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass(frozen=True)
class Span:
    """How long something must last: a count (samples or steps) or a duration in seconds."""

    count: int = 1
    seconds: float | None = None

    def __str__(self) -> str:
        return f"{self.seconds:g}s" if self.seconds is not None else str(self.count)


@dataclass(frozen=True)
class When:
    """What a rule on other rules watches: the rule file's ``when``.

    ``mode`` is ``firing`` (the one rule in ``rules`` is firing), ``all`` (every rule in
    ``rules`` has been firing on a sample at most ``within`` steps back) or ``any`` (at least
    one has); ``within=None`` means firing on the current sample and ``WITHIN_RUN`` (the rule
    file's ``within: run``) at any step of the run so far. The condition does not hold
    on a sample where any rule in ``unless`` is firing (evidence that explains the signal away,
    such as a held-out metric that is still improving).

    Examples
    --------
    >>> When("all", ("lr_anomaly", "loss_rising"), 20).describe()
    'lr_anomaly and loss_rising within 20 steps'
    >>> When("any", ("loss_spiked", "grad_spiked"), WITHIN_RUN).describe()
    'loss_spiked or grad_spiked at any step so far'
    >>> When("firing", ("loss_shift",)).describe()
    'loss_shift firing'
    >>> When("firing", ("loss_flat",), unless=("eval_improving",)).describe()
    'loss_flat firing unless eval_improving'
    """

    mode: str
    rules: tuple[str, ...]
    within: int | None = None
    unless: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        least = 2 if self.mode == "all" else 1
        if self.mode not in WHEN_MODES or len(self.rules) < least or (
                self.mode == "firing" and (len(self.rules) != 1 or self.within is not None)):
            raise ConfigError(f"bad when: {self.mode!r} {list(self.rules)} within "
                              f"{self.within!r} (valid choices: {', '.join(WHEN_MODES)})")
        both = set(self.rules) & set(self.unless)
        if both:
            raise ConfigError(f"bad when: {sorted(both)} both in {self.mode!r} and 'unless'")

    def describe(self) -> str:
        """The condition in words, for default event messages."""
        names = list(self.rules)
        joined = names[0] if len(names) == 1 else \
            f"{', '.join(names[:-1])} {'and' if self.mode == 'all' else 'or'} {names[-1]}"
        if self.within is None:
            text = f"{joined} firing"
        elif self.within >= WITHIN_RUN:
            text = f"{joined} at any step so far"
        else:
            text = f"{joined} within {self.within} step{'s' if self.within != 1 else ''}"
        return text + (f" unless {' or '.join(self.unless)}" if self.unless else "")


@dataclass(frozen=True)
class Rule:
    """One validated rule (immutable). Build it from a file with :func:`load_rules`.

    A rule either watches ``metrics`` with a ``detector`` or, with ``when`` set, fires on other
    rules (then ``metrics`` is empty and ``detector`` is ``""``). ``given`` names another metric
    whose latest value the detector sees with every value (detectors with ``takes_given``). ``for_`` is the rule file's
    ``for`` (a Python keyword). ``source`` says where the rule was defined (``FILE:LINE``).
    """

    name: str
    metrics: tuple[str, ...] = ()
    detector: str = ""
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    severity: str = "warning"
    actions: tuple[str, ...] = ()
    for_: Span = Span()
    cooldown: Span = Span(count=0)
    hysteresis: Span = Span()
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    annotations: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    action_params: Mapping[str, Mapping[str, Any]] = field(
        default_factory=lambda: MappingProxyType({}))
    enabled: bool = True
    source: str = ""
    when: When | None = None
    given: str | None = None

    def __post_init__(self) -> None:
        if self.when is not None and (self.metrics or self.detector or self.params or self.given):
            raise ConfigError(f"rule {self.name!r}: a 'when' rule takes no metrics, detector, "
                              f"params or given")
        if self.when is None and not (self.metrics and self.detector):
            raise ConfigError(f"rule {self.name!r}: needs metrics and a detector, or 'when'")
        problem = _given_problem(self.given, self.metrics, self.detector, self.params)
        if problem:
            raise ConfigError(f"rule {self.name!r}: {problem}")
        reserved = [k for k in self.annotations if k in RESERVED_ANNOTATIONS]
        if reserved:   # (a Rule built in Python skips the file's checks)
            raise ConfigError(f"rule {self.name!r}: annotation {reserved[0]!r}: "
                              f"{_reserved_annotation(reserved[0])}")

    @property
    def references(self) -> tuple[str, ...]:
        """The rules this rule depends on: those it fires on and those in ``unless`` (empty
        unless ``when`` is set)."""
        return self.when.rules + self.when.unless if self.when is not None else ()

    def make_detector(self) -> Detector:
        """A fresh detector instance for one of this rule's metrics."""
        if self.when is not None:
            raise ConfigError(f"rule {self.name!r} fires on other rules and has no detector")
        return DETECTORS[self.detector](**self.params)


@dataclass(frozen=True)
class RuleSet:
    """An ordered, immutable collection of rules with unique names.

    Examples
    --------
    >>> rs = load_pack("training")
    >>> "nonfinite" in rs.names and rs["nonfinite"].severity == "critical"
    True
    """

    rules: tuple[Rule, ...]
    source: str = ""

    def __post_init__(self) -> None:
        names = [r.name for r in self.rules]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"duplicate rule names: {', '.join(dup)}")
        when_order(self.rules)  # unknown references and cycles are errors here too

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __getitem__(self, name: str) -> Rule:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(f"no rule {name!r} (valid choices: {', '.join(self.names)})")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.rules)

    def without(self, *names: str) -> "RuleSet":
        """This set minus the named rules.

        Unknown names raise ``KeyError``; dropping a rule that a remaining ``when`` rule refers
        to raises :class:`~lrwatch.errors.ConfigError` naming those rules (drop them too).
        """
        for n in names:
            self[n]
        kept = tuple(r for r in self.rules if r.name not in names)
        users = {n: [r.name for r in kept if n in r.references] for n in names}
        blocked = [f"{n!r} (used by {', '.join(u)})" for n, u in users.items() if u]
        if blocked:
            raise ConfigError(f"cannot drop {', '.join(blocked)}: 'when' rules refer to "
                              f"{'it' if len(blocked) == 1 else 'them'}; drop those rules too")
        return RuleSet(kept, self.source)

    def __add__(self, other: "RuleSet") -> "RuleSet":
        return RuleSet(self.rules + other.rules, ", ".join(filter(None, (self.source, other.source))))


def given_detectors() -> tuple[str, ...]:
    """The detectors that take a ``given`` metric."""
    return tuple(n for n, c in DETECTORS.items() if c.takes_given)


def _given_problem(given: str | None, metrics: tuple[str, ...], detector: str,
                   params: Mapping[str, Any]) -> str | None:
    """What is wrong with a rule's ``given`` (``None`` if nothing)."""
    cls = DETECTORS.get(detector)
    if given is None:
        extra = [k for k in (cls.GIVEN_PARAMS if cls else ()) if k in params]
        return (f"parameter {extra[0]!r} of detector {detector!r} needs the rule key 'given' "
                f"(e.g. given: lr)") if extra else None
    if not (isinstance(given, str) and given):
        return f"'given' must be a metric name, got {given!r}"
    if cls is not None and not cls.takes_given:
        return (f"detector {detector!r} takes no 'given' (valid choices: "
                f"{', '.join(given_detectors())})")
    if given in metrics:
        return f"'given' must be another metric than the watched {given!r}"
    return None


def _walk(graph: Mapping[str, list[str]]) -> tuple[list[str], list[list[str]]]:
    """Depth-first walk of ``graph`` (node -> the nodes it refers to; others are leaves).

    Returns every node of ``graph`` after the nodes it refers to (the evaluation order, stable:
    file order where nothing forces another) and each cycle found, as ``[a, b, ..., a]``.
    """
    order: list[str] = []
    cycles: list[list[str]] = []
    done: set[str] = set()
    stack: list[str] = []

    def visit(n: str) -> None:
        stack.append(n)
        for m in graph[n]:
            if m not in graph or m in done:
                continue
            if m in stack:
                cycles.append(stack[stack.index(m):] + [m])
            else:
                visit(m)
        stack.pop()
        done.add(n)
        order.append(n)

    for n in graph:
        if n not in done:
            visit(n)
    return order, cycles


def when_order(rules: Iterable[Rule]) -> tuple[Rule, ...]:
    """The ``when`` rules of ``rules`` in evaluation order: each after the rules it refers to.

    Raises :class:`~lrwatch.errors.ConfigError` if a ``when`` rule refers to a rule that is not
    among ``rules`` (or disabled), or if references form a cycle.

    >>> a = Rule("a", ("loss",), "nonfinite")
    >>> b = Rule("b", when=When("firing", ("c",)))
    >>> c = Rule("c", when=When("any", ("a",)))
    >>> [r.name for r in when_order([a, b, c])]
    ['c', 'b']
    """
    by_name = {r.name: r for r in rules}
    problems = [f"rule {r.name!r} refers to unknown or disabled rule {n!r}"
                for r in by_name.values() if r.enabled for n in r.references
                if n not in by_name or not by_name[n].enabled]
    if problems:
        raise ConfigError("; ".join(problems) + f" (valid choices: {', '.join(by_name)})")
    order, cycles = _walk({r.name: list(r.references) for r in by_name.values()
                           if r.when is not None})
    if cycles:
        raise ConfigError("; ".join(f"reference cycle: {' -> '.join(c)}" for c in cycles))
    return tuple(by_name[n] for n in order)


# --------------------------------------------------------------------------- YAML with lines

class _Errors:
    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[str] = []
        #: how many of ``items`` are action-parameter problems (see :func:`parse_rules`)
        self.actions = 0

    @property
    def hard(self) -> int:
        """The problems that make a rule unusable (all but the action parameters')."""
        return len(self.items) - self.actions

    def add(self, node: yaml.Node | None, key: str, msg: str, choices: Any = None, *,
            action: bool = False) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        text = f"{self.source}:{line}: key {short(key)}: {msg}"
        if choices is not None:
            text += f" (valid choices: {', '.join(map(str, choices))})"
        self.items.append(text)
        self.actions += action


def _items(node: yaml.MappingNode, ctor: yaml.constructor.SafeConstructor, path: str,
           errs: _Errors) -> list[tuple[str, yaml.Node, yaml.Node]]:
    """The (key, key node, value node) pairs of a mapping; reports bad and duplicate keys."""
    ctor.flatten_mapping(node)  # resolves YAML merge keys (<<)
    out: list[tuple[str, yaml.Node, yaml.Node]] = []
    seen: set[str] = set()
    for knode, vnode in node.value:
        key = _plain(knode, ctor) if isinstance(knode, yaml.ScalarNode) else None
        if not isinstance(key, str):
            errs.add(knode, path or "<top>", f"keys must be strings, got {short(key)}")
            continue
        full = f"{path}.{key}" if path else key
        if key in seen:
            errs.add(knode, full, "duplicate key")
            continue
        seen.add(key)
        out.append((key, knode, vnode))
    return out


def _plain(node: yaml.Node, ctor: yaml.constructor.SafeConstructor) -> Any:
    return ctor.construct_object(node, deep=True)


def _unknown(errs: _Errors, knode: yaml.Node, full: str, key: str, valid: tuple[str, ...]) -> None:
    near = difflib.get_close_matches(key, valid, n=1)
    hint = f"unknown key; did you mean {near[0]!r}?" if near else "unknown key"
    errs.add(knode, full, hint, valid)


#: what a span no run reaches would mean, and what to write instead
_SPAN_HINTS = {"for": "; the rule would never fire (to turn it off write enabled: false)",
               "hysteresis": "; the rule would never resolve",
               "cooldown": f"; a cooldown of {MAX_COUNT} already lasts the whole run"}


def _span(value: Any, node: yaml.Node, full: str, errs: _Errors, *, allow_zero: bool) -> Span | None:
    lo = 0 if allow_zero else 1
    hint = _SPAN_HINTS.get(full.rsplit(".", 1)[-1], "")
    if isinstance(value, int) and not isinstance(value, bool):
        if value < lo:
            errs.add(node, full, f"must be at least {lo}, got {value}")
            return None
        if value > MAX_COUNT:
            errs.add(node, full, f"must be at most {MAX_COUNT} samples, got {short(value)}: "
                                 f"more than a run has{hint}")
            return None
        return Span(count=value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            secs = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
            if secs <= 0 and not allow_zero:
                errs.add(node, full, f"duration must be positive, got {short(value)}")
                return None
            if secs > MAX_COUNT:
                errs.add(node, full, f"must be at most {MAX_COUNT}s (about 31 years), got "
                                     f"{short(value)}: longer than a run{hint}")
                return None
            return Span(count=lo, seconds=secs)
    errs.add(node, full, f"expected a number of samples or a duration such as '30s', "
                         f"'5m', '1h', got {short(value)}")
    return None


def _check_template(text: str, node: yaml.Node, full: str, errs: _Errors) -> None:
    problem = check_template(text)
    if problem is not None:
        errs.add(node, full, problem,
                 TEMPLATE_FIELDS if problem.startswith("unknown template field") else None)


def _str_map(node: yaml.Node, ctor: Any, full: str, errs: _Errors,
             template: bool = False, label_names: bool = False) -> dict[str, str]:
    if not isinstance(node, yaml.MappingNode):
        errs.add(node, full, "expected a mapping of names to strings")
        return {}
    out: dict[str, str] = {}
    for key, knode, vnode in _items(node, ctor, full, errs):
        if label_names and (not _LABEL_RE.match(key) or key.startswith("__")):
            errs.add(knode, f"{full}.{key}", "not a valid Prometheus label name")
            continue
        if template and not _LABEL_RE.match(key):
            # Alertmanager refuses an alert with such an annotation (HTTP 400): every alert
            # of the rule would be lost
            errs.add(knode, f"{full}.{key}", "not a valid annotation name: letters, digits and "
                     "underscores, not starting with a digit (Alertmanager refuses others)")
            continue
        if template and key in RESERVED_ANNOTATIONS:
            errs.add(knode, f"{full}.{key}", _reserved_annotation(key))
            continue
        if label_names and key in RESERVED_LABELS:
            # every alert sets these itself: an alertname of its own makes the alert unbuildable
            # (lost), a severity of its own one outside critical|warning|info
            errs.add(knode, f"{full}.{key}", f"reserved: every alert sets {key!r} itself "
                     f"(from the rule's {'name' if key != 'severity' else 'severity'}); "
                     "rename the label")
            continue
        v = _plain(vnode, ctor)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str):
            errs.add(vnode, f"{full}.{key}", f"expected a string, got {short(v)}")
            continue
        if template:
            _check_template(v, vnode, f"{full}.{key}", errs)
        out[key] = v
    return out


def _reserved_annotation(key: str) -> str:
    """Why the annotation ``key`` is refused (one of :data:`RESERVED_ANNOTATIONS`)."""
    return (f"reserved: every alert sets the annotation {key!r} itself "
            f"({RESERVED_ANNOTATIONS[key]}, which a template writes as {{{key}}}); rename "
            f"the annotation")


class _Entries:
    """The keys of one rule mapping, for the per-key checks of :func:`_rule`."""

    def __init__(self, node: yaml.MappingNode, ctor: Any, path: str, errs: _Errors) -> None:
        self.node, self.ctor, self.path, self.errs = node, ctor, path, errs
        self.map = {k: (kn, vn) for k, kn, vn in _items(node, ctor, path, errs)}

    def val(self, key: str) -> tuple[Any, yaml.Node | None]:
        """The plain value and the value node of ``key``, or ``(None, None)`` if absent."""
        if key not in self.map:
            return None, None
        vnode = self.map[key][1]
        return _plain(vnode, self.ctor), vnode


@dataclass
class _Refs:
    """What the rules of one file are called and refer to, for the checks across rules (made
    by the join of rule sets, :mod:`lrwatch.rules.layering`)."""

    enabled: dict[int, bool] = field(default_factory=dict)   # rule index -> enabled
    whens: dict[int, tuple[str | None, str, yaml.Node]] = field(default_factory=dict)
    refs: list[tuple[int, str, str, yaml.Node]] = field(default_factory=list)  # idx, key, target
    overrides: dict[int, bool] = field(default_factory=dict)  # rule index -> override: true
    nodes: dict[int, dict[str, yaml.Node]] = field(default_factory=dict)  # index -> key -> value
    entries: dict[int, Rule | None] = field(default_factory=dict)  # kept entries; None: no rule
    stubs: set[int] = field(default_factory=set)             # {name: X, enabled: false} entries


def _rule(node: yaml.Node, idx: int, ctor: Any, errs: _Errors, refs: _Refs) -> Rule | None:
    path = f"rules[{idx}]"
    if not isinstance(node, yaml.MappingNode):
        errs.add(node, path, "each rule must be a mapping with 'name', 'metric', 'detector', ...")
        return None
    n_before = errs.hard
    e = _Entries(node, ctor, path, errs)
    refs.nodes[idx] = {k: vn for k, (_, vn) in e.map.items()}
    refs.nodes[idx]["<entry>"] = node
    for key, (knode, _) in e.map.items():
        if key not in _RULE_KEYS:
            _unknown(errs, knode, f"{path}.{key}", key, _RULE_KEYS)
    name = _rule_name(e)
    metrics: tuple[str, ...] = ()
    cls: type[Detector] | None = None
    params: dict[str, Any] = {}
    when: When | None = None
    given: str | None = None
    if "when" in e.map:
        when = _rule_when(e, idx, name, refs)
    else:
        metrics = _rule_metrics(e)
        cls, params = _rule_detector(e)
        given = _rule_given(e, metrics, cls, params)
    spans = _rule_spans(e)
    sev, snode = e.val("severity")
    if snode is None:
        errs.add(node, f"{path}.severity", "missing required key", SEVERITIES)
    elif sev not in SEVERITIES:
        errs.add(snode, f"{path}.severity", f"{short(sev)} is not a severity", SEVERITIES)
    actions, action_params = _rule_actions(e)
    labels: dict[str, str] = {}
    _, lnode = e.val("labels")
    if lnode is not None:
        labels = _str_map(lnode, ctor, f"{path}.labels", errs, label_names=True)
    annotations: dict[str, str] = {}
    _, annode = e.val("annotations")
    if annode is not None:
        annotations = _str_map(annode, ctor, f"{path}.annotations", errs, template=True)
    enabled = refs.enabled[idx] = _rule_flag(e, "enabled", True)
    refs.overrides[idx] = _rule_flag(e, "override", False)
    if errs.hard > n_before or name is None:
        return None
    return Rule(
        name=name, metrics=metrics, detector=cls.name if cls else "", severity=sev,
        params=MappingProxyType(params), actions=actions, for_=spans["for"],
        cooldown=spans["cooldown"], hysteresis=spans["hysteresis"],
        labels=MappingProxyType(labels), annotations=MappingProxyType(annotations),
        action_params=MappingProxyType(action_params), when=when, given=given, enabled=enabled,
        source=f"{errs.source}:{node.start_mark.line + 1}",
    )


def _rule_name(e: _Entries) -> str | None:
    name, nnode = e.val("name")
    if nnode is None:
        e.errs.add(e.node, f"{e.path}.name", "missing required key")
    elif not isinstance(name, str) or not _NAME_RE.match(name):
        e.errs.add(nnode, f"{e.path}.name", f"expected a name of letters, digits and _ . : -, "
                                            f"got {short(name)}")
    else:
        return name
    return None


def _rule_metrics(e: _Entries) -> tuple[str, ...]:
    path, errs = e.path, e.errs
    m1, m1node = e.val("metric")
    ms, msnode = e.val("metrics")
    if m1node is not None and msnode is not None:
        errs.add(msnode, f"{path}.metrics", "give either 'metric' or 'metrics', not both")
    elif m1node is None and msnode is None:
        errs.add(e.node, f"{path}.metric", "missing required key (the metric the rule watches, "
                                           "or 'metrics' with a list)")
    elif m1node is not None:
        if isinstance(m1, str) and m1:
            return (m1,)
        errs.add(m1node, f"{path}.metric", f"expected a metric name, got {short(m1)}")
    elif isinstance(ms, str):   # one metric is 'metric: NAME'; 'metrics' takes a list
        errs.add(msnode, f"{path}.metrics", f"expected a list of metric names: write "
                                            f"metric: {ms} or metrics: [{ms}]")
    else:
        if isinstance(ms, list) and ms and all(isinstance(m, str) and m for m in ms):
            return tuple(dict.fromkeys(ms))
        errs.add(msnode, f"{path}.metrics", f"expected a non-empty list of metric names, "
                                            f"got {short(ms)}")
    return ()


def _rule_given(e: _Entries, metrics: tuple[str, ...], cls: type[Detector] | None,
                params: Mapping[str, Any]) -> str | None:
    """The metric named by ``given`` (checked against the detector and its parameters)."""
    given, gnode = e.val("given")
    if cls is None:
        return given if isinstance(given, str) else None
    problem = _given_problem(given, metrics, cls.name, params)
    if problem is None:
        return given
    if gnode is None:  # a given-only parameter without 'given': report it at the params
        e.errs.add(e.map["params"][1], f"{e.path}.params", problem)
    else:
        e.errs.add(gnode, f"{e.path}.given", problem)
    return None


def _rule_detector(e: _Entries) -> tuple[type[Detector] | None, dict[str, Any]]:
    """The detector class and its checked parameters (``None`` and ``{}`` on errors)."""
    path, errs = e.path, e.errs
    det, dnode = e.val("detector")
    cls: type[Detector] | None = None
    if dnode is None:
        errs.add(e.node, f"{path}.detector", "missing required key", tuple(DETECTORS))
    elif not isinstance(det, str) or det not in DETECTORS:
        near = difflib.get_close_matches(str(det), DETECTORS, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        errs.add(dnode, f"{path}.detector", f"unknown detector {det!r}{hint}", tuple(DETECTORS))
    else:
        cls = DETECTORS[det]
    params: dict[str, Any] = {}
    _, pnode = e.val("params")
    if pnode is not None and not (isinstance(pnode, yaml.ScalarNode) and pnode.tag.endswith(":null")):
        if not isinstance(pnode, yaml.MappingNode):
            errs.add(pnode, f"{path}.params", "expected a mapping of parameter names to values")
        elif cls is not None:
            params = _detector_params(cls, pnode, e)
    elif cls is not None:
        try:
            cls()
        except ConfigError as exc:
            errs.add(dnode, f"{path}.params", f"{exc}; add a 'params' mapping")
    return cls, params


def _detector_params(cls: type[Detector], pnode: yaml.MappingNode, e: _Entries) -> dict[str, Any]:
    path, errs = f"{e.path}.params", e.errs
    params: dict[str, Any] = {}
    ok = True
    for key, knode, vnode in _items(pnode, e.ctor, path, errs):
        full = f"{path}.{key}"
        if key not in cls.PARAMS:
            ok = False
            near = difflib.get_close_matches(key, cls.PARAMS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            errs.add(knode, full, f"unknown parameter of detector {cls.name!r}{hint}",
                     tuple(cls.PARAMS) or ("none",))
            continue
        v = _plain(vnode, e.ctor)
        try:
            params[key] = cls.PARAMS[key].check(key, v)
        except ConfigError as exc:
            ok = False
            msg = str(exc)
            choices = cls.PARAMS[key].choices
            if choices is not None:  # the message already lists them; keep one format
                msg = msg.split(" (valid choices")[0]
            errs.add(vnode, full, msg, choices)
    if ok:
        try:
            cls(**params)  # cross-parameter checks live in the detector
        except ConfigError as exc:
            errs.add(pnode, path, str(exc))
    return params


def _rule_when(e: _Entries, idx: int, name: str | None, refs: _Refs) -> When | None:
    """The ``when`` of a rule on other rules; references are checked later, across rules."""
    path, errs = f"{e.path}.when", e.errs
    wnode = e.map["when"][1]
    for key in ("metric", "metrics", "detector", "params", "given"):
        if key in e.map:
            errs.add(e.map[key][0], f"{e.path}.{key}", "a rule with 'when' fires on other rules "
                     "and takes no metric, detector, params or given; give one or the other")
    refs.whens[idx] = (name, path, wnode)
    if not isinstance(wnode, yaml.MappingNode):
        errs.add(wnode, path, "expected a mapping with one of 'firing', 'all', 'any', e.g. "
                              "{firing: loss_shift} or {all: [a, b], within: 20}", WHEN_KEYS)
        return None
    items = {k: (kn, vn) for k, kn, vn in _items(wnode, e.ctor, path, errs)}
    for key, (knode, _) in items.items():
        if key not in WHEN_KEYS:
            _unknown(errs, knode, f"{path}.{key}", key, WHEN_KEYS)
    modes = [k for k in WHEN_MODES if k in items]
    if not modes:
        errs.add(wnode, path, "missing one of 'firing', 'all', 'any'", WHEN_MODES)
        return None
    if len(modes) > 1:
        errs.add(items[modes[1]][0], f"{path}.{modes[1]}",
                 f"give exactly one of 'firing', 'all', 'any', not both {modes[0]!r} and "
                 f"{modes[1]!r}")
        return None
    mode = modes[0]
    names = _when_names(mode, items[mode][1], f"{path}.{mode}", idx, e, refs)
    within: int | None = None
    if "within" in items:
        knode, vnode = items["within"]
        v = _plain(vnode, e.ctor)
        if mode == "firing":
            errs.add(knode, f"{path}.within", "'within' applies to 'all' and 'any' only ('firing' "
                                              "means firing now; use the rule's 'for' to ask "
                                              "for persistence)")
        elif v == "run":
            within = WITHIN_RUN
        elif isinstance(v, bool) or not isinstance(v, int) or v < 0:
            errs.add(vnode, f"{path}.within", f"expected a number of steps >= 0 or 'run' (at "
                                              f"any step so far), got {short(v)}")
        else:
            within = v
    unless: tuple[str, ...] = ()
    if "unless" in items:
        unless = _when_names("any", items["unless"][1], f"{path}.unless", idx, e, refs)
        for j, n in enumerate(unless):
            if n in names:
                e.errs.add(items["unless"][1], f"{path}.unless[{j}]",
                           f"rule {n!r} is both a condition and in 'unless'")
                return None
    return When(mode, names, within, unless) if names else None


def _when_names(mode: str, vnode: yaml.Node, path: str, idx: int, e: _Entries,
                refs: _Refs) -> tuple[str, ...]:
    """The rule names of ``firing``/``all``/``any`` (empty on errors), recorded in ``refs``."""
    if mode == "firing":
        v = _plain(vnode, e.ctor)
        if not (isinstance(v, str) and _NAME_RE.match(v)):
            e.errs.add(vnode, path, f"expected the name of a rule, got {short(v)}")
            return ()
        refs.refs.append((idx, path, v, vnode))
        return (v,)
    least = 2 if mode == "all" else 1
    if not isinstance(vnode, yaml.SequenceNode) or len(vnode.value) < least:
        hint = " ('firing' watches one rule)" if mode == "all" else ""
        e.errs.add(vnode, path, f"expected a list of at least {least} rule name"
                                f"{'s' if least > 1 else ''}{hint}, got {short(_plain(vnode, e.ctor))}")
        return ()
    out: list[str] = []
    n_before = len(e.errs.items)
    for j, item in enumerate(vnode.value):
        v = _plain(item, e.ctor)
        full = f"{path}[{j}]"
        if not (isinstance(v, str) and _NAME_RE.match(v)):
            e.errs.add(item, full, f"expected the name of a rule, got {short(v)}")
        elif v in out:
            e.errs.add(item, full, f"rule {short(v)} listed twice")
        else:
            out.append(v)
            refs.refs.append((idx, full, v, item))
    return tuple(out) if len(e.errs.items) == n_before else ()


def _rule_spans(e: _Entries) -> dict[str, Span]:
    spans: dict[str, Span] = {}
    for key, allow_zero, default in (("for", False, Span()), ("cooldown", True, Span(count=0)),
                                     ("hysteresis", False, Span())):
        v, vnode = e.val(key)
        if vnode is None:
            spans[key] = default
        else:
            s = _span(v, vnode, f"{e.path}.{key}", e.errs, allow_zero=allow_zero)
            spans[key] = s or default
    return spans


def _rule_actions(e: _Entries) -> tuple[tuple[str, ...], dict[str, Mapping[str, Any]]]:
    actions: list[str] = []
    action_params: dict[str, Mapping[str, Any]] = {}
    _, anode = e.val("actions")
    if anode is None:
        return (), action_params
    anode_items: list[yaml.Node] = []
    if isinstance(anode, yaml.SequenceNode):
        anode_items = list(anode.value)
    elif isinstance(anode, yaml.ScalarNode) and not anode.tag.endswith(":null"):
        # a list key takes a list, as 'metrics' and the lists of 'when' do: one spelling
        e.errs.add(anode, f"{e.path}.actions", f"expected a list of actions: write "
                   f"actions: [{_plain(anode, e.ctor)}]", ACTIONS)
    elif not isinstance(anode, yaml.ScalarNode):
        e.errs.add(anode, f"{e.path}.actions", "expected a list of actions", ACTIONS)
    for j, item in enumerate(anode_items):
        full = f"{e.path}.actions[{j}]"
        if isinstance(item, yaml.MappingNode) and len(item.value) == 1:
            aname = _plain(item.value[0][0], e.ctor)
            aparams = _plain(item.value[0][1], e.ctor)
            if not isinstance(aparams, dict):
                e.errs.add(item, full, f"parameters of action {aname!r} must be a mapping")
                continue
        else:
            aname, aparams = _plain(item, e.ctor), None
        if aname not in ACTIONS:
            e.errs.add(item, full, f"unknown action {aname!r}", ACTIONS)
        elif aname in actions:
            e.errs.add(item, full, f"action {aname!r} listed twice")
        else:
            actions.append(aname)
            if aparams:
                for problem in _action_param_problems(aname, aparams):
                    e.errs.add(item, full, problem, action=True)
                action_params[aname] = MappingProxyType(dict(aparams))
    return tuple(actions), action_params


def _action_param_problems(action: str, params: Mapping[str, Any]) -> list[str]:
    """What is wrong with the parameters a rule gives ``action`` (``{stop: {restore: ...}}``),
    checked here with the rest of the file so that every problem is reported with its key and
    line, and a file ``replay`` accepts is one the Watcher accepts (the checks live with the
    recovery policy that reads the parameters)."""
    from types import SimpleNamespace

    from ..recovery.policy import check_action_params   # (it imports the detectors' helpers)
    try:
        check_action_params([SimpleNamespace(name="", source="", action_params={action: params})])
    except ConfigError as exc:
        prefix = ": rule '': "
        return [line[len(prefix):] if line.startswith(prefix) else line
                for line in str(exc).splitlines()]
    return []


def _rule_flag(e: _Entries, key: str, default: bool) -> bool:
    """A rule's ``enabled`` or ``override``: true or false."""
    value, vnode = e.val(key)
    if vnode is None:
        return default
    if not isinstance(value, bool):
        e.errs.add(vnode, f"{e.path}.{key}", f"expected true or false, got {short(value)}")
        return default
    return value


def _is_stub(node: yaml.Node) -> bool:
    """Whether a rule entry holds only ``name`` and ``enabled`` (and ``override``): an entry
    that turns a rule of an earlier rule set off, not a rule."""
    if not isinstance(node, yaml.MappingNode):
        return False
    keys = {k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    return len(keys) == len(node.value) and {"name", "enabled"} <= keys <= set(_STUB_KEYS)


def _stub(node: yaml.MappingNode, idx: int, ctor: Any, errs: _Errors, refs: _Refs) -> str | None:
    """The name an entry ``{name: X, enabled: false}`` turns off (None on errors)."""
    n_before = errs.hard
    e = _Entries(node, ctor, f"rules[{idx}]", errs)
    refs.nodes[idx] = {k: vn for k, (_, vn) in e.map.items()}
    refs.nodes[idx]["<entry>"] = node
    name = _rule_name(e)
    enabled = refs.enabled[idx] = _rule_flag(e, "enabled", True)
    refs.overrides[idx] = _rule_flag(e, "override", False)
    if enabled and errs.hard == n_before:
        e.errs.add(e.map["enabled"][1], f"{e.path}.enabled",
                   "an entry of only 'name' and 'enabled' turns off a rule of an earlier rule "
                   "set: write 'enabled: false'; to change that rule, give it in full with "
                   "'override: true'")
    return name if errs.hard == n_before else None


def parse_rules(text: str, source: str = "<string>", *, check_actions: bool = False) -> RuleSet:
    """Validate rule-file text and return its enabled rules.

    Raises :class:`~lrwatch.errors.RuleError` whose ``errors`` lists every problem as
    ``SOURCE:LINE: key 'PATH': message (valid choices: ...)``. Problems with the parameters
    of actions (``{reduce_lr: {factor: 5}}``) are among them when the file has others; alone
    they raise only with ``check_actions`` (``lrwatch rules check``, ``lrwatch replay``): else
    the Watcher reports them, as :func:`~lrwatch.recovery.policy.check_action_params` does
    for any RuleSet, in a :class:`~lrwatch.errors.ConfigError`.

    Examples
    --------
    >>> rs = parse_rules('''
    ... rules:
    ...   - name: too_high
    ...     metric: loss
    ...     detector: threshold
    ...     params: {above: 10}
    ...     severity: warning
    ... ''')
    >>> rs.names
    ('too_high',)
    >>> parse_rules("rules: [{name: x, metric: loss, detector: spike, severity: urgent}]", "f.yml")
    Traceback (most recent call last):
    ...
    lrwatch.errors.RuleError: f.yml:1: key 'rules[0].severity': 'urgent' is not a severity (valid choices: critical, warning, info)
    """
    from .layering import join_layers   # (it builds on this module)
    return join_layers([parse_layer(text, source)], check_actions=check_actions)


def parse_layer(text: str, source: str = "<string>") -> "Layer":
    """Validate rule-file text as one rule set of a join (:func:`~lrwatch.rules.layering.join`):
    its problems, its entries and its ``when`` references, which the join resolves across
    every set joined with it. Raises :class:`~lrwatch.errors.RuleError` only for text that is
    not YAML or not a bounded one; every other problem is in the layer's ``errors``."""
    try:
        return _parse_layer(text, source)
    except RecursionError:   # YAML nested deeper than the interpreter's recursion limit
        msg = f"{source}:1: invalid YAML: nested too deeply for a rule file"
        raise RuleError(msg, [msg]) from None


def _parse_layer(text: str, source: str) -> "Layer":
    from .layering import make_layer
    errs = _Errors(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RuleError(f"{source}:{line}: invalid YAML: {problem}",
                        [f"{source}:{line}: invalid YAML: {problem}"]) from None
    if root is not None:
        _check_expansion(root, source)
    ctor = yaml.constructor.SafeConstructor()
    if root is None:
        errs.items.append(f"{source}:1: key 'rules': the file is empty; expected a mapping "
                          f"with a 'rules' list")
    elif not isinstance(root, yaml.MappingNode):
        errs.add(root, "<top>", "expected a mapping with a 'rules' list")
    refs = _Refs()
    try:
        _validate(root, ctor, errs, refs)
    except yaml.YAMLError as exc:  # e.g. an unknown tag such as !!python/object
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        errs.items.append(f"{source}:{line}: invalid YAML: {getattr(exc, 'problem', exc)}")
        refs = _Refs()
    return make_layer(source, errs.items, errs.actions, refs, _where(errs))


def _where(errs: _Errors) -> Any:
    """``where(node, key)``: ``FILE:LINE: key 'KEY'``, the head of a message about ``key``."""
    def where(node: yaml.Node, key: str) -> str:
        return f"{errs.source}:{node.start_mark.line + 1}: key {short(key)}"
    return where


#: The most YAML nodes a rule file may stand for once its aliases are expanded. The training
#: pack is about 2,500; a 385-byte file of nested aliases (a "billion laughs") is 10**8, which
#: took 1 GB to construct and printed 226 MB in one error message.
MAX_YAML_NODES = 100_000


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Raise :class:`RuleError` if the aliases of the file expand it past ``MAX_YAML_NODES``
    nodes, or an alias refers to a node that holds it (a structure without end).

    Composing is cheap (an alias is the anchored node again, not a copy); constructing values
    and validating walk the expansion. Merge keys (``<<: *defaults``) keep working: only the
    expanded size is bounded. The error names the line of the innermost node past the bound.
    """
    sizes: dict[int, int] = {}   # id(node) -> expanded size (past the bound: any larger one)
    cyclic: list[yaml.Node] = []

    def size(node: yaml.Node) -> int:
        known = sizes.get(id(node))
        if known is not None:
            if known < 0:   # met again while it is still being walked
                cyclic.append(node)
                return MAX_YAML_NODES + 1
            return known
        sizes[id(node)] = -1
        n = 1
        for child in _children(node):
            n += size(child)
            if n > MAX_YAML_NODES:
                break
        sizes[id(node)] = n
        return n

    if size(root) <= MAX_YAML_NODES:
        return
    node = cyclic[0] if cyclic else root
    while not cyclic:   # down to the innermost node past the bound
        inner = next((c for c in _children(node) if sizes.get(id(c), 0) > MAX_YAML_NODES), None)
        if inner is None:
            break
        node = inner
    problem = ("an alias refers to a node that holds it" if cyclic else
               f"aliases expand the file past {MAX_YAML_NODES} values; write it out or use fewer")
    msg = f"{source}:{node.start_mark.line + 1}: invalid YAML: {problem}"
    raise RuleError(msg, [msg])


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _validate(root: yaml.Node | None, ctor: Any, errs: _Errors, refs: _Refs) -> None:
    if not errs.items and root is not None:
        top = {k: (kn, vn) for k, kn, vn in _items(root, ctor, "", errs)}
        for key, (knode, _) in top.items():
            if key == "groups" and "rules" not in top:   # a Prometheus rule file
                errs.add(knode, key, "unknown key: this looks like a Prometheus alerting/"
                         "recording rule file (check it with promtool check rules); an "
                         "lrwatch rule file has 'version: 1' and a list under 'rules'")
            elif key not in _TOP_KEYS:
                _unknown(errs, knode, key, key, _TOP_KEYS)
        if "version" in top:
            vnode = top["version"][1]
            if _plain(vnode, ctor) != 1:
                errs.add(vnode, "version", f"unsupported version {short(_plain(vnode, ctor))}", (1,))
        if "rules" not in top:
            errs.add(root, "rules", "missing required key (a list of rules)")
        else:
            rnode = top["rules"][1]
            if not isinstance(rnode, yaml.SequenceNode):
                errs.add(rnode, "rules", "expected a list of rules")
            elif not rnode.value:   # 'ok (0 rules)' checked nothing and replayed nothing
                errs.add(rnode, "rules", "the list is empty: a rule file holds at least one "
                         "rule, or an entry {name: X, enabled: false} that turns off a rule of "
                         "an earlier rule set")
            else:
                _validate_rules(rnode, ctor, errs, refs)


def _validate_rules(rnode: yaml.SequenceNode, ctor: Any, errs: _Errors, refs: _Refs) -> None:
    """The entries of the ``rules`` list, into ``refs.entries`` (a rule, or None for an entry
    ``{name: X, enabled: false}`` and for a rule with errors, whose name is still known)."""
    names: dict[str, int] = {}
    for i, item in enumerate(rnode.value):
        n_before = errs.hard
        stub = _is_stub(item)
        r = None
        if stub:
            name = _stub(item, i, ctor, errs, refs)
        else:
            r = _rule(item, i, ctor, errs, refs)
            name = r.name if r is not None else None
            if name is None and errs.hard > n_before:   # a rule with errors: its name is known
                nnode = refs.nodes.get(i, {}).get("name")
                name = nnode.value if isinstance(nnode, yaml.ScalarNode) and \
                    _NAME_RE.match(str(nnode.value)) else None
                if name in names:
                    continue
        if name is None:
            continue
        if name in names:
            hint = ("; 'override: true' replaces a rule of an earlier rule set, not one of the "
                    "same file") if refs.overrides.get(i) else ""
            errs.add(item, f"rules[{i}].name",
                     f"duplicate rule name {name!r} (first at rules[{names[name]}]){hint}")
            continue
        names[name] = i
        refs.entries[i] = r
        if stub:
            refs.stubs.add(i)


def load_rules(path: str | os.PathLike[str], *, check_actions: bool = False) -> RuleSet:
    """Load and validate the rule file at ``path`` (see :func:`parse_rules`)."""
    from .layering import join_layers   # (it builds on this module)
    return join_layers([load_layer(path)], check_actions=check_actions)


def load_layer(path: str | os.PathLike[str]) -> "Layer":
    """The rule file at ``path`` as one rule set of a join (see :func:`parse_layer`)."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        msg = f"{name}:1: key 'rules': cannot read the file: {exc.strerror or exc}"
        if isinstance(exc, FileNotFoundError) and not os.path.splitext(name)[1]:
            guess = difflib.get_close_matches(os.path.basename(name), PACKS, n=1)
            msg += (f"; did you mean the pack {guess[0]!r}?" if guess else "") + \
                f" (valid choices for a pack: {', '.join(PACKS)})"
        raise RuleError(msg, [msg]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        msg = _not_utf8(name, data, exc)
        raise RuleError(msg, [msg]) from None
    return parse_layer(text, name)


def _not_utf8(name: str, data: bytes, exc: UnicodeDecodeError) -> str:
    r"""Where a rule file stops being UTF-8, and what to do (the decoder's words gave a byte
    offset at line 1 of the file, whatever the line).

    >>> _not_utf8("f.yml", b"rules:\n  - {name: \xe9t\xe9}\n",
    ...           UnicodeDecodeError("utf-8", b"", 18, 19, "invalid continuation byte"))
    'f.yml:2: the file is not UTF-8 text (byte 0xe9 at column 12): save it as UTF-8'
    """
    line = data.count(b"\n", 0, exc.start) + 1
    col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return f"{name}:1: the file is UTF-16 text: save it as UTF-8"
    return (f"{name}:{line}: the file is not UTF-8 text (byte 0x{data[exc.start]:02x} at "
            f"column {col}): save it as UTF-8")


def pack_text(name: str) -> str:
    """The YAML text of the rule pack ``name``: ``training``, ``serving``, or the add-on
    ``plateau_cut`` (one rule, used beside ``training``)."""
    if name not in PACKS:
        raise ConfigError(f"unknown rule pack {name!r} (valid choices: {', '.join(PACKS)})")
    return resources.files(__package__).joinpath("packs", f"{name}.yml").read_text("utf-8")


def load_pack(name: str) -> RuleSet:
    """The rule pack ``name``, shipped as package data (see :func:`pack_text`)."""
    return parse_rules(pack_text(name), f"<pack {name}>")


def pack_layer(name: str) -> "Layer":
    """The rule pack ``name`` as one rule set of a join (see :func:`parse_layer`)."""
    return parse_layer(pack_text(name), f"<pack {name}>")


def duration_seconds(text: str) -> float:
    """Seconds in a duration such as ``'30s'`` or ``'5m'`` (raises ``ValueError``).

    >>> duration_seconds("1.5m")
    90.0
    """
    m = _DURATION_RE.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]

