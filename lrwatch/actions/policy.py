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
           "EXIT_STOPPED", "EXIT_BUDGET", "STOP_RESTORE", "check_action_params"]

#: Actions that change the training run (as opposed to telling someone).
CONTROL_ACTIONS = ("rollback", "skip", "reduce_lr", "stop")
#: ``Watcher.exit_status`` after a ``stop`` action, and after the rollback budget ran out.
EXIT_STOPPED = 3
EXIT_BUDGET = 4
#: Values of a ``stop`` action's ``restore`` parameter (``{stop: {restore: best}}``): the best
#: evaluated state, the newest known-good snapshot, or nothing (the state the run is in).
STOP_RESTORE = ("best", "last_good", "none")
#: Parameters each action takes in a rule file, with their valid values.
_ACTION_PARAMS: dict[str, dict[str, tuple[str, ...]]] = {"stop": {"restore": STOP_RESTORE}}


@dataclass
class RecoveryConfig:
    """How the training side acts on firings.

    Parameters
    ----------
    lr_factor:
        A rollback multiplies every learning rate (optimizer and scheduler) by this. While
        rollbacks keep failing (the run diverges again before it is back past the point where
        it failed), the cut compounds: ``lr_factor``, then its square, its cube, ...
    restart_lr_factor:
        The cut instead of ``lr_factor`` when the run diverges before any state after its
        start proved healthy, so that the rollback is a restart from the initial state. Such
        a run does not meet a passing fault: its configured learning rate is too high, often
        by an order of magnitude or more, and a halved rate usually fails again, sometimes
        without a blow-up the rules could see (the network learns badly instead). A tenth is
        the usual margin below the rate where the loss blows up (as in learning-rate range
        tests).
    restart_warmup:
        Steps over which the learning rate ramps up linearly again after such a restart (from
        ``1/restart_warmup`` of its new value), as a warm-up at the start of training would:
        the first steps from an untrained state are the least stable ones. 0 turns it off.
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
    probation:
        After a rollback, until the run is back past the step where it failed (plus
        ``good_after`` steps), a ``warning`` firing on an outcome of training (loss, gradient
        norm, evaluation metrics; not the learning rate, momentum, step timings or ``stalled``)
        is treated as a rollback request. A run that has just
        diverged is far more likely to be diverging again, so weaker evidence is enough: a
        learning rate still too high for the network often damages it without a blow-up the
        critical rules would see (the loss settles 50% higher, the evaluation regresses).
        Healthy runs are never on probation, so their false-alarm rate is unchanged.
    lr_recover:
        When a probation ends after a single rollback (no restart), the fault was a one-off (a
        bad batch, a transient spike): the learning rate returns to its value before the
        rollback, geometrically over ``good_after`` steps, instead of staying cut for the rest
        of the run. If the run fails again later, every further cut is kept.
    good_after, keep, snapshot_dir, budget, min_interval, max_interval:
        Snapshot settings (see :class:`lrwatch.actions.snapshot.SnapshotStore`).
    """

    lr_factor: float = 0.5
    restart_lr_factor: float = 0.1
    restart_warmup: int = 100
    max_rollbacks: int = 5
    cooldown: int = 20
    skip_batches: int = 0
    reduce_lr_factor: float = 0.5
    max_skips: int = 20
    probation: bool = True
    lr_recover: bool = False
    good_after: int = 50
    keep: int = 3
    snapshot_dir: str | None = None
    budget: float = 0.01
    min_interval: int = 50
    max_interval: int = 1000

    def __post_init__(self) -> None:
        for name in ("lr_factor", "restart_lr_factor", "reduce_lr_factor"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise ConfigError(f"{name} must be in (0, 1], got {v!r}")
        for name in ("max_rollbacks", "cooldown", "skip_batches", "max_skips", "good_after",
                     "restart_warmup"):
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
    # after a rollback at step probation_from, warnings escalate until step probation_until
    probation_from: int | None = None
    probation_until: int | None = None
    ever_healthy: bool = False  # a snapshot after the start was promoted known-good
    # the rollbacks of the current probation: how many, their total cut, a restart among them
    episode_rollbacks: int = 0
    episode_cut: float = 1.0
    episode_restart: bool = False
    lr_recovered: bool = False  # the rate came back once after a one-off fault
    persistent: bool = False    # and the run failed again afterwards: keep cuts for good

    def on_probation(self, step: int) -> bool:
        return self.probation_until is not None and step <= self.probation_until

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        for k in asdict(self):
            if k in d:
                setattr(self, k, d[k])


def check_action_params(rules: Iterable[Any]) -> None:
    """Validate the parameters rules give their actions (``{stop: {restore: best}}``).

    Raises :class:`~lrwatch.errors.ConfigError` naming the rule, where it is defined, and the
    valid choices.

    >>> from types import SimpleNamespace as R
    >>> try:
    ...     check_action_params([R(name="r", source="f.yml:3",
    ...                            action_params={"stop": {"restore": "bset"}})])
    ... except ConfigError as exc:
    ...     print(exc)
    f.yml:3: rule 'r': stop: restore 'bset' is not valid (valid choices: best, last_good, none)
    """
    for r in rules:
        for action, params in getattr(r, "action_params", {}).items():
            spec = _ACTION_PARAMS.get(action)
            if spec is None:
                continue  # parameters of other actions are not read (yet)
            where = f"{r.source}: rule {r.name!r}: {action}"
            for key, value in params.items():
                if key not in spec:
                    raise ConfigError(f"{where}: unknown parameter {key!r} "
                                      f"(valid choices: {', '.join(spec)})")
                if value not in spec[key]:
                    raise ConfigError(f"{where}: {key} {value!r} is not valid "
                                      f"(valid choices: {', '.join(spec[key])})")


@dataclass(frozen=True)
class Decision:
    """One thing to do: ``rollback``, ``skip``, ``reduce_lr``, ``stop``, ``alert``, ``resolve``,
    ``hook`` (``event`` is the rule event that caused it, when there is one; ``params`` the
    parameters the rule gave the action, e.g. ``{"restore": "best"}`` for a ``stop``)."""

    action: str
    rule: str
    step: int
    reason: str = ""
    exit_status: int = 0
    event: Any = field(default=None, compare=False)
    params: Mapping[str, Any] = field(default_factory=dict, compare=False)


#: Metrics that are settings or timings of the run, not outcomes of training: a warning on them
#: (a learning-rate jump, a stalled loop) says nothing about whether the run diverges again.
NOT_OUTCOMES = ("step", "lr", "momentum", "step_time_seconds", "samples_per_second")


def _is_outcome(metric: str | None) -> bool:
    """Whether a warning on ``metric`` is evidence about the training itself (probation).

    >>> [_is_outcome(m) for m in ("loss", "eval_accuracy", "lr", "lr/1", "step", None)]
    [True, True, False, False, False, False]
    """
    return metric is not None and metric.split("/", 1)[0] not in NOT_OUTCOMES


def decide(events: Sequence[Any], step: int, state: PolicyState,
           config: RecoveryConfig | None,
           action_params: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None
           ) -> list[Decision]:
    """Turn a flush's rule events into decisions, updating the counters in ``state``.

    Notification decisions (``alert``, ``resolve``, ``hook``) come for every event that asks for
    them. At most one training-control decision is made per flush, the strongest asked for:
    ``stop`` > ``rollback`` > ``skip`` > ``reduce_lr``. With ``config=None`` (recovery off) no
    control decision is made. ``action_params`` maps rule name -> action -> the parameters the
    rule file gave it; a ``stop`` decision carries its rule's.

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
    escalated = None
    if (config.probation and "rollback" not in control and "stop" not in control
            and state.on_probation(step)):
        escalated = next((e for e in events if e.kind == "firing"
                          and getattr(e, "severity", None) == "warning"
                          and _is_outcome(getattr(e, "metric", None))), None)
        if escalated is not None:
            control["rollback"] = escalated
    in_cooldown = (state.last_rollback_step is not None
                   and step - state.last_rollback_step < config.cooldown)
    if "stop" in control:
        e = control["stop"]
        params = (action_params or {}).get(e.rule, {}).get("stop", {})
        out.append(Decision("stop", e.rule, e.step, f"rule {e.rule} asked to stop",
                            EXIT_STOPPED, event=e, params=dict(params)))
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
        reason = (f"warning {rule} during the probation after the rollback at step "
                  f"{state.probation_from}" if e is not None and e is escalated else "")
        out.append(Decision("rollback", str(rule), first, reason, event=e))
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
