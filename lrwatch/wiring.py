"""The Watcher's arguments, checked, and the collaborators built from them.

Each check raises :class:`~lrwatch.errors.ConfigError` with a message that says what to pass
instead. The builders turn arguments into the objects the Watcher holds: the rule set, the
per-step recorder, the rules' action parameters and the best evaluated state. The Watcher's
``__init__`` says in what order they are built; nothing here keeps state.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch

from .actions.best import BestState, keep_best_state
from .distributed import EXPORT_CHOICES, RankContext, split_by_placement
from .errors import ConfigError
from .probe import LayerIndex
from .rank_settings import recovery_settings, rule_settings
from .recovery.policy import RecoveryConfig, check_action_params
from .rules import RuleSet, load_pack, load_rules
from .rules.layering import join
from .rules.schema import PACKS
from .steps import StepRecorder

__all__ = ["check_args", "check_run_name", "check_probe", "rule_set", "snapshot_dir",
           "build_recorder", "action_params", "build_best", "guard_mode", "step_needs_closure",
           "closure_limits", "rate_limits", "schedule_limits", "untracked_params", "pacing"]

log = logging.getLogger("lrwatch")


def check_args(model: Any, optimizer: Any, flush_every: Any, port: Any, batch_size: Any,
               keep_best: Any, probe_loss: Any, update_ratio_every: Any, export: Any) -> None:
    """The Watcher's arguments, each with an error that says what to pass instead."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizer must be a torch.optim.Optimizer, got "
                          f"{type(optimizer).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(flush_every, int) or isinstance(flush_every, bool) or flush_every < 1:
        raise ConfigError(f"flush_every must be a positive integer, got {flush_every!r}")
    if port is not None and (not isinstance(port, int) or isinstance(port, bool)
                             or not 0 <= port <= 65535):
        raise ConfigError(f"port must be None or an integer in 0..65535, got {port!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool)
                                   or batch_size < 1):
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(keep_best, (bool, str)) or keep_best == "":
        raise ConfigError(f"keep_best must be True (eval_accuracy if logged, else "
                          f"eval_loss), False, or a metric name, got {keep_best!r}")
    if (not isinstance(update_ratio_every, int) or isinstance(update_ratio_every, bool)
            or update_ratio_every < 1):
        raise ConfigError(f"update_ratio_every must be an integer >= 1, "
                          f"got {update_ratio_every!r}")
    if export not in EXPORT_CHOICES:
        raise ConfigError(f"export must be one of {', '.join(map(repr, EXPORT_CHOICES))}, "
                          f"got {export!r}")
    if probe_loss is not None and not callable(probe_loss):
        raise ConfigError(f"probe_loss must be callable as probe_loss(model, batch) -> "
                          f"loss, got {type(probe_loss).__name__}")


def check_run_name(run_name: Any, pushgateway: Any) -> None:
    """``run_name`` goes into a label (``lrwatch_run_info``) and the Pushgateway's grouping
    key, and ``pushgateway`` is a URL: anything but text broke every ``/metrics`` scrape (an
    int label value: HTTP 500) and raised out of ``close()`` after the run."""
    if run_name is not None and not isinstance(run_name, str):
        raise ConfigError(f"run_name must be a string (or None for a generated id), got "
                          f"{type(run_name).__name__} {run_name!r}: pass str(...) of it")
    if pushgateway is not None and (not isinstance(pushgateway, str) or not pushgateway):
        raise ConfigError(f"pushgateway must be the URL of a Pushgateway, such as "
                          f"'http://host:9091', or None, got {pushgateway!r}")


def check_probe(recovery: RecoveryConfig | None, probe_loss: Callable[..., Any] | None) -> bool:
    """Whether rollbacks can measure the rate with a range test (``probe``); the pre-flight
    check (``lr_check``) cannot run without ``probe_loss``."""
    if recovery is not None and recovery.lr_check != "off" and probe_loss is None:
        raise ConfigError("recovery lr_check='auto' runs a range test before the first "
                          "step and needs probe_loss(model, batch) -> loss; pass "
                          "probe_loss= or set lr_check='off'")
    return recovery is not None and recovery.probe != "off" and probe_loss is not None


def rule_set(rules: "str | os.PathLike[str] | RuleSet | Sequence[Any] | None") -> RuleSet | None:
    """The rules a Watcher judges by: a pack name, a rule-file path, a RuleSet, a list of
    these (joined in order as layers, as ``lrwatch replay --rules A --rules B`` joins them:
    ``["training", "my.yml"]``, see docs/rules.md, "Layering rule sets"), or None."""
    if rules is None or isinstance(rules, RuleSet):
        return rules
    if isinstance(rules, str) and rules in PACKS:
        return load_pack(rules)
    if isinstance(rules, (str, os.PathLike)):
        return load_rules(rules)
    if isinstance(rules, (list, tuple)) and rules:
        # joined as layers (lrwatch.rules.layering): a file may refer to the rules of the
        # others, and turn off or replace (override: true) a rule of an earlier one
        if any(r is None for r in rules):
            raise ConfigError("rules: a list of rule sets cannot contain None")
        return join([r if isinstance(r, (str, os.PathLike, RuleSet)) else rule_set(r)
                     for r in rules])
    raise ConfigError(f"rules must be a pack name {sorted(PACKS)}, a rule file path, a RuleSet, "
                      f"a non-empty list of these, or None, got {type(rules).__name__}")


def pacing(flush_every: int, flush_lag: int, step: int, ruleset: Any, recovery: Any, *,
           optimizer: torch.optim.Optimizer, scaler: Any = None, probe_loss: Any = None,
           keep_best: Any = True, keep_best_mode: str = "auto") -> dict[str, Any]:
    """The settings that pace a Watcher's collectives under torch.distributed, which every
    rank must share (``RankContext.agree_settings``): when it flushes, its first step, the
    rules it judges with and whether it recovers (the snapshots' memory agreement, rollbacks,
    range tests), and what decides its actions: every rule's definition (a threshold), every
    recovery setting (``replay``, the factors, the budget), whether it has a ``probe_loss``
    (the range tests are collectives), what best state it keeps and whether it guards the
    steps. Per-rank settings (``snapshot_dir``, ``replay_mb``, the exports) may differ."""
    names = [r.name for r in ruleset] if ruleset is not None else None
    rc = RecoveryConfig.coerce(recovery) if ruleset is not None else None
    return {"flush_every": flush_every, "flush_lag": flush_lag, "start_step": step,
            "rules": names, "recovery": rc is not None,
            "rule settings": rule_settings(ruleset), "recovery settings": recovery_settings(rc),
            "probe_loss": probe_loss is not None, "keep_best": [keep_best, keep_best_mode],
            "guard": guard_mode(rc, optimizer, scaler) is not None}


def snapshot_dir(recovery: Any) -> str | None:
    """recovery's snapshot_dir, also with the rules off (``Watcher.recovery`` is None then)."""
    if isinstance(recovery, RecoveryConfig):
        return recovery.snapshot_dir
    return recovery.get("snapshot_dir") if isinstance(recovery, Mapping) else None


def build_recorder(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dist: RankContext,
                   *, scaler: Any, per_layer: bool, layer_depth: int, max_layers: int,
                   update_ratio: bool, update_ratio_every: int,
                   on_commit: Callable[[], None]) -> StepRecorder:
    """The per-step recorder; per-layer norms and the update ratio are off for shards.
    ``dist`` follows the model and optimizer into DDP's ``Join`` (``RankContext.follow_join``)
    and must hold every rank the model is trained over (``RankContext.check_covers``).

    Called from the Watcher's ``__init__`` (the warning points at the line that built it)."""
    dist.follow_join(model, optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    dist.check_covers(model, params)
    device = params[0].device if params else torch.device("cpu")
    sharded = bool(dist.active and split_by_placement(params)[1])
    if sharded and (per_layer or update_ratio):
        warnings.warn("lrwatch: per-layer norms and the update ratio are not yet shard-aware; "
                      "they are off for sharded (FSDP2/DTensor) parameters", stacklevel=3)
        per_layer = update_ratio = False
    names = {id(p): n for n, p in model.named_parameters()}
    named = [(names.get(id(p), f"param{i}"), p) for i, p in enumerate(params)]
    layers = LayerIndex(named, depth=layer_depth, max_layers=max_layers) if per_layer else None
    return StepRecorder(optimizer, device, layers=layers, sharded=sharded,
                        sum_ranks=dist.all_reduce_sum if sharded else None,
                        update_ratio=bool(update_ratio), update_ratio_every=update_ratio_every,
                        scaler=scaler, on_commit=on_commit)


def guard_mode(recovery: Any, optimizer: torch.optim.Optimizer, scaler: Any) -> str | None:
    """How the step path keeps a non-finite gradient off the parameters
    (``RecoveryConfig.guard``): ``"skip"`` (a fused optimizer skips the step itself, for
    free), ``"hold"`` (parameters on the CPU: the verdict is read on the host, which waits for
    nothing there, and a bad step's gradients are taken away for that step), ``"zero"`` (the
    gradient is zeroed on the device: ``guard="on"`` with any other optimizer) or ``None`` (no
    recovery, ``guard="off"``, or a ``GradScaler``, which skips those steps)."""
    if (recovery is None or recovery.guard == "off" or scaler is not None
            or step_needs_closure(optimizer)):
        return None
    groups = optimizer.param_groups
    if groups and all(g.get("fused") for g in groups):
        return "skip"
    params = [p for g in groups for p in g["params"]]
    if params and all(p.device.type == "cpu" for p in params):
        return "hold"
    return "zero" if recovery.guard == "on" else None


def step_needs_closure(optimizer: Any) -> bool:
    """Whether ``optimizer.step`` cannot run without a closure (``torch.optim.LBFGS``): it
    computes its gradients inside the step, so nothing can measure or hold them before it,
    and lrwatch's own throw-away steps (the start check, range tests) cannot take one."""
    try:
        param = inspect.signature(type(optimizer).step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is inspect.Parameter.empty


def closure_limits(optimizer: Any, policy: Any) -> None:
    """Say once what a closure optimizer costs the Watcher, and skip the start check (its
    shadow steps without a closure)."""
    if not step_needs_closure(optimizer):
        return
    log.warning("lrwatch: %s computes its gradients inside step(closure): the gradient norm "
                "recorded is the closure's last, read after the step; the guard cannot hold a "
                "bad step back (off) and the start check does not run (its shadow would step "
                "without a closure). Loss, learning rate and the rules work as usual.",
                type(optimizer).__name__)
    policy.start_checked(0)


def rate_limits(optimizer: Any, recovery: Any) -> None:
    """Say once that an optimizer without a learning rate to set (Adafactor with
    ``relative_step=True``) takes rollbacks without their cut, and no range tests."""
    from .recovery.lr_find import NO_RATES, rates_settable

    if recovery is None or rates_settable(optimizer):
        return
    log.warning("lrwatch: %s: %s. Rollbacks and skips restore snapshots as usual, but a rate "
                "cut (a rollback's, reduce_lr) changes nothing, and the range tests (the start "
                "check, lr_check, a rollback's probe) are skipped.", type(optimizer).__name__,
                NO_RATES)


def schedule_limits(scheduler: Any, recovery: Any) -> None:
    """Say once that a scheduler without ``state_dict()``/``load_state_dict()`` (one of the
    user's own) is not in the snapshots: every snapshot failed on it until the sixteenth
    round, and a rollback had nowhere to go."""
    from .actions.scheduler_state import restorable

    if recovery is None or scheduler is None or restorable(scheduler):
        return
    log.warning("lrwatch: the scheduler %s has no state_dict()/load_state_dict(): snapshots "
                "hold the model, the optimizer (its rates included), the scaler and the data "
                "position, not the schedule, which goes on from where it is after a rollback; "
                "a rollback's rate cut lasts only where it scales the rates it finds in the "
                "optimizer's param groups. Give it both methods to have it restored.",
                type(scheduler).__name__)


def untracked_params(model: torch.nn.Module, optimizer: Any, recovery: Any) -> None:
    """Say once that parameters of ``model`` that require gradients are in no param group of
    ``optimizer``: another optimizer trains them (a GAN's discriminator, an actor-critic's
    critic), whose state no snapshot holds. A rollback put their values back and left that
    optimizer's moments and step counts where the abandoned steps had taken them, silently
    until the sixteenth round."""
    if recovery is None:
        return
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    loose = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if loose:
        log.warning("lrwatch: %d parameter tensor(s) of the model that require gradients are "
                    "in no param group of the optimizer lrwatch watches (%s%s): a rollback "
                    "puts their values back, not the state of another optimizer that trains "
                    "them (a GAN's second optimizer: its moments go on from the abandoned "
                    "steps). Give lrwatch one optimizer over every trained parameter, or set "
                    "requires_grad=False on those you do not train.", len(loose),
                    ", ".join(loose[:3]), ", ..." if len(loose) > 3 else "")


def action_params(rules: Sequence[Any]) -> dict[str, Any]:
    """The rules' action parameters by rule name (checked: a bad one raises ConfigError)."""
    check_action_params(rules)
    return {r.name: r.action_params for r in rules if r.action_params}


def build_best(keep_best: bool | str, mode: str, rules: Sequence[Any], recovery: Any,
               dist: RankContext, on_error: Callable[[], None]) -> BestState | None:
    """The best evaluated state (``keep_best``), beside the snapshots when they are on disk.
    Ranks keep their own copy (FSDP shards differ): one file per rank."""
    return keep_best_state(
        keep_best, mode, rules, snapshot_dir=snapshot_dir(recovery),
        filename=f"best-eval.rank{dist.rank}.pt" if dist.active else "best-eval.pt",
        on_error=on_error)
