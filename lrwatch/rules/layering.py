"""Layered rule sets: several rule files and packs joined in order into one :class:`RuleSet`.

``Watcher(rules=["training", "my.yml"])``, ``lrwatch replay --rules training --rules my.yml``
and ``lrwatch rules check my.yml --with training`` all join through :func:`join` (see
``docs/rules.md``, "Layering rule sets"):

* a ``when`` rule may refer to a rule of any set in the join (earlier or later); unknown
  names and reference cycles are errors naming file, line and key, across files too;
* a later set turns a rule of an earlier set off with an entry ``{name: X, enabled: false}``
  and replaces it (in its place) with the full rule and ``override: true``;
* the same name twice without either is an error that says how to do one or the other, and
  turning off a rule that an enabled rule still refers to is an error naming both.

Each file is parsed alone into a :class:`Layer` (``schema.parse_layer``); the join resolves
names across the layers. A single file is a join of one (``schema.parse_rules``). Pure: no
torch, no state.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..errors import ConfigError, RuleError
from .schema import (PACKS, Rule, RuleSet, _walk, load_layer, pack_layer)

__all__ = ["Layer", "Entry", "Ref", "JoinError", "join", "join_layers", "layer_of", "spec_layer",
           "make_layer"]


class JoinError(RuleError, ConfigError):
    """Rule sets that do not join: the same rule name in two of them without ``override`` or
    ``enabled: false``. A :class:`~lrwatch.errors.RuleError` (every problem, with file and
    line) and, as a clash of names always was, a :class:`~lrwatch.errors.ConfigError`."""


@dataclass(frozen=True)
class Entry:
    """One entry of a rule set's ``rules`` list: a rule, a rule with errors (``rule`` None,
    ``kind`` "broken": its name still counts) or a ``{name: X, enabled: false}`` (``kind``
    "disable"). The ``*_at`` fields are message heads, ``FILE:LINE: key 'KEY'``."""

    name: str
    kind: str                  # "rule" | "broken" | "disable"
    rule: Rule | None
    where: str                 # FILE:LINE of the entry
    name_at: str
    flag_at: str = ""          # the 'enabled' of a disable, the 'override' of a replacement
    when_at: str = ""
    enabled: bool = True
    override: bool = False


@dataclass(frozen=True)
class Ref:
    """A ``when`` reference: ``owner`` (``None`` if unnamed) refers to ``target``. ``entry``
    is the owner's index in its layer's entries (``None``: the owner was not kept)."""

    owner: str | None
    target: str
    at: str
    entry: int | None
    enabled: bool = True


@dataclass(frozen=True)
class Layer:
    """One rule set of a join, as parsed alone: its entries, references and problems."""

    source: str
    entries: tuple[Entry, ...] = ()
    refs: tuple[Ref, ...] = ()
    errors: tuple[str, ...] = ()
    action_errors: int = 0     # how many of ``errors`` are action parameters' (check_actions)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries if e.kind != "disable")


def make_layer(source: str, errors: Sequence[str], action_errors: int, refs: Any,
               where: Callable[[Any, str], str]) -> Layer:
    """A :class:`Layer` from what ``schema`` collected of one file (its ``_Refs``)."""
    entries: list[Entry] = []
    index: dict[int, int] = {}
    for idx, rule in refs.entries.items():
        nodes = refs.nodes[idx]
        flag = "enabled" if idx in refs.stubs else "override"
        when = refs.whens.get(idx)
        index[idx] = len(entries)
        entries.append(Entry(
            name=rule.name if rule is not None else str(nodes["name"].value),
            kind="disable" if idx in refs.stubs else "rule" if rule is not None else "broken",
            rule=rule, where=f"{source}:{nodes['<entry>'].start_mark.line + 1}",
            name_at=where(nodes["name"], f"rules[{idx}].name"),
            flag_at=where(nodes[flag], f"rules[{idx}].{flag}") if flag in nodes else "",
            when_at=where(when[2], when[1]) if when else "",
            enabled=refs.enabled.get(idx, True), override=refs.overrides.get(idx, False)))
    out = tuple(Ref(refs.whens[idx][0], target, where(node, key), index.get(idx),
                    refs.enabled.get(idx, True))
                for idx, key, target, node in refs.refs)
    return Layer(source, tuple(entries), out, tuple(errors), action_errors)


def layer_of(rules: RuleSet) -> Layer:
    """A :class:`RuleSet` as a rule set of a join (its references resolved already)."""
    heads = [f"{r.source or rules.source or '<RuleSet>'}: rule {r.name!r}" for r in rules]
    entries = tuple(Entry(r.name, "rule", r, r.source or rules.source, h, when_at=h)
                    for r, h in zip(rules, heads))
    refs = tuple(Ref(r.name, t, h, i) for i, (r, h) in enumerate(zip(rules, heads))
                 for t in r.references)
    return Layer(rules.source, entries, refs)


def _fmt(at: str, msg: str, choices: Sequence[str] | None = None) -> str:
    text = f"{at}: {msg}"
    return text + f" (valid choices: {', '.join(choices)})" if choices is not None else text


def _near(name: str, choices: Sequence[str]) -> str:
    near = difflib.get_close_matches(name, choices, n=1)
    return f"; did you mean {near[0]!r}?" if near else ""


def _pack_hint(name: str, at: str, sources: Sequence[str],
               packs: dict[str, tuple[str, ...]]) -> str:
    """Where ``name`` is a rule of a shipped pack not in the join: how to join it before
    the file of the message head ``at`` (``packs``: the packs' rule names, as read)."""
    path = at.split(": key ", 1)[0].rsplit(":", 1)[0]
    for pack in PACKS:
        if f"<pack {pack}>" in sources:
            continue
        if pack not in packs:
            packs[pack] = pack_layer(pack).names
        if name in packs[pack]:
            return (f"; {name!r} is a rule of pack {pack!r}: join the pack first (lrwatch "
                    f"rules check {path} --with {pack}; lrwatch replay --rules {pack} --rules "
                    f"{path}; Watcher(rules=[{pack!r}, {path!r}]))")
    return ""


@dataclass
class _Slot:
    """The current definition of one name in the join."""

    entry: Entry
    layer: int
    state: str                 # "on" | "broken" | "dropped" (own file's enabled: false) | "off"
    by: Entry | None = None    # the entry of a later set that turned it off
    referrers: list[str] = field(default_factory=list)


def _state(e: Entry) -> str:
    if e.kind == "broken":
        return "broken"
    return "on" if e.enabled else "dropped"


class _Join:
    """The names of the joined sets, resolved entry by entry, and the problems found."""

    def __init__(self, layers: Sequence[Layer]) -> None:
        self.layers = layers
        self.sources = [lay.source for lay in layers]
        self.slots: dict[str, _Slot] = {}
        self.errors: list[str] = []
        self.clash = False
        self.packs: dict[str, tuple[str, ...]] = {}

    def earlier(self) -> list[str]:
        return [n for n, s in self.slots.items() if s.state in ("on", "broken")]

    def add(self, li: int, e: Entry) -> None:
        prior = self.slots.get(e.name)
        if prior is not None and prior.state == "dropped":
            del self.slots[e.name]   # a rule its own file turned off leaves the name free
            prior = None
        if e.kind == "disable" or e.override:
            self._replace(li, e, prior)
        elif prior is not None:
            self.clash = True
            self.errors.append(_fmt(e.name_at, (
                f"duplicate rule names: {e.name}, first defined at {prior.entry.where}; to "
                f"replace that rule give this one 'override: true' (the full rule), to turn "
                f"it off write {{name: {e.name}, enabled: false}}")))
        else:
            self.slots[e.name] = _Slot(e, li, _state(e))

    def _replace(self, li: int, e: Entry, prior: _Slot | None) -> None:
        what = "disable" if e.kind == "disable" else "replace"
        if prior is None:
            self.errors.append(_fmt(e.flag_at, (
                f"no earlier rule set has a rule {e.name!r} to {what}"
                f"{_near(e.name, self.earlier())}{_pack_hint(e.name, e.flag_at, self.sources, self.packs)}")))
            if e.kind == "disable":
                return
            self.slots[e.name] = _Slot(e, li, _state(e))
        elif e.kind == "disable" or not e.enabled:
            if prior.state != "off":
                prior.state, prior.by = "off", e
        else:
            prior.entry, prior.layer, prior.state, prior.by = e, li, _state(e), None

    def check_refs(self) -> dict[str, list[str]]:
        """Errors for unknown, self- and disabled references; the reference graph."""
        graph: dict[str, list[str]] = {}
        for layer in self.layers:
            for ref in layer.refs:
                owner_on = self._counts(layer, ref)
                if owner_on is None:
                    continue
                edge = self._check(ref, owner_on)
                if edge and owner_on and ref.entry is not None and ref.owner is not None:
                    graph.setdefault(ref.owner, []).append(ref.target)
        for name, slot in self.slots.items():
            users = list(dict.fromkeys(slot.referrers))
            if slot.state == "off" and users and slot.by is not None:
                one = len(users) == 1
                self.errors.append(_fmt(slot.by.flag_at or slot.by.name_at, (
                    f"rule {name!r} is disabled here, but {'rule' if one else 'rules'} "
                    f"{', '.join(users)} refer{'s' if one else ''} to it: disable "
                    f"{'it' if one else 'them'} too, or replace {'it' if one else 'them'} "
                    f"(override: true) with {'a rule' if one else 'rules'} that do"
                    f"{'es' if one else ''} not")))
        return graph

    def _counts(self, layer: Layer, ref: Ref) -> bool | None:
        """Whether ``ref``'s owner is enabled; None if a later set turned the owner off or
        replaced it (its references went with it)."""
        if ref.entry is None or ref.owner is None:   # an owner not kept: checked as written
            return ref.enabled
        slot = self.slots.get(ref.owner)
        if slot is None or slot.entry is not layer.entries[ref.entry] or slot.state == "off":
            return None
        return slot.state != "dropped"

    def _check(self, ref: Ref, owner_on: bool) -> bool:
        """One reference's error, if any; True if it is an edge of the reference graph."""
        if ref.target == ref.owner:
            self.errors.append(_fmt(ref.at, f"rule {ref.owner!r} refers to itself; a 'when' "
                                            f"rule watches other rules"))
            return False
        slot = self.slots.get(ref.target)
        if slot is None:
            choices = [n for n, s in self.slots.items() if n != ref.owner
                       and (s.state in ("on", "broken") or not owner_on)]
            self.errors.append(_fmt(ref.at, (
                f"unknown rule {ref.target!r}{_near(ref.target, choices)}"
                f"{_pack_hint(ref.target, ref.at, self.sources, self.packs)}"), choices or ("none",)))
            return False
        if owner_on and slot.state == "dropped":
            self.errors.append(_fmt(ref.at, f"rule {ref.target!r} is disabled (enabled: false);"
                                            f" enable it or remove the reference"))
            return False
        if owner_on and slot.state == "off":
            owner = self.slots.get(ref.owner or "")
            slot.referrers.append(f"{ref.owner!r} ({owner.entry.where if owner else '?'})")
            return False
        return True

    def check_cycles(self, graph: dict[str, list[str]]) -> None:
        for found in _walk(graph)[1]:
            # told at the rule of the latest set in it: the file its author can edit
            ring = found[:-1]
            k = max(range(len(ring)), key=lambda i: (self.slots[ring[i]].layer, -i))
            cycle = ring[k:] + ring[:k] + [ring[k]]
            first = self.slots[cycle[0]].entry
            home = first.where.rsplit(":", 1)[0]
            elsewhere = [f"{n} at {self.slots[n].entry.where}" for n in dict.fromkeys(cycle[1:])
                         if self.slots[n].entry.where.rsplit(":", 1)[0] != home]
            self.errors.append(_fmt(first.when_at, (
                f"reference cycle: {' -> '.join(cycle)}; a rule cannot depend on itself, "
                f"directly or through other rules" +
                (f" ({', '.join(elsewhere)})" if elsewhere else ""))))

    def rules(self) -> tuple[Rule, ...]:
        return tuple(s.entry.rule for s in self.slots.values()
                     if s.state == "on" and s.entry.rule is not None)


def join_layers(layers: Sequence[Layer], *, check_actions: bool = False) -> RuleSet:
    """The rule sets ``layers`` joined in order into one :class:`RuleSet`.

    Raises :class:`~lrwatch.errors.RuleError` with every problem of every set and of the join
    (a :class:`JoinError` where names clash). Problems with action parameters alone raise only
    with ``check_actions``, as in :func:`~lrwatch.rules.schema.parse_rules`.

    Examples
    --------
    >>> from lrwatch.rules.schema import parse_layer
    >>> mine = parse_layer('''
    ... rules:
    ...   - {name: stalled, enabled: false}
    ...   - {name: shift_long, when: {firing: loss_shift}, for: 30, severity: critical}
    ... ''', "my.yml")
    >>> rs = join_layers([pack_layer("training"), mine])
    >>> "stalled" in rs.names, rs.names[-1]
    (False, 'shift_long')
    >>> join_layers([mine])
    Traceback (most recent call last):
    ...
    lrwatch.errors.RuleError: my.yml: 2 errors:
      my.yml:3: key 'rules[0].enabled': no earlier rule set has a rule 'stalled' to disable; 'stalled' is a rule of pack 'training': join the pack first (lrwatch rules check my.yml --with training; lrwatch replay --rules training --rules my.yml; Watcher(rules=['training', 'my.yml']))
      my.yml:4: key 'rules[1].when.firing': unknown rule 'loss_shift'; 'loss_shift' is a rule of pack 'training': join the pack first (lrwatch rules check my.yml --with training; lrwatch replay --rules training --rules my.yml; Watcher(rules=['training', 'my.yml'])) (valid choices: none)
    """
    errors = [e for lay in layers for e in lay.errors]
    hard = len(errors) - sum(lay.action_errors for lay in layers)
    j = _Join(layers)
    for li, layer in enumerate(layers):
        for e in layer.entries:
            j.add(li, e)
    j.check_cycles(j.check_refs())
    errors += j.errors
    source = ", ".join(filter(None, (lay.source for lay in layers)))
    if hard or j.errors or (check_actions and errors):
        n = len(errors)
        head = errors[0] if n == 1 else f"{source}: {n} errors:\n  " + "\n  ".join(errors)
        raise (JoinError if j.clash else RuleError)(head, errors)
    return RuleSet(j.rules(), source)


def spec_layer(spec: Any) -> Layer:
    if isinstance(spec, RuleSet):
        return layer_of(spec)
    if isinstance(spec, str) and spec in PACKS:
        return pack_layer(spec)
    if isinstance(spec, (str, os.PathLike)):
        return load_layer(spec)
    raise ConfigError(f"a rule set is a pack name {sorted(PACKS)}, a rule file path or a "
                      f"RuleSet, got {type(spec).__name__}")


def join(specs: Sequence[Any], *, check_actions: bool = False) -> RuleSet:
    """The rule sets ``specs`` (pack names, rule-file paths, RuleSets) joined in order: what
    ``Watcher(rules=[...])``, ``lrwatch replay --rules ... --rules ...`` and ``lrwatch rules
    check FILE --with ...`` judge by (see :func:`join_layers`)."""
    if not specs:
        raise ConfigError("no rule set to join")
    _refuse_repeats(specs)
    return join_layers([spec_layer(s) for s in specs], check_actions=check_actions)


def _refuse_repeats(specs: Sequence[Any]) -> None:
    """A pack or a file given twice would report every one of its rules as a duplicate name:
    say once which set was repeated.

    >>> _refuse_repeats(["training", "training"])
    Traceback (most recent call last):
    ...
    lrwatch.errors.ConfigError: rule set 'training' is given twice (rule sets 1 and 2): give each rule set once
    """
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs, 1):
        if isinstance(spec, str) and spec in PACKS:
            key = f"pack:{spec}"
        elif isinstance(spec, (str, os.PathLike)):
            key = f"file:{os.path.realpath(os.fspath(spec))}"
        else:
            continue
        if key in seen:
            raise ConfigError(f"rule set {os.fspath(spec)!r} is given twice (rule sets "
                              f"{seen[key]} and {i}): give each rule set once")
        seen[key] = i
