"""What the ranks of a distributed run must agree on, as plain data, and where two differ.

Under ``torch.distributed`` every rank judges the same samples with its own rules engine and
carries out its own recovery, and the ranks stay in lock-step only because those take the
same decisions: a rule with another threshold, or ``replay`` on one rank only, rolls one rank
back while the others train on, and the next collective waits until its timeout. So the
Watcher's first collective (``RankContext.agree_settings``) compares these descriptions.

Pure and torch-free: the rules and the recovery settings in, plain dicts out.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

__all__ = ["rule_settings", "recovery_settings", "first_difference", "PER_RANK_RECOVERY",
           "RULE_TEXT_FIELDS"]

#: Recovery settings each rank may have its own of: where its snapshots go (one file per
#: rank) and how much its replay buffer holds (the ranks agree on what they replay).
PER_RANK_RECOVERY = ("snapshot_dir", "replay_mb")
#: Rule fields that say where the rule came from or what its alerts read, not what it decides.
RULE_TEXT_FIELDS = ("source", "annotations", "labels")


def plain(x: Any) -> Any:
    """``x`` as dicts, lists and scalars (picklable and comparable across ranks).

    >>> from types import MappingProxyType
    >>> plain({"a": MappingProxyType({"b": (1, 2)})})
    {'a': {'b': [1, 2]}}
    """
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, Mapping):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, float) and x != x:   # (NaN equals no NaN, not even a copy of itself)
        return "nan"
    return x


def rule_settings(rules: Iterable[Any] | None) -> dict[str, Any] | None:
    """Every rule's definition by name, less its text (:data:`RULE_TEXT_FIELDS`): what makes
    it fire and what it does then.

    >>> from lrwatch.rules import load_pack
    >>> rule_settings(load_pack("training"))["nonfinite"]["detector"]
    'nonfinite'
    """
    if rules is None:
        return None
    return {r.name: {k: v for k, v in plain(r).items() if k not in RULE_TEXT_FIELDS}
            for r in rules}


def recovery_settings(rc: Any) -> dict[str, Any] | None:
    """A :class:`~lrwatch.recovery.config.RecoveryConfig`'s settings, less those each rank may
    have its own of (:data:`PER_RANK_RECOVERY`); ``None`` with recovery off."""
    if rc is None:
        return None
    return {k: v for k, v in plain(rc).items() if k not in PER_RANK_RECOVERY}


def first_difference(name: str, ours: Any, others: Mapping[int, Any]
                     ) -> tuple[str, Any, dict[int, Any]]:
    """Where ``others`` (by rank) first differ from ``ours`` (rank 0's), descending into the
    dicts both sides hold: the setting's path, rank 0's value there, the others' there.

    >>> first_difference("rules", {"a": {"x": 1, "y": 2}}, {1: {"a": {"x": 1, "y": 3}}})
    ("rules['a']['y']", 2, {1: 3})
    >>> first_difference("flush_every", 5, {1: 4})
    ('flush_every', 5, {1: 4})
    """
    while isinstance(ours, dict) and all(isinstance(v, dict) for v in others.values()):
        keys = list(ours) + [k for v in others.values() for k in v if k not in ours]
        key = next((k for k in keys if any(v.get(k) != ours.get(k) for v in others.values())),
                   None)
        if key is None:
            break
        name, ours = f"{name}[{key!r}]", ours.get(key)
        others = {r: v.get(key) for r, v in others.items() if v.get(key) != ours}
    return name, ours, dict(others)
