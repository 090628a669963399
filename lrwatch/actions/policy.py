"""What to do about a flush's firings: a pure decision, separate from its side effects.

The Watcher (and the framework integrations) call :func:`decide` once per flush with the rule
events and the counters in :class:`PolicyState`; they then carry out the returned
:class:`Decision` list. Keeping the decision pure makes it testable without a model, and the
state is only counters, so a resumed run keeps its rollback budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from ..errors import ConfigError

__all__ = ["RecoveryConfig", "PolicyState", "Decision", "decide", "CONTROL_ACTIONS",
           "EXIT_STOPPED", "EXIT_BUDGET"]

#: Actions that change the training run (as opposed to telling someone).
CONTROL_ACTIONS = ("rollback", "skip", "reduce_lr", "stop")
#: ``Watcher.exit_status`` after a ``stop`` action, and after the rollback budget ran out.
EXIT_STOPPED = 3
EXIT_BUDGET = 4


@dataclass
class RecoveryConfig:
    """How the training side acts on firings.

    Parameters
    ----------
    lr_factor:
        A rollback multiplies every learning rate (optimizer and scheduler) by this.
    max_rollbacks:
        The rollback budget; once spent, the next rollback becomes a ``stop``.
    cooldown:
        Minimum steps between two rollbacks. A rollback asked for sooner is held and carried out
        when the cooldown ends.
    skip_batches:
        Batches that ``watch.batches()`` drops after a rollback, on top of the ones between the
        snapshot and the rollback, which are never replayed.
    reduce_lr_factor:
        Factor of the ``reduce_lr`` action.
    max_skips:
        ``skip`` undos allowed before a further one escalates to a rollback.
    good_after, keep, snapshot_dir, budget, min_interval, max_interval:
        Snapshot settings (see :class:`lrwatch.actions.snapshot.SnapshotStore`).
    """

    lr_factor: float = 0.5
    max_rollbacks: int = 5
    cooldown: int = 20
    skip_batches: int = 0
    reduce_lr_factor: float = 0.5
    max_skips: int = 20
    good_after: int = 50
    keep: int = 3
    snapshot_dir: str | None = None
    budget: float = 0.01
    min_interval: int = 50
    max_interval: int = 1000

    def __post_init__(self) -> None:
        for name in ("lr_factor", "reduce_lr_factor"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise ConfigError(f"{name} must be in (0, 1], got {v!r}")
        for name in ("max_rollbacks", "cooldown", "skip_batches", "max_skips", "good_after"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {v!r}")

    @classmethod
    def coerce(cls, value: "RecoveryConfig | Mapping[str, Any] | bool | None"
               ) -> "RecoveryConfig | None":
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            valid = set(cls.__dataclass_fields__)
            bad = sorted(set(value) - valid)
            if bad:
                raise ConfigError(f"unknown recovery setting(s) {bad}; valid: {sorted(valid)}")
            return cls(**value)
        raise ConfigError(f"recovery must be True/False, a dict or a RecoveryConfig, "
                          f"got {type(value).__name__}")


@dataclass
class PolicyState:
    """Counters only, so that ``state_dict()`` resumes a run with its budget intact."""

    rollbacks: int = 0
    skips: int = 0
    lr_reductions: int = 0
    last_rollback_step: int | None = None
    held: str | None = None  # a rule whose rollback waits for the cooldown to end
    held_step: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        for k in asdict(self):
            if k in d:
                setattr(self, k, d[k])


@dataclass(frozen=True)
class Decision:
    """One thing to do: ``rollback``, ``skip``, ``reduce_lr``, ``stop``, ``alert``, ``resolve``,
    ``hook`` (``event`` is the rule event that caused it, when there is one)."""

    action: str
    rule: str
    step: int
    reason: str = ""
    exit_status: int = 0
    event: Any = field(default=None, compare=False)


def decide(events: Sequence[Any], step: int, state: PolicyState,
           config: RecoveryConfig | None) -> list[Decision]:
    """Turn a flush's rule events into decisions, updating the counters in ``state``.

    Notification decisions (``alert``, ``resolve``, ``hook``) come for every event that asks for
    them. At most one training-control decision is made per flush, the strongest asked for:
    ``stop`` > ``rollback`` > ``skip`` > ``reduce_lr``. With ``config=None`` (recovery off) no
    control decision is made.

    >>> from types import SimpleNamespace as E
    >>> st = PolicyState()
    >>> ev = [E(rule="nonfinite", step=7, kind="firing", actions=("rollback", "alert"))]
    >>> [(d.action, d.rule) for d in decide(ev, 10, st, RecoveryConfig())]
    [('alert', 'nonfinite'), ('rollback', 'nonfinite')]
    >>> st.rollbacks
    1
    """
    out: list[Decision] = []
    control: dict[str, Any] = {}
    for e in events:
        acts = tuple(e.actions)
        if e.kind == "resolved":
            if "alert" in acts:
                out.append(Decision("resolve", e.rule, e.step, event=e))
            continue
        if "alert" in acts:
            out.append(Decision("alert", e.rule, e.step, event=e))
        if "hook" in acts:
            out.append(Decision("hook", e.rule, e.step, event=e))
        for a in CONTROL_ACTIONS:
            if a in acts and a not in control:
                control[a] = e
    if config is None:
        return out
    in_cooldown = (state.last_rollback_step is not None
                   and step - state.last_rollback_step < config.cooldown)
    if "stop" in control:
        e = control["stop"]
        out.append(Decision("stop", e.rule, e.step, f"rule {e.rule} asked to stop",
                            EXIT_STOPPED, event=e))
        return out
    wants_rollback = "rollback" in control or state.held is not None
    if "skip" in control and not wants_rollback:
        e = control["skip"]
        if state.skips < config.max_skips:
            state.skips += 1
            out.append(Decision("skip", e.rule, e.step, event=e))
            return out
        control["rollback"] = e  # too many skips: the run needs more than undoing steps
        wants_rollback = True
    if wants_rollback:
        e = control.get("rollback")
        rule = e.rule if e is not None else state.held
        first = e.step if e is not None else (state.held_step or step)
        if in_cooldown:
            state.held, state.held_step = rule, first
            return out
        state.held = state.held_step = None
        if state.rollbacks >= config.max_rollbacks:
            out.append(Decision("stop", str(rule), first,
                                f"rollback budget of {config.max_rollbacks} spent",
                                EXIT_BUDGET, event=e))
            return out
        state.rollbacks += 1
        state.last_rollback_step = step
        out.append(Decision("rollback", str(rule), first, event=e))
        return out
    if "reduce_lr" in control and not in_cooldown:
        e = control["reduce_lr"]
        state.lr_reductions += 1
        state.last_rollback_step = step  # reductions share the cooldown
        out.append(Decision("reduce_lr", e.rule, e.step, event=e))
    return out


def control_rules(events: Iterable[Any]) -> bool:
    """Whether any event is a firing that asks for a training-control action."""
    return any(e.kind == "firing" and set(e.actions) & set(CONTROL_ACTIONS) for e in events)
