"""The recovery policy: firings and run progress in, plans out. Pure: no torch, no I/O.

:class:`RecoveryPolicy` owns every piece of recovery state: the rollback budget and cooldown,
held rollbacks, probation windows, the compounding of cuts while rollbacks keep failing, the
learning-rate scale the run is at, warm-up and recovery ramps, and whether the run ever proved
healthy. The Watcher and the framework callbacks hand it the rule events of each flush with a
:class:`Progress` (the step, the snapshots they hold) and carry out the :class:`Plan` list it
returns: restore snapshot S, set the rate to the plan's scale, ramp, skip, stop. Everything
the policy knows is in :meth:`RecoveryPolicy.state_dict`, so a resumed run compounds, ramps
and spends its budget exactly as the uninterrupted one would.
"""

from __future__ import annotations

import difflib

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Iterable, Mapping, Sequence

from ..errors import ConfigError
from ..rules.detectors.base import exponent_number, short
from .config import UNKNOWN_OPTIMIZER_WARMUP, RecoveryConfig, restart_warmup_for
from .mid_check import MidCheckBooking
from .preflight_booking import PreflightBooking
from .rate_scale import RateScale

__all__ = ["RecoveryConfig", "RecoveryPolicy", "PolicyState", "Plan", "Progress",
           "SnapshotInfo", "Decision", "decide", "CONTROL_ACTIONS", "EXIT_STOPPED",
           "EXIT_BUDGET", "STOP_RESTORE", "check_action_params", "restart_warmup_for",
           "UNKNOWN_OPTIMIZER_WARMUP", "unanswered_onset"]

#: Actions that change the training run (as opposed to telling someone).
CONTROL_ACTIONS = ("rollback", "skip", "reduce_lr", "stop")
#: ``Watcher.exit_status`` after a ``stop`` action, and after the rollback budget ran out.
EXIT_STOPPED = 3
EXIT_BUDGET = 4
#: Values of a ``stop`` action's ``restore`` parameter (``{stop: {restore: best}}``).
STOP_RESTORE = ("best", "last_good", "none")


def _rate_factor(value: Any) -> str | None:
    # 5e-1 as written: YAML 1.1 reads it as text, as it does for detector parameters (the
    # consumer takes float() of it)
    value = exponent_number(value)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1
    return None if ok else f"must be a number > 0 and < 1, got {short(value)}"


def _flag(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {short(value)}"


#: The parameters an action takes in a rule file: allowed values, or a check that returns a
#: message. ``{reduce_lr: {factor: 0.5, after_cut: true}}``: ``after_cut`` asks only in a run
#: whose rate lrwatch already cut after a failure (a rollback with a cut, a restart);
#: ``unscheduled`` only in a run without a learning-rate scheduler of its own (and only while
#: ``RecoveryConfig.cut_unscheduled`` is on).
_ACTION_PARAMS: dict[str, dict[str, Any]] = {
    "stop": {"restore": STOP_RESTORE},
    "reduce_lr": {"factor": _rate_factor, "after_cut": _flag, "unscheduled": _flag},
}


@dataclass
class PolicyState:
    """Everything the policy knows; ``state_dict()`` is this, so a resumed run continues."""

    rollbacks: int = 0
    skips: int = 0
    lr_reductions: int = 0
    probes: int = 0
    probe_steps: int = 0
    lr_checked: bool = False                # the pre-flight range test ran (or was not due)
    start_checked: bool = False             # the start check ran (or was not due)
    mid_checks: int = 0                     # mid-run rate checks run (or given up)
    mid_adopted: int = 0                    # ... whose lower-rate shadow the run took
    mid_check_next: int = 0                 # ... the step the next is due at (0: the first)
    last_rollback_step: int | None = None   # cooldown (rollbacks and reductions)
    held: str | None = None                 # a rule whose rollback waits for the cooldown
    held_step: int | None = None
    probation_from: int | None = None       # warnings escalate from here ...
    probation_until: int | None = None      # ... until here
    ever_healthy: bool = False              # a snapshot after the start proved good
    episode_rollbacks: int = 0              # the rollbacks of the current probation,
    episode_cut: float = 1.0                # their total cut,
    episode_restart: bool = False           # and whether one was a restart
    lr_recovered: bool = False              # the rate came back once after a one-off fault
    persistent: bool = False                # ... and the run failed again: keep cuts for good
    last_rollback_to: int | None = None     # snapshot step of the last rollback
    last_to_pending: bool = False           # ... a not-yet-good one (a sudden failure)
    last_alarm: int | None = None           # step of the last warning/critical firing
    last_dropped: int | None = None         # step of the last dropped non-finite gradient
    drops_handled: int = 0                  # dropped steps that needed nothing more
    last_rollback_at: int | None = None     # step of the last rollback decision
    rollback_repeats: int = 0               # rollbacks in a row that failed again soon
    lr_scale: float = 1.0                   # the run's rates = configured x this
    ramp: list[float] = field(default_factory=list)   # one factor per coming step
    restarts: int = 0                       # rollbacks to the run's start
    ramp_restart: bool = False              # the ramp is a restart's warm-up (not lr_recover)
    stopped: bool = False                   # a stop was planned: notifications only from now
    watching: str | None = None             # a rule whose sudden failure is watched
    watching_step: int | None = None        # ... the step it fired at
    watching_open: list[str] = field(default_factory=list)   # ... rules still firing
    watching_onset: int | None = None       # ... the step its failure began (its onset)
    resumed_at: int | None = None           # the step this run was last resumed at

    def on_probation(self, step: int) -> bool:
        return self.probation_until is not None and step <= self.probation_until


@dataclass(frozen=True)
class SnapshotInfo:
    """What the policy needs to know of a snapshot the executor holds."""

    step: int
    good: bool
    pinned: bool = False


@dataclass(frozen=True)
class Progress:
    """The run as the executor sees it at a flush: the step, the snapshots it holds, the
    steps of this flush whose non-finite gradient was dropped (``RecoveryConfig.guard``), and
    those dropped steps that still left a non-finite value in the model (``tainted``: a
    BatchNorm's running statistics take the batch in before the step; each is a rollback
    request, :mod:`lrwatch.recovery.drop_check`)."""

    step: int
    snapshots: Sequence[SnapshotInfo] = ()
    dropped: Sequence[int] = ()
    tainted: Sequence[int] = ()


@dataclass(frozen=True)
class Decision:
    """One thing to do before a target is chosen (see :func:`decide`)."""

    action: str
    rule: str
    step: int
    reason: str = ""
    exit_status: int = 0
    event: Any = field(default=None, compare=False)
    params: Mapping[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Plan:
    """One thing for the executor to carry out.

    ``action``: ``rollback``, ``skip``, ``reduce_lr``, ``stop``, ``lr_recover`` (notifications:
    ``alert``, ``resolve``, ``hook``). For a ``rollback``: restore snapshot ``target``, then set
    the rates to ``scale`` x configured (a snapshot records the scale it was taken at, so the
    executor multiplies by ``scale / snapshot_scale``), the cut being ``lr_factor`` of the rate
    before the failure, warmed up over ``warmup`` steps (``restart``: the target is the state
    the run started from; a learning-rate key a param group gained after the snapshot, which
    the restore keeps -- SWALR's ``swa_lr`` --, carries ``from_scale``, the scale the rates
    had when this was planned). With ``probe`` the executor measures the rate instead and
    reports it with :meth:`RecoveryPolicy.probed`. ``skip``: restore ``target`` and keep the
    rate.
    ``reduce_lr``: multiply the rates by ``lr_factor``. ``stop``: end with ``exit_status``.
    ``lr_recover``: the rate comes back by ``lr_factor`` over ``warmup`` steps (the ramp is
    in the policy). ``dropped``, ``watch``, ``recovered``: nothing to carry out, told in the
    log and the trace (a dropped step; a sudden failure watched before its rollback,
    ``RecoveryConfig.sudden_hold``; the watched failure passed). ``skip_batches``: batches to drop after it. ``replay_drop``: for a
    rollback after a sudden failure, the steps (first, last) whose batches are not trained on
    again; the batches drawn since ``target`` outside it are (``None``: no replay).
    """

    action: str
    rule: str
    step: int
    reason: str = ""
    exit_status: int = 0
    target: int | None = None
    lr_factor: float = 1.0
    scale: float = 1.0
    warmup: int = 0
    restart: bool = False
    probe: bool = False
    skip_batches: int = 0
    event: Any = field(default=None, compare=False)
    params: Mapping[str, Any] = field(default_factory=dict, compare=False)
    probe_from: float = 1.0   # the scale that failed: the top of the probe's range
    replay_drop: tuple[int, int] | None = None
    from_scale: float | None = None   # the scale the rates carry when planned (None: ``scale``)

    def describe(self, budget: int, used: int) -> str:
        """The log line's words: what happened, the real factor, and why."""
        if self.action == "rollback":
            what = "restart from the initial state (step 0)" if (
                self.restart and self.target == 0) else (
                f"restart from step {self.target}" if self.restart else
                f"rollback to step {self.target}")
            rate = ("learning rate to be measured by a range test" if self.probe else
                    f"learning rate x{self.lr_factor:g}")
            warm = f", warmed up over {self.warmup} steps" if self.warmup > 1 else ""
            why = f": {self.reason}" if self.reason else ""
            return f"{what}, {rate}{warm} ({used}/{budget} rollbacks){why}"
        if self.action == "lr_recover":
            return (f"learning rate x{self.lr_factor:g} back over {self.warmup} steps: "
                    f"{self.reason}")
        return self.reason or self.action


#: Metrics that are settings or timings of the run, not outcomes of training.
NOT_OUTCOMES = ("step", "lr", "momentum", "step_time_seconds", "samples_per_second")


def _is_outcome(metric: str | None) -> bool:
    """Whether a warning on ``metric`` is evidence about the training itself (probation).

    >>> [_is_outcome(m) for m in ("loss", "eval_accuracy", "lr", "lr/1", "step", None)]
    [True, True, False, False, False, False]
    """
    return metric is not None and metric.split("/", 1)[0] not in NOT_OUTCOMES


def check_action_params(rules: Iterable[Any]) -> None:
    """Validate the parameters rules give their actions (``{stop: {restore: best}}``); every
    problem of every rule is reported, one per line, in one :class:`ConfigError`.

    >>> from types import SimpleNamespace as R
    >>> try:
    ...     check_action_params([R(name="r", source="f.yml:3",
    ...                            action_params={"stop": {"restore": "bset"},
    ...                                           "reduce_lr": {"factr": 0.5}})])
    ... except ConfigError as exc:
    ...     print(exc)
    f.yml:3: rule 'r': stop: restore 'bset' is not valid (valid choices: best, last_good, none)
    f.yml:3: rule 'r': reduce_lr: unknown parameter 'factr' (did you mean 'factor'?; valid choices: factor, after_cut, unscheduled)
    """
    problems: list[str] = []
    for r in rules:
        for action, params in getattr(r, "action_params", {}).items():
            spec = _ACTION_PARAMS.get(action)
            where = f"{r.source}: rule {r.name!r}: {action}"
            if spec is None:   # {rollback: {lr_factor: 0.1}} would be ignored without a word
                if params:
                    problems.append(f"{where}: takes no parameters, got "
                                    f"{', '.join(map(short, params))} (write it as a bare "
                                    f"name: {action})")
                continue
            for key, value in params.items():
                problem = _param_problem(spec, key, value)
                if problem:
                    problems.append(f"{where}: {problem}")
    if problems:
        raise ConfigError("\n".join(problems))


def _param_problem(spec: Mapping[str, Any], key: str, value: Any) -> str | None:
    """What is wrong with one action parameter, or ``None``."""
    if key not in spec:
        close = difflib.get_close_matches(str(key), list(spec), n=1)
        hint = f"did you mean {close[0]!r}?; " if close else ""
        return f"unknown parameter {key!r} ({hint}valid choices: {', '.join(spec)})"
    check = spec[key]
    if callable(check):
        problem = check(value)
        return f"{key}: {problem}" if problem else None
    if value not in check:
        return f"{key} {value!r} is not valid (valid choices: {', '.join(check)})"
    return None


def decide(events: Sequence[Any], step: int, state: PolicyState,
           config: RecoveryConfig | None,
           action_params: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
           scheduled: bool = False) -> list[Decision]:
    """Turn a flush's rule events into decisions (the first half of
    :meth:`RecoveryPolicy.plan`), updating the counters in ``state``.

    Notifications (``alert``, ``resolve``, ``hook``) come for every event that asks for them.
    At most one training-control decision per flush, the strongest asked for: ``stop`` >
    ``rollback`` > ``skip`` > ``reduce_lr`` (the ``watch`` of a sudden failure is none: a skip
    or a cut asked beside it goes ahead). With ``config=None`` no control decision is made.
    ``scheduled``: the run has a learning-rate scheduler (``reduce_lr`` marked ``unscheduled``
    is then not carried out).

    >>> from types import SimpleNamespace as E
    >>> st = PolicyState()
    >>> ev = [E(rule="nonfinite", step=7, kind="firing", actions=("rollback", "alert"))]
    >>> [(d.action, d.rule) for d in decide(ev, 10, st, RecoveryConfig())], st.rollbacks
    ([('alert', 'nonfinite'), ('rollback', 'nonfinite')], 1)
    """
    out, control = _split_events(events)
    if config is None or state.stopped:   # after a stop, a loop that goes on is left alone
        return out
    escalated = _probation_escalation(events, step, state, config, control)
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
    watched = None
    if "rollback" in control or state.held is not None:
        watched = _rollback_or_watch(control.get("rollback"), escalated, step, in_cooldown,
                                     state, config, events)
        if watched is None or watched.action != "watch":
            return out + ([watched] if watched is not None else [])
        out.append(watched)   # no control plan: a skip or a cut asked beside it goes ahead
    if "skip" in control:
        e = control["skip"]
        if state.skips < config.max_skips:
            state.skips += 1
            out.append(Decision("skip", e.rule, e.step, event=e))
            return out
        if watched is None:   # too many skips: the run needs more than undoing steps
            d = _rollback_or_watch(e, escalated, step, in_cooldown, state, config, events)
            return out + ([d] if d is not None else [])
    if "reduce_lr" in control and not in_cooldown:
        unscheduled = config.cut_unscheduled and not scheduled
        asked = _reduction(events, state, action_params, unscheduled)
        if asked is not None:
            e, params = asked
            state.lr_reductions += 1
            state.last_rollback_step = step  # reductions share the cooldown
            out.append(Decision("reduce_lr", e.rule, e.step, event=e, params=params))
    return out


def _reduction(events: Sequence[Any], state: PolicyState,
               action_params: Mapping[str, Mapping[str, Mapping[str, Any]]] | None,
               unscheduled: bool = True) -> tuple[Any, dict[str, Any]] | None:
    """The first firing that asks for ``reduce_lr`` and may have it, with its parameters: one
    with ``after_cut`` only once lrwatch has cut the rate after a failure (a rollback that
    left the rate below the configured one; a one-off fault's rollback keeps the rate), and
    not while lrwatch's own warm-up to the cut rate is still under way (a loss that moves
    slowly at a tenth of a tenth of the rate is no stall); one with ``unscheduled`` only when
    ``unscheduled`` is true (the run has no scheduler and the cut is not turned off).

    >>> from types import SimpleNamespace as E
    >>> ev = [E(rule="stall", step=9, kind="firing", actions=("reduce_lr",))]
    >>> ps = {"stall": {"reduce_lr": {"after_cut": True}}}
    >>> _reduction(ev, PolicyState(), ps) is None
    True
    >>> _reduction(ev, PolicyState(rollbacks=1, lr_scale=0.1), ps)[1]
    {'after_cut': True}
    """
    cut = state.rollbacks > 0 and state.lr_scale < 1.0 and not state.ramp
    for e in events:
        if e.kind != "firing" or "reduce_lr" not in tuple(e.actions):
            continue
        params = dict((action_params or {}).get(e.rule, {}).get("reduce_lr", {}))
        if params.get("after_cut") and not cut:
            continue
        if params.get("unscheduled") and not unscheduled:
            continue
        return e, params
    return None


def _split_events(events: Sequence[Any]) -> tuple[list[Decision], dict[str, Any]]:
    """The notification decisions of a flush's events, in their order, and for each control
    action asked for, the first event that asked for it.

    >>> from types import SimpleNamespace as E
    >>> out, control = _split_events([
    ...     E(rule="a", step=3, kind="firing", actions=("alert", "skip")),
    ...     E(rule="b", step=4, kind="firing", actions=("hook", "skip", "stop")),
    ...     E(rule="c", step=5, kind="resolved", actions=("alert", "stop"))])
    >>> [(d.action, d.rule) for d in out], {a: e.rule for a, e in control.items()}
    ([('alert', 'a'), ('hook', 'b'), ('resolve', 'c')], {'skip': 'a', 'stop': 'b'})
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
    return out, control


def _probation_escalation(events: Sequence[Any], step: int, state: PolicyState,
                          config: RecoveryConfig, control: Mapping[str, Any]) -> Any | None:
    """The outcome warning that becomes a rollback request during a probation, if any (none
    when a rollback or stop is already asked for)."""
    if (config.probation and "rollback" not in control and "stop" not in control
            and state.on_probation(step)):
        return next((e for e in events if e.kind == "firing"
                     and getattr(e, "severity", None) == "warning"
                     and _is_outcome(getattr(e, "metric", None))), None)
    return None


def _rollback_decision(e: Any | None, escalated: Any | None, step: int, in_cooldown: bool,
                       state: PolicyState, config: RecoveryConfig) -> Decision | None:
    """The rollback asked for by ``e`` (``None``: the held one) at ``step``: held while
    ``in_cooldown`` (``None``), a ``stop`` once the budget is spent, else a ``rollback``
    counted in ``state``."""
    rule = e.rule if e is not None else state.held
    first = e.step if e is not None else (state.held_step or step)
    if in_cooldown:
        state.held, state.held_step = rule, first
        return None
    state.held = state.held_step = None
    if state.rollbacks >= config.max_rollbacks:
        return Decision("stop", str(rule), first,
                        f"rollback budget of {config.max_rollbacks} spent", EXIT_BUDGET, event=e)
    state.rollbacks += 1
    state.last_rollback_step = step
    reason = (f"warning {rule} during the probation after the rollback at step "
              f"{state.probation_from}" if e is not None and e is escalated else "")
    return Decision("rollback", str(rule), first, reason, event=e)


def _is_sudden(e: Any, state: PolicyState, config: RecoveryConfig) -> bool:
    """A first failure, out of a quiet stretch, in a run that proved healthy (``e``: the
    firing behind the rollback request)."""
    quiet = state.last_alarm is None or e.step - state.last_alarm > config.good_after
    since = getattr(e, "since", None)   # an escalation: when its evidence began
    return (quiet and state.ever_healthy and not state.on_probation(e.step)
            and (since is None or since >= e.step - config.sudden_margin))


def _rollback_or_watch(e: Any | None, escalated: Any | None, step: int, in_cooldown: bool,
                       state: PolicyState, config: RecoveryConfig,
                       events: Sequence[Any] = ()) -> Decision | None:
    """The rollback ``e`` asks for (``None``: the held one), or the watch of a sudden failure
    (``RecoveryConfig.sudden_hold``); a request while one is watched ends the watch with its
    rollback."""
    if state.watching is not None:   # failing again while watched: no passing fault
        e = _end_watch(state)
        in_cooldown = False   # due since the failure, before any cut meanwhile (as at the end)
    elif _to_watch(e, escalated, in_cooldown, state, config, events):
        state.watching, state.watching_step, state.watching_open = e.rule, e.step, []
        state.watching_onset = _began_at(e)
        return Decision("watch", e.rule, e.step, _watch_reason(config), event=e)
    return _rollback_decision(e, escalated, step, in_cooldown, state, config)


def _to_watch(e: Any | None, escalated: Any | None, in_cooldown: bool, state: PolicyState,
              config: RecoveryConfig, events: Sequence[Any] = ()) -> bool:
    """Whether the rollback ``e`` asks for is watched first (``RecoveryConfig.sudden_hold``):
    a sudden failure on finite values, nothing held, no cooldown, no escalation. No firing of
    the flush (``events``) that asks for a rollback may be on a non-finite value: ``e`` is
    only the first of them."""
    nonfinite = any(x.kind == "firing" and "rollback" in tuple(x.actions) and _nonfinite(x)
                    for x in events)
    return (e is not None and e is not escalated and config.sudden_hold > 0
            and state.held is None and not in_cooldown and not _nonfinite(e)
            and not nonfinite and _is_sudden(e, state, config))


def _watch_reason(config: RecoveryConfig) -> str:
    return (f"a sudden failure in a healthy run: watched for {config.sudden_hold} steps "
            "before rolling back (a bad batch often does no lasting harm)")


def _drops(events: Sequence[Any], dropped: Sequence[int], st: PolicyState,
           rc: RecoveryConfig) -> tuple[list[Any], list[Plan]]:
    """Dropped steps (non-finite or spiking gradients, not applied). The first in a quiet
    stretch (none in the ``good_after`` steps before it) needs nothing more: the firings
    of its step lose their control actions (what they saw never reached the parameters),
    and a ``dropped`` plan says so. A repeat within ``good_after`` steps is a failure: it
    asks for a rollback (a rule that stays active over a run of NaN steps fires only
    once)."""
    handled: set[int] = set()
    repeat: int | None = None
    for d in sorted(set(dropped)):
        if st.last_dropped is None or d - st.last_dropped > rc.good_after:
            handled.add(d)
        elif repeat is None:
            repeat = d
        st.last_dropped = d
    if handled:   # an alarm: a failure soon after it is no longer out of a quiet stretch
        st.last_alarm = max(handled | {st.last_alarm or 0})
    kept: list[Any] = []
    for e in events:
        if e.kind == "firing" and (e.step in handled or
                                   (e.step == repeat and _nonfinite(e))):
            e = _Disarmed(e)   # handled here (or by the repeat's own request below)
        kept.append(e)
    plans = [Plan("dropped", "", d, "the gradient was not finite or far above its recent "
                  "median; the step was not applied (skipped, held back or zeroed) and "
                  "training goes on") for d in sorted(handled)]
    st.drops_handled += len(handled)
    if repeat is not None:
        kept.append(_DroppedAgain(repeat))
    return kept, plans


class _Watched:
    """The firing of a watched sudden failure whose rollback comes now (a rollback request
    in its own name, at its own step, still judged sudden; ``onset``: the step the failure
    began, its ``for:`` window's first step or an escalation's evidence, where known)."""

    sudden = True

    def __init__(self, rule: str, step: int, onset: int | None = None) -> None:
        self.rule, self.step, self.since, self.onset = rule, step, None, onset
        self.kind, self.actions = "firing", ("rollback",)


def _end_watch(state: PolicyState) -> "_Watched":
    """End the watch of a sudden failure: its rollback is due after all."""
    assert state.watching is not None and state.watching_step is not None
    e = _Watched(state.watching, state.watching_step, state.watching_onset)
    state.watching = state.watching_step = state.watching_onset = None
    state.watching_open = []
    return e


def _passed(e: "_Watched", step: int) -> Plan:
    """The ``recovered`` plan of a watched failure whose rules resolved (at ``step``)."""
    return Plan("recovered", e.rule, e.step,
                f"the sudden failure at step {e.step} passed: {e.rule} resolved within "
                f"{step - e.step} steps and nothing else failed; no rollback")


def _undone(state: PolicyState, plans: Sequence[Plan]) -> list[Plan]:
    """The end of a watch whose failure a ``skip`` of this flush undid (its target is before
    the failure; the engine goes back there too, so the watched rule never resolves). Before
    the failure means before its onset (``watching_onset``: a ``for:`` window's first step),
    not before the step it fired at: a skip to a state inside the window restores the
    failure, and the watch goes on (its rule still counts as firing: the rollback comes at
    the hold's end, to a snapshot before the onset)."""
    skip = next((p for p in plans if p.action == "skip"), None)
    if state.watching is None or state.watching_step is None or skip is None:
        return []
    began = state.watching_step if state.watching_onset is None else min(
        state.watching_step, state.watching_onset)
    if skip.target is None or skip.target >= began:
        return []
    e = _end_watch(state)
    return [Plan("recovered", e.rule, e.step,
                 f"the sudden failure at step {e.step} was undone by the skip to step "
                 f"{skip.target} ({skip.rule}); no rollback")]


def _past_resume(state: PolicyState, d: Decision, target: SnapshotInfo | None,
                 snaps: Sequence[SnapshotInfo]) -> SnapshotInfo | None:
    """The target of a rollback ``d`` for a failure from before the run was resumed: the
    resume point is after it, so a rollback there would undo nothing of it (a watch or a
    held rollback the checkpoint carried; a rule whose ``for:`` window was under way at the
    checkpoint and fired after it, :func:`_began_before`, whose restored window fires it
    again at once). A snapshot from before the failure the checkpoint carried
    (``snapshot_dir``) is taken instead; ``None`` if there is none."""
    if target is None or not target.pinned or target.step != state.resumed_at:
        return target
    if target.step < d.step and not _began_before(d, target.step):
        return target
    onset = getattr(d.event, "onset", None)
    began = d.step if onset is None else min(d.step, onset)
    return next((s for s in reversed(snaps) if s.step < began and not s.pinned
                 and (s.good or getattr(d.event, "sudden", False))), None)


def _began_before(d: Decision, resumed_at: int) -> bool:
    """Whether the failure behind ``d`` began at or before the step the run was resumed at
    (its rule's ``for:`` window was under way at the checkpoint: the resumed state is in the
    failure, and the engine's state restored with it fires the rule again at once). Not for
    an escalation (a firing with ``since``): a rollback to the resume point with its cut still
    undoes the steps since and changes the rate, as the run that was not interrupted does from
    its start when it holds nothing from before the evidence (the fourteenth round's decision,
    docs/recovery.md).

    >>> from types import SimpleNamespace as E
    >>> [_began_before(Decision("rollback", "r", 22, event=E(onset=o, since=s)), 21)
    ...  for o, s in ((20, None), (21, None), (22, None), (None, None), (20, 20))]
    [True, True, False, False, False]
    """
    onset = getattr(d.event, "onset", None)
    return (onset is not None and onset <= resumed_at
            and getattr(d.event, "since", None) is None)


def open_failure(onsets: Mapping[str, int], rules: Iterable[Any],
                 firing: Mapping[str, int] | None = None) -> int | None:
    """The earliest step a failure not answered yet began: among ``onsets`` (rule name to the
    step its failure began, for the rules whose ``for:`` window is under way:
    ``Engine.open_onsets``), that of a rule that asks for a training-control action or whose
    firing feeds one through ``when:`` (at any depth: the training pack's ``info`` building
    blocks, such as ``loss_far_above_start`` with its ``for: 6`` under ``loss_above_start``,
    carry no action of their own); among ``firing`` (the rules firing now:
    ``Engine.firing_onsets``), that of a rule that feeds a control rule that is not firing (a
    veto, ``unless: [loss_falling]``, holds it back: it fires when the veto ends, with this
    onset). ``None`` if there is none. A rule in an ``unless`` only explains a failure away:
    it is not counted.

    >>> from types import SimpleNamespace as R
    >>> from lrwatch.rules.schema import When
    >>> rules = [R(name="a", actions=("alert",)), R(name="b", actions=("rollback",))]
    >>> open_failure({"a": 3, "b": 20}, rules), open_failure({"a": 3}, rules)
    (20, None)
    >>> rules = [R(name="w", actions=()), R(name="x", actions=(), when=When("firing", ("w",))),
    ...          R(name="c", actions=("rollback",), when=When("any", ("x",)))]
    >>> open_failure({"w": 11}, rules), open_failure({}, rules, {"w": 11, "x": 15})
    (11, 11)
    >>> open_failure({}, rules, {"w": 11, "x": 15, "c": 15}) is None   # c fired: the policy has it
    True
    """
    feeds = _feeding(list(rules))
    now = dict(firing or {})
    starts = [s for n, s in onsets.items() if feeds.get(n)]
    starts += [s for n, s in now.items() if feeds.get(n, set()) - set(now)]
    return min(starts, default=None)


def unanswered_onset(onsets: Mapping[str, int], rules: Iterable[Any],
                     firing: Mapping[str, int], watching_onset: int | None = None
                     ) -> int | None:
    """The earliest step a failure the policy has not rolled back yet began: that of
    :func:`open_failure`, of a rule firing now that asks for a training-control action or
    feeds one (its rollback may wait for a watch or the cooldown), and the onset of a watched
    failure. The snapshot store keeps the newest known-good snapshot before it
    (``SnapshotStore.keep_before``).

    >>> from types import SimpleNamespace as R
    >>> rules = [R(name="a", actions=("alert",)), R(name="b", actions=("rollback",))]
    >>> unanswered_onset({"b": 20}, rules, {"a": 3}), unanswered_onset({}, rules, {"b": 9}, 7)
    (20, 7)
    """
    rules = list(rules)
    feeds = _feeding(rules)
    starts = [s for n, s in firing.items() if feeds.get(n)]
    starts += [x for x in (open_failure(onsets, rules, firing), watching_onset)
               if x is not None]
    return min(starts, default=None)


def _feeding(rules: Sequence[Any]) -> dict[str, set[str]]:
    """Rule name to the rules asking for a training-control action that its firing makes
    fire: itself, if it asks for one, and the control rules whose ``when`` names it, or a
    rule that they name, and so on. Rules that feed none are left out."""
    when = {r.name: getattr(r, "when", None) for r in rules}
    out: dict[str, set[str]] = {}
    for c in (r.name for r in rules if set(r.actions) & set(CONTROL_ACTIONS)):
        todo = [c]
        while todo:
            name = todo.pop()
            if c not in out.setdefault(name, set()):
                out[name].add(c)
                w = when.get(name)
                todo.extend(w.rules if w is not None else ())
    return out


def _undoes_nothing(state: PolicyState, d: Decision, resumed_at: int) -> Plan:
    """No snapshot from before the failure ``d`` answers: the run stops (as where no snapshot
    is held) and says why; the rollback booked for it is given back."""
    state.rollbacks = max(0, state.rollbacks - 1)
    if _began_before(d, resumed_at) and d.step > resumed_at:
        onset = d.event.onset
        what = (f"{d.rule} fired at step {d.step}, but the failure began at step {onset}: its "
                f"for: window was under way when the checkpoint was written, the run was "
                f"resumed at step {resumed_at}, inside it, and a rollback there would restore "
                f"the failure and its window (it fires again at once)")
        first = onset
        # The only known-good state held is the resume point, inside the failure: restoring
        # it would undo nothing and the stop line would call it known good.
        params = {"restore": "none"}
    else:
        what = (f"the run was resumed at step {resumed_at}, after it, and a rollback there "
                f"would undo nothing")
        first = d.step
        params = {}
    return Plan("stop", d.rule, d.step,
                f"no snapshot from before the failure at step {first}: {what}; resume from a "
                f"checkpoint written before step {first} (with snapshot_dir, a checkpoint "
                "carries the snapshots from before a failure it has not rolled back yet)",
                EXIT_BUDGET, event=d.event, params=params)


def _resume_failed_again(state: PolicyState, target: SnapshotInfo,
                         snaps: Sequence[SnapshotInfo], step: int, good_after: int) -> bool:
    """Whether a rollback at ``step`` to ``target`` goes to the resume point a second time,
    the first not having got the run past it (no snapshot since proved good), with nothing
    held from before it: the checkpoint's own last update is measured only by the resumed
    run's samples, so the resume point itself may be the damage, and going back to it again,
    the cut compounding, would loop until the budget is spent. In a run that never proved
    healthy the first was a restart at a cut rate: the same, once the restart failed again
    before getting past where the run failed at the full rate (the steps it went back over,
    plus ``good_after``: where :meth:`RecoveryPolicy._rollback` would compound the cut).

    >>> st = PolicyState(resumed_at=25, last_rollback_to=25, last_rollback_at=30)
    >>> t = SnapshotInfo(25, True, pinned=True)
    >>> [_resume_failed_again(st, t, [t], s, 5) for s in (40, 41)]
    [True, False]
    >>> _resume_failed_again(st, t, [SnapshotInfo(0, True), t], 35, 5)
    False
    """
    again = (target.pinned and state.resumed_at is not None
             and target.step == state.resumed_at and target.step > 0
             and state.last_rollback_to == target.step
             and not any(s.good and s.step < target.step for s in snaps))
    if not again or state.ever_healthy:
        return again
    last = state.last_rollback_at
    return last is not None and step - last <= (last - target.step) + good_after


def _resume_point_suspect(state: PolicyState, d: Decision, resumed_at: int) -> Plan:
    """The stop of :func:`_resume_failed_again` (exit status 4, the rollback booked for it
    given back), leaving the state as it is (the resume point is no known-good state)."""
    state.rollbacks = max(0, state.rollbacks - 1)
    how, rate = "", ""
    if not state.ever_healthy:
        how = (", restarted there at a cut rate, before getting past where it had failed "
               "(the run never proved healthy since it was resumed)")
        rate = ", or, if that checkpoint is sound, at a lower learning rate"
    return Plan("stop", d.rule, d.step,
                f"the run failed again after its rollback to the step it was resumed at "
                f"({resumed_at}){how}, and no snapshot from before it is held: the "
                f"checkpoint's state may itself be damaged (its last update shows only in "
                f"the resumed run's samples), and going back to it again would undo nothing; "
                f"resume from a checkpoint written before step {resumed_at} (with "
                "snapshot_dir, a checkpoint carries the snapshots from before it, and the "
                f"resumed run goes back to those){rate}", EXIT_BUDGET, event=d.event,
                params={"restore": "none"})


def _nonfinite(e: Any) -> bool:
    """A firing on a non-finite value (a NaN/inf loss or gradient, or the device flag)."""
    v = getattr(e, "value", None)
    metric = getattr(e, "metric", None) or ""
    return (isinstance(v, float) and not math.isfinite(v)) or metric.startswith("nonfinite")


class _Disarmed:
    """A rule event whose control actions were dealt with (a dropped non-finite gradient):
    its notifications still go out."""

    def __init__(self, event: Any) -> None:
        self._event = event
        self.actions = tuple(a for a in event.actions if a not in CONTROL_ACTIONS)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._event, name)


@dataclass(frozen=True)
class _DroppedAgain:
    """A second dropped step within ``good_after`` steps: a rollback request."""

    step: int
    rule: str = "dropped_again"
    kind: str = "firing"
    actions: tuple[str, ...] = ("rollback",)
    severity: str = "critical"
    metric: str = "grad_dropped"
    value: float = 1.0
    message: str = "a step was dropped again within good_after steps"
    since: int | None = None


_TAINTED = ("a dropped step left non-finite values in the model's buffers (a BatchNorm's "
            "running statistics)")


def _began_at(e: Any) -> int | None:
    """The step the failure behind the firing ``e`` began: the earliest of its ``since`` (an
    escalation's evidence: the firings it combines) and its ``onset`` (the first step of its
    ``for:`` window, or of the windows of the firings an escalation combines: an ``info``
    building block's ``for: 6`` under a critical ``when:``); ``None`` where it carries neither.

    >>> from types import SimpleNamespace as E
    >>> [_began_at(E(since=s, onset=o)) for s, o in ((15, 11), (15, None), (None, 20),
    ...                                               (None, None))]
    [11, 15, 20, None]
    """
    known = [x for x in (getattr(e, "since", None), getattr(e, "onset", None)) if x is not None]
    return min(known, default=None)


def _good_before(snaps: Sequence[SnapshotInfo], step: int) -> SnapshotInfo | None:
    return next((s for s in reversed(snaps) if s.good and s.step < step), None)


class RecoveryPolicy(RateScale, PreflightBooking, MidCheckBooking):
    """Firings and progress in, plans out (see the module docstring).

    >>> from types import SimpleNamespace as E
    >>> pol = RecoveryPolicy(RecoveryConfig())
    >>> ev = [E(rule="nonfinite", step=12, kind="firing", actions=("rollback",))]
    >>> plan, = pol.plan(ev, Progress(12, [SnapshotInfo(0, True, pinned=True)]))
    >>> plan.action, plan.target, plan.restart, plan.lr_factor, plan.warmup
    ('rollback', 0, True, 0.1, 100)
    >>> plan.describe(5, pol.state.rollbacks)
    'restart from the initial state (step 0), learning rate x0.1, warmed up over 100 steps (1/5 rollbacks): diverged before any state after the start proved healthy: the learning rate is too high, not a passing fault'
    >>> round(pol.state.lr_scale, 6), len(pol.state.ramp)
    (0.001, 99)
    """

    def __init__(self, config: RecoveryConfig | None,
                 action_params: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None
                 ) -> None:
        self.config = config
        self.action_params = dict(action_params or {})
        self.state = PolicyState()
        #: whether the executor can run a range test (it says so; not part of the state)
        self.probe_available = False
        #: whether the run has a learning-rate scheduler (the executor says so)
        self.scheduled = False
        #: the restart warm-up of ``restart_warmup="auto"`` (the executor measures it from
        #: the optimizer: :func:`restart_warmup_for`)
        self.auto_warmup = UNKNOWN_OPTIMIZER_WARMUP
        self._sudden_now = False
        self._suspects: tuple[int, int] | None = None

    # counters read by users and tests (watch.policy.rollbacks, ...)
    def __getattr__(self, name: str) -> Any:
        if name != "state" and name in PolicyState.__dataclass_fields__:
            return getattr(self.state, name)
        raise AttributeError(name)

    # --- plans -------------------------------------------------------------------------------
    def plan(self, events: Sequence[Any], progress: Progress) -> list[Plan]:
        """Plans for one flush: notifications, at most one control plan, and the end of a
        probation (``lr_recover``) when nothing else happens."""
        st, rc = self.state, self.config
        out: list[Plan] = []
        if rc is not None and progress.dropped:
            events, handled = _drops(events, progress.dropped, st, rc)
            out.extend(handled)
        if rc is not None and progress.tainted:   # (dropped, and still not finite)
            events = list(events) + [_DroppedAgain(d, rule="dropped_tainted",
                                                   metric="nonfinite_state",
                                                   message=_TAINTED) for d in progress.tainted]
        for d in decide(events, progress.step, st, rc, self.action_params, self.scheduled):
            self._sudden_now = d.action == "rollback" and self._sudden(d)
            self._suspects = None
            out.append(self._plan_one(d, progress))
        self._sudden_now, self._suspects = False, None
        out.extend(_undone(st, out))
        if st.watching is not None and rc is not None and not st.stopped:
            # decided at a flush with no other control plan (one per flush; a stop outranks)
            busy = any(p.action in CONTROL_ACTIONS for p in out)
            out.extend(self._watched(events, progress, busy))
        alarms = [e.step for e in events if e.kind == "firing"
                  and getattr(e, "severity", None) in ("warning", "critical")]
        if alarms:
            st.last_alarm = max(alarms + [st.last_alarm or alarms[0]])
        if (rc is not None and st.probation_until is not None and not st.stopped
                and progress.step > st.probation_until and st.watching is None
                and not any(p.action in CONTROL_ACTIONS for p in out)):   # (not mid-watch)
            out.extend(self._end_probation(progress.step))
        if any(p.action == "stop" for p in out):
            st.stopped = True
        return out

    def _watched(self, events: Sequence[Any], progress: Progress,
                 busy: bool = False) -> list[Plan]:
        """A watched sudden failure (``RecoveryConfig.sudden_hold``), at a flush: once its
        rule has resolved and the hold is over, the run goes on (``recovered``); a rule still
        firing when the hold is over rolls back, as the failure would have at once. ``busy``:
        the flush has a control plan already (a stop, a skip, a rate cut): decided later."""
        st, rc = self.state, self.config
        assert rc is not None and st.watching is not None and st.watching_step is not None
        for e in events:   # the rules that asked for a rollback since, until they resolve
            if (e.kind == "firing" and "rollback" in tuple(e.actions)
                    and e.step >= st.watching_step and e.rule not in st.watching_open):
                st.watching_open.append(e.rule)
            elif e.kind == "resolved" and e.rule in st.watching_open:
                st.watching_open.remove(e.rule)
        if busy or progress.step < st.watching_step + rc.sudden_hold:
            return []
        if not st.watching_open:
            return [_passed(_end_watch(st), progress.step)]
        d = _rollback_decision(_end_watch(st), None, progress.step, False, st, rc)
        assert d is not None
        self._sudden_now = d.action == "rollback"
        try:
            return [self._plan_one(d, progress)]
        finally:
            self._sudden_now, self._suspects = False, None

    def release_held(self, progress: Progress) -> list[Plan]:
        """At the end of the run: a rollback held back by the cooldown must not be lost, nor
        that of a watched failure still firing (to the snapshot its hold's end would take)."""
        st, rc = self.state, self.config
        if st.watching is not None and not st.watching_open and not st.stopped:
            return [_passed(_end_watch(st), progress.step)]   # resolved before the end
        watched = (_end_watch(st) if st.watching is not None and st.watching_open
                   and st.held is None else None)   # still failing: roll back
        st.watching, st.watching_step, st.watching_open, st.watching_onset = None, None, [], None
        held, step = st.held, st.held_step
        if watched is not None:
            held, step = watched.rule, watched.step
        st.held = st.held_step = None
        if rc is None or held is None or st.stopped:
            return []
        if st.rollbacks >= rc.max_rollbacks:
            return [Plan("stop", held, step or progress.step,
                         f"rollback budget of {rc.max_rollbacks} spent", EXIT_BUDGET)]
        d = Decision("rollback", held, step or progress.step,
                     "watched, still failing at the end of the run" if watched is not None
                     else "held by the cooldown until the end", event=watched)
        if not progress.snapshots:
            return []
        st.rollbacks += 1
        self._sudden_now = watched is not None
        try:
            return [self._plan_one(d, progress)]
        finally:
            self._sudden_now, self._suspects = False, None

    def probed(self, plan: Plan, measured: float | None, steps: int) -> Plan:
        """The executor ran the range test for ``plan``: ``measured`` is the rate to restart
        at as a multiple of the rate that failed (``None``: no usable curve). Returns the
        plan with its real factor and scale; the policy's scale and ramp follow it."""
        st, rc = self.state, self.config
        assert rc is not None
        st.probes += 1
        st.probe_steps += steps
        if measured is None or not measured > 0:
            cut = plan.lr_factor   # the fixed restart factor stands in
            why = "the range test found no stable rate; fixed factor instead"
        else:
            cut = min(1.0, measured)
            why = f"measured by a {steps}-step range test"
        start = st.lr_scale / plan.lr_factor * cut   # undo the placeholder cut
        # the episode booked the placeholder; book the measured cut instead
        st.episode_cut *= cut / plan.lr_factor
        st.lr_scale = start   # the warm-up ramp (if any) keeps its shape up to the new rate
        reason = f"{plan.reason}; {why}" if plan.reason else why
        return replace(plan, reason=reason, lr_factor=cut, scale=start, probe=False)

    def _plan_one(self, d: Decision, progress: Progress) -> Plan:
        st, rc = self.state, self.config
        if d.action in ("alert", "resolve", "hook", "stop", "watch"):
            return Plan(d.action, d.rule, d.step, d.reason, d.exit_status, event=d.event,
                        params=d.params)
        if d.action == "reduce_lr":
            assert rc is not None
            factor = float(d.params.get("factor", rc.reduce_lr_factor))
            st.lr_scale *= factor
            return Plan("reduce_lr", d.rule, d.step, d.reason, lr_factor=factor,
                        scale=st.lr_scale, event=d.event)
        found = self._target(d, progress)
        target = _past_resume(self.state, d, found, progress.snapshots) if (
            d.action == "rollback") else found
        if target is None and found is not None:
            return _undoes_nothing(self.state, d, found.step)
        if target is None:
            return Plan("stop", d.rule, d.step, "no snapshot to go back to", EXIT_BUDGET,
                        event=d.event)
        if d.action == "rollback" and _resume_failed_again(
                self.state, target, progress.snapshots, progress.step,
                rc.good_after if rc is not None else 0):
            return _resume_point_suspect(self.state, d, target.step)
        if d.action == "skip":
            return Plan("skip", d.rule, d.step, d.reason, target=target.step,
                        scale=st.lr_scale, event=d.event)
        return self._rollback(d, target, progress.step)

    def _target(self, d: Decision, progress: Progress) -> SnapshotInfo | None:
        snaps = list(progress.snapshots)
        if d.action == "skip":
            return next((s for s in reversed(snaps) if s.step < d.step), None)
        if self._sudden_now:
            # the rules were quiet since every snapshot still held (a rollback discards the
            # pending ones), so the newest one before the onset is healthy
            margin = 0 if _nonfinite(d.event) else self.config.sudden_margin  # type: ignore
            onset = min(d.step, getattr(d.event, "since", None) or d.step)
            limit = onset - margin if margin else onset - 1
            began = _began_at(d.event)   # a for: window longer than the margin: before it
            limit = limit if began is None else min(limit, began - 1)
            newest = next((s for s in reversed(snaps) if s.step <= limit), None)
            if newest is not None and not newest.pinned:
                self.state.last_to_pending = not newest.good
                self._suspects = (limit + 1, d.step)   # the batches not to replay
                return newest
        target = next((s for s in reversed(snaps) if s.good), None)
        began = _began_at(d.event)
        if target is not None and began is not None and target.step >= began:
            # the failure began there (an escalation's evidence, a for: window's first step,
            # a window of a rule it escalates), so later snapshots are suspect
            target = _good_before(snaps, began) or target
        last, was_pending = self.state.last_rollback_to, self.state.last_to_pending
        self.state.last_to_pending = False
        if (target is not None and last is not None
                and (target.step == last or (target.step < last and not was_pending))):
            # the last rollback went here and the run diverged again before a newer snapshot
            # proved healthy: this state may be damaged; go further back
            target = _good_before(snaps, target.step) or target
        return target

    def _sudden(self, d: Decision) -> bool:
        """A first failure, out of a quiet stretch, in a run that proved healthy."""
        assert self.config is not None
        if getattr(d.event, "sudden", False):   # a watched failure, judged when it fired
            return True
        return d.event is not None and _is_sudden(d.event, self.state, self.config)

    def _rollback(self, d: Decision, target: SnapshotInfo, step: int) -> Plan:
        st, rc = self.state, self.config
        assert rc is not None
        # "Kept failing": diverged again before the run got back past where it failed last
        # time (the steps it rolled back over, plus the quiet window): the cut compounds.
        if (st.last_rollback_at is not None and st.last_rollback_to is not None
                and step - st.last_rollback_at
                <= (st.last_rollback_at - st.last_rollback_to) + rc.good_after):
            st.rollback_repeats += 1
        else:
            st.rollback_repeats = 0
        st.last_rollback_to, st.last_rollback_at = target.step, step
        now = st.lr_scale   # what the rates carry until the plan is carried out
        since = getattr(d.event, "since", None)
        restart = target.pinned and (not st.ever_healthy or since is not None)
        cut, warmup, reason, replay_drop = self._rollback_cut(d, restart)
        self._open_episode(step, target, cut, restart)
        # a ramp in progress belonged to the abandoned trajectory: cut from where it headed
        heading = st.lr_scale * math.prod(st.ramp)
        st.ramp = []
        scale = heading * cut
        if warmup > 1:
            st.ramp = [(k + 1) / k for k in range(1, warmup)]
            scale /= warmup
        st.lr_scale = scale
        st.ramp_restart = restart and bool(st.ramp)
        st.restarts += int(restart)
        probe = (rc.probe == "auto" and self.probe_available
                 and (restart or st.rollback_repeats > 0))
        return Plan("rollback", d.rule, d.step, reason, target=target.step, lr_factor=cut,
                    scale=scale, warmup=warmup if warmup > 1 else 0, restart=restart,
                    probe=probe, skip_batches=rc.skip_batches, event=d.event,
                    probe_from=heading, replay_drop=replay_drop, from_scale=now)

    def _end_probation(self, step: int) -> list[Plan]:
        """Probation passed: after a single rollback (a one-off fault) the rate comes back."""
        st, rc = self.state, self.config
        assert rc is not None
        st.probation_from = st.probation_until = None
        if not (rc.lr_recover and st.episode_rollbacks == 1 and not st.episode_restart
                and not st.persistent and 0 < st.episode_cut < 1):
            return []
        n = max(1, rc.good_after)
        back = 1.0 / st.episode_cut
        st.ramp = [back ** (1.0 / n)] * n
        st.ramp_restart = False
        st.lr_recovered = True
        st.episode_cut = 1.0
        return [Plan("lr_recover", "", step,
                     "the run passed its probation after a single rollback (a one-off fault)",
                     lr_factor=back, warmup=n)]

    # --- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return asdict(self.state)

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        for f in fields(PolicyState):
            if f.name in d and f.name != "stopped":   # a resumed run is the user's decision
                v = d[f.name]
                setattr(self.state, f.name,
                        list(v) if f.name in ("ramp", "watching_open") else v)
        self.state.stopped = False
