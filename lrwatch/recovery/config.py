"""How the training side acts on firings: :class:`RecoveryConfig` (the ``recovery=`` settings
of the Watcher and the framework callbacks, checked when built) and the restart warm-up that
``restart_warmup="auto"`` reads off an optimizer's param groups. Pure: no torch, no I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from ..errors import ConfigError
from .config_checks import check_actions, check_pre_flight

__all__ = ["RecoveryConfig", "restart_warmup_for", "UNKNOWN_OPTIMIZER_WARMUP"]


#: The restart warm-up, in steps, for an optimizer ``restart_warmup_for`` does not recognise
#: (the fixed default before 5 December, third round).
UNKNOWN_OPTIMIZER_WARMUP = 100


def restart_warmup_for(param_groups: Iterable[Mapping[str, Any]]) -> int:
    """The restart warm-up that ``restart_warmup="auto"`` gives an optimizer, read from its
    param groups (duck-typed: no torch).

    A restart restores the optimizer's state from the run's start, so every running estimate
    starts at zero again. An estimate of the squared gradient that starts at zero *without*
    a bias correction makes the first steps too large: RMSprop's ``v`` after ``t`` steps is
    ``1 - alpha^t`` of its steady value, so a step is ``1/sqrt(1 - alpha^t)`` times its
    steady size (10x at the first step at ``alpha=0.99``). The warm-up lasts until that
    excess is at most 2x: ``alpha^n <= 3/4``, ``n = ln(4/3) / ln(1/alpha)`` steps (29 at
    0.99; Adadelta: ``rho``; a fused Adam with ``bias_correction=False``: ``betas[1]``).
    Bias-corrected estimates (Adam, AdamW, NAdam, RAdam, Adamax, Adafactor; Adagrad's sum)
    and SGD's momentum buffer (which starts *small*: a warm-up of its own; so do Rprop's
    step sizes) need none: 0. An optimizer whose groups show none of these keys gets
    ``UNKNOWN_OPTIMIZER_WARMUP`` (so does one without groups). Groups disagree: the longest;
    a decay so close to 1 that the warm-up passes 1,000 steps is held at 1,000.

    >>> restart_warmup_for([{"lr": 0.01, "alpha": 0.99, "centered": False}])
    29
    >>> restart_warmup_for([{"lr": 0.001, "betas": (0.9, 0.999)}])
    0
    >>> restart_warmup_for([{"lr": 0.1, "momentum": 0.9, "dampening": 0}])
    0
    >>> restart_warmup_for([{"lr": 0.1, "weird": 1}])
    100
    >>> restart_warmup_for([])
    100
    """
    longest, seen = 0, False
    for g in param_groups:
        seen = True
        if "alpha" in g and "centered" in g:                  # RMSprop
            decay = g["alpha"]
        elif "rho" in g and "betas" not in g:                 # Adadelta
            decay = g["rho"]
        elif "betas" in g and g.get("bias_correction", True) is False:
            decay = g["betas"][1]                             # e.g. a fused Adam without it
        elif any(k in g for k in ("betas", "momentum", "lr_decay", "beta2_decay", "etas",
                                  "lambd")):
            decay = 0.0           # bias-corrected; SGD; Adagrad, Adafactor, Rprop, ASGD
        else:
            decay = None
        try:
            n = (UNKNOWN_OPTIMIZER_WARMUP if decay is None
                 else math.ceil(math.log(4.0 / 3.0) / -math.log(float(decay)) - 1e-9)
                 if 0.0 < float(decay) < 1.0 else 0 if float(decay) == 0.0
                 else UNKNOWN_OPTIMIZER_WARMUP)
        except (TypeError, ValueError, ZeroDivisionError, OverflowError):
            n = UNKNOWN_OPTIMIZER_WARMUP
        longest = max(longest, min(n, 10 * UNKNOWN_OPTIMIZER_WARMUP))
    return longest if seen else UNKNOWN_OPTIMIZER_WARMUP


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
        start proved healthy, so that the rollback is a restart from the initial state: its
        configured learning rate is too high, often by an order of magnitude or more. A tenth
        is the usual margin below the rate where the loss blows up in a range test.
    restart_warmup:
        Steps over which the learning rate ramps up linearly again after a restart (from
        ``1/restart_warmup`` of its new value). 0 turns it off. ``"auto"`` (default): as
        long as the optimizer's running estimates that start at zero *without* a bias
        correction keep its steps more than twice their steady size
        (:func:`restart_warmup_for`): ``ln(4/3) / ln(1/alpha)`` steps for RMSprop (29 at
        torch's ``alpha=0.99``, whose first step after a restart from a fresh state is 10x
        its steady size); none for SGD, Adam and the other bias-corrected optimizers; 100
        for an optimizer it does not recognise.
    probe:
        ``"auto"``: where the executor can run a learning-rate range test (a Watcher given
        ``probe_loss``; the Lightning callback), a rollback whose fixed factor is a guess
        measures the rate instead: a restart (the configured rate is wrong by an unknown
        amount) and a rollback that failed again soon after the last one. The test runs from
        the restored state (see :mod:`lrwatch.recovery.lr_find`) and the run goes on at
        ``probe_fraction`` of the largest stable rate it finds, never above the rate that
        failed. A first mid-run failure keeps its factor (most are one-off faults, whose rate
        is right). ``"off"`` (default): fixed factors only. Off by default because on the
        family suite the 15-step probe (5% of a 300-step budget) measured rates 2-3x too low
        on the language models, and fixed factors healed more runs (12/39 against 5/39,
        ``docs/recovery.md``); a full ``lrwatch lr-find`` before training is the better use
        of a range test.
    lr_check:
        ``"auto"``: before the first step, a Watcher given ``probe_loss`` runs a short range
        test (``lr_check_steps`` steps from ``lr / 1000`` to ``10 lr`` on the first batches,
        which are then trained on as usual; everything the test touches is restored), scored
        on the loss of *one fixed batch* after every step (one extra forward each), and, when
        that loss rises above its starting level at a rate up to the configured one and never
        comes back (:func:`lrwatch.recovery.curve.preflight_turn`), starts the run at 0.3x the
        rate of the curve's lowest point instead. Its steps and forwards (a third of a step
        each) count against the run's budget like a probe's. ``"off"`` (default): the
        configured rate is trained at. Off by default because it heals few runs more than
        the rules alone: scoring a fixed batch removed the batch noise that made the first
        version cut good rates (an autoencoder cut a thousandfold), and it cut no tuned rate on
        three seeds of the family suite, but most would-diverge runs there fail after dozens of
        steps of falling loss, which a test from the untrained state does not see (40 of 117
        healed against 36 without it), and its 5% of the budget cost three tuned runs their
        band on one seed (``benchmarks/recovery_preflight.py``, ``docs/recovery.md``).
    lr_check_steps:
        The pre-flight test's steps (at least 3). 11 (default): with its 12 forwards, 15
        steps' worth, 5% of a 300-step budget.
    start_check:
        ``"auto"`` (default): a Watcher given ``probe_loss`` and handed its batches by
        :meth:`~lrwatch.watch.Watcher.batches` checks its rate once, after the first
        ``start_check_steps`` steps: a *shadow* of the run, started again from the run's start
        state, trains on the same batches at ``restart_lr_factor`` (a tenth) of the rates the
        run used; both are scored on the next ``start_check_batches`` batches of the stream
        (which neither has trained on; they are trained on as usual afterwards), and when
        the shadow's loss is lower with ``start_check_confidence`` (a one-sided paired
        t-test, :func:`lrwatch.recovery.start_check.compare`) the run goes on from the shadow
        at that rate (the schedule keeps its shape, scaled). The shadow's steps and the
        forwards (a third of a step each) count against the budget like a probe's: 10 + 4 =
        14 steps at the defaults -- only where the gate opens (``start_check_gate``: no
        shadow for a run whose first steps left no batch worse than the untouched network). A rate several times too high often fails late and with
        no signal a rule can read (it learns worse, or sits at a constant prediction's
        loss), but loses at once against a tenth of itself: on the family suite (three
        seeds) the check cut no run at its tuned rate and would-diverge runs healed went
        from 53 to 79 of 119; on five families outside it (blind set Z, two seeds) from 14
        to 24 of 54, no tuned run lost. Where the steps are booked against a short fixed
        budget they cost one-off faults their 1-point band against the bare clean run (300
        steps: 97 -> 78 of 108; docs/recovery.md, "The start check"). ``"off"``: no check.
        The Lightning and Hugging Face callbacks run it too, on the batches the run meets:
        the run's state after ``start_check_steps`` steps and the shadow are scored on the
        next ``start_check_batches``, and an adopted shadow also trains on them (cost 20
        steps instead of 14; docs/integrations.md).
    clip_grad_norm:
        The total gradient norm the training step clips to (``clip_grad_norm_``), if it
        clips: the throw-away steps of the start check's shadow, the range tests and the
        pre-flight check clip the same, so that the shadow is the run at a tenth of its rate.
        ``None`` (default): no clipping. The Lightning and Hugging Face callbacks fill it in
        from the trainer (``gradient_clip_val`` with the norm algorithm; ``max_grad_norm``)
        unless it is given.
    mid_check:
        ``"auto"``: a Watcher given ``probe_loss`` and handed its batches by
        :meth:`~lrwatch.watch.Watcher.batches`, in a run without a scheduler, checks its rate
        again at step ``mid_check_first``, then at twice the step the last check ran from
        (100, 200, 400, ...): from the run's state then, a shadow trains on the run's next
        ``mid_check_steps`` batches at ``mid_check_factor`` of its rates; both are scored on
        the ``mid_check_batches`` after them, and the run goes on from the shadow at that
        rate when its loss is lower by ``mid_check_margin`` with ``start_check_confidence``
        (:mod:`lrwatch.recovery.mid_check`). Not during a restart's warm-up or a rollback's
        probation. Each check costs its shadow's steps and forwards (a third of a step each)
        against the budget: 5 + 3 = 8 steps at the defaults. ``"off"`` (default): no check
        (docs/recovery.md, "The mid-run rate check"). The framework callbacks do not run it.
    mid_check_first, mid_check_factor, mid_check_steps, mid_check_batches:
        The step of the first mid-run check (at least 2; 100: at 40 the check cut a slow
        starter's tuned run on blind set AK), the shadow's share of the rate (in (0, 1)), its
        steps and the held-out batches (at least 2 each).
    mid_check_margin:
        How much lower the shadow's held-out loss must be, as a share of the run's (in
        [0, 1); 0.05): the paired test is on the run's loss less the shadow's less this
        share, so that a lower rate's small short-term gain in a run that sits in its own
        noise (a tuned run) is not taken for a rate too high to settle (docs/recovery.md,
        "The mid-run check's margin").
    start_check_steps, start_check_batches, start_check_confidence:
        The steps before the check (at least 2), the held-out batches it scores both models
        on (at least 2), and the confidence of the paired test (in (0.5, 1)).
    start_check_gate:
        Where the untrained loss was measured on the batches the run then trained on first
        (:meth:`~lrwatch.watch.Watcher.batches`; in the callbacks, a second pass over the
        loader that drew the same batches), the shadow is trained only when one of the
        run's steps 2 to ``untrained_batches`` met its batch at more than this many times the
        untouched network's loss on it (:func:`lrwatch.recovery.start_check.worst_ratio`):
        otherwise the rate stands at no cost. 1.05 (default): on the family suite it spares
        49 of 54 tuned runs the check's 14 steps and skips 2 of the 82 shadows the check
        adopts (docs/recovery.md, "The gate before the shadow"). ``0``: always check.
    probe_steps, probe_span, probe_fraction:
        The probe's steps (they count against the run's budget and are reported), the range
        it spans below the failed rate (rates from ``failed / probe_span`` up to the failed
        rate), and the share of the largest stable rate to restart at.
    sudden_lr_factor:
        The cut for a *sudden* failure in a run that has proved healthy: the first failure of
        an episode, with no warning or critical firing in the ``good_after`` steps before it
        (a NaN batch, a poisoned batch, a one-step spike). Most likely a bad batch, not a
        wrong rate: the rollback goes to the newest snapshot at least ``sudden_margin`` steps
        before the firing (a non-finite value: just before it), known good or not yet (the
        rules were quiet since it, or a rollback would have discarded it), and keeps the rate
        (1.0). If it was the rate after all, the run fails again within its probation: that
        rollback goes further back and is cut as the second of a series, ``lr_factor ** 2``
        (x0.25 at the defaults: the sudden rollback, which kept the rate, was the first), and
        each further repeat by one more power (``lr_factor ** 3``, ...), or the rate is
        measured.
    sudden_margin:
        Steps between a sudden firing and the snapshot it goes back to: the rules fire a few
        steps after the onset (``for:``, the untrained-loss rules' 6 steps).
    sudden_hold:
        Steps a sudden failure is watched before its rollback (0: roll back at once). A bad
        batch that reached the parameters often does little harm: the next batches' losses
        are back where they were, and a rollback would only throw away the steps since the
        snapshot (up to ``min_interval``). So a sudden failure on finite values is watched
        first: when every rule that asked for a rollback has resolved by the first flush at
        least ``sudden_hold`` steps after it, the run goes on untouched (a ``recovered``
        event); one still firing then rolls back, to the same snapshot before the onset, and
        a rollback asked for at a later flush meanwhile comes at once, to that snapshot too
        (not held by the cooldown of a cut taken during the watch). A ``skip`` back to before
        the failure ends the watch (it undid the failure). The decision is taken at a flush,
        so the wait is at least one flush. A non-finite value is never watched (the
        parameters may be lost). A run resumed during a watch rolls back to a snapshot from
        before the failure that its checkpoint names (``snapshot_dir``), or else stops: its
        start, the resumed state, is after the failure.
    guard:
        A step whose gradient is not finite, or whose gradient norm is more than
        ``guard_ratio`` times the median of the last 50 kept steps' (once 20 exist: a batch of
        garbage; by default a ratio sized by the run's own spikes), is not applied, and the
        Watcher records ``grad_dropped`` (:class:`lrwatch.probe.GradGuard`; decided on the
        device, no host sync). ``"auto"``
        (default): where it costs nothing. For an optimizer built with ``fused=True`` (Adam,
        AdamW, SGD, Adagrad) the Watcher hands the fused step the flag
        (``optimizer.found_inf``, the hook ``GradScaler`` uses), and the step is skipped on the
        device, state included. For any optimizer whose parameters are all on the CPU, where
        reading the verdict waits for nothing, the verdict is read on the host
        (:class:`lrwatch.probe.HostGradGuard`, a few microseconds) and a bad step's gradients
        are held back for that step (``p.grad = None``, given back after it): every torch
        optimizer then leaves the parameters and its state alone, as the fused step does.
        ``"on"``: also for other optimizers on a GPU, by zeroing the gradient on the device
        (one pass over the gradients per step, 2.0-4.4% of an H200 step, docs/recovery.md);
        the optimizer then steps on a zero gradient (momentum still moves it). ``"off"``:
        every step is applied. Never with a ``GradScaler``, which skips non-finite steps
        itself. A single dropped step in a quiet stretch (none in the ``good_after`` steps
        before it) is then handled: the firings of that step roll nothing back (the step never
        reached the parameters). Another within ``good_after`` steps is a failure
        (``dropped_again``), handled like any other.
    guard_ratio:
        The spike threshold of the guard. ``"auto"`` (default since 6 December, fourteenth
        round): a threshold sized by the run's own spikes, ``max(20, 3 x the largest ratio of
        a step it kept)`` (:data:`lrwatch.probe.AUTO_FLOOR`), so a quiet run holds a poisoned
        batch 40x its median and a run whose ordinary steps spike (30-3,500x) keeps them. A
        number: that fixed ratio (100, the default before, is 3.5 times the largest ratio on
        137 healthy runs of six model families, 28.5); 0 drops non-finite steps only.
    replay:
        After a sudden failure's rollback, ``watch.batches()`` trains again on the batches it
        drew since the snapshot, except the failure's window (the non-finite step; else the
        ``sudden_margin`` steps up to the firing), so the run keeps its data and their order
        less the bad batch (:mod:`lrwatch.recovery.replay`). Other rollbacks go on with new
        batches. Adapters whose framework draws the data do not replay. Off by default: on the
        family suite it changed no one-off outcome beyond the batch-order noise, and a "sudden"
        failure that was really the rate came back to the same edge along the same batches
        (docs/recovery.md, "Replay").
    replay_mb:
        The most memory the held batches may take (their tensors; references, not copies).
    max_rollbacks:
        The rollback budget; once spent, the next rollback becomes a ``stop``.
    cooldown:
        Minimum steps between two rollbacks. A rollback asked for sooner is held and carried
        out when the cooldown ends.
    skip_batches:
        Batches that ``watch.batches()`` drops after a rollback, on top of the ones between the
        snapshot and the rollback, which are never replayed.
    reduce_lr_factor:
        Factor of the ``reduce_lr`` action.
    cut_unscheduled:
        Carry out ``reduce_lr`` actions marked ``unscheduled`` (the training pack's
        ``loss_plateau``: the rate halved when the loss stalls, in a run that has no
        learning-rate scheduler). ``False`` leaves such runs at their rate.
    max_skips:
        ``skip`` undos allowed before a further one escalates to a rollback.
    probation:
        After a rollback, until the run is back past the step where it failed (plus
        ``good_after`` steps), a ``warning`` firing on an outcome of training (loss, gradient
        norm, evaluation metrics; not the learning rate, momentum, step timings) is treated as
        a rollback request: a run that has just diverged is far more likely to diverge again.
    lr_recover:
        When a probation ends after a single rollback (no restart), the fault was a one-off
        (a bad batch, a transient spike): the learning rate returns to its value before the
        rollback, geometrically over ``good_after`` steps. If the run fails again later, every
        further cut is kept.
    good_after, keep, snapshot_dir, budget, min_interval, max_interval:
        Snapshot settings (see :class:`lrwatch.actions.snapshot.SnapshotStore`).
    """

    lr_factor: float = 0.5
    restart_lr_factor: float = 0.1
    restart_warmup: int | str = "auto"
    probe: str = "off"
    probe_steps: int = 15
    probe_span: float = 1000.0
    probe_fraction: float = 0.3
    lr_check: str = "off"
    lr_check_steps: int = 11
    start_check: str = "auto"
    start_check_steps: int = 10
    start_check_batches: int = 6
    start_check_confidence: float = 0.95
    start_check_gate: float = 1.05
    mid_check: str = "off"
    mid_check_first: int = 100
    mid_check_factor: float = 0.3
    mid_check_steps: int = 5
    mid_check_batches: int = 4
    mid_check_margin: float = 0.05
    sudden_lr_factor: float = 1.0
    sudden_margin: int = 10
    sudden_hold: int = 5
    guard: str = "auto"
    guard_ratio: float | str = "auto"
    replay: bool = False
    replay_mb: float = 512.0
    max_rollbacks: int = 5
    cooldown: int = 20
    skip_batches: int = 0
    reduce_lr_factor: float = 0.5
    cut_unscheduled: bool = True
    clip_grad_norm: float | None = None
    max_skips: int = 20
    probation: bool = True
    lr_recover: bool = True
    good_after: int = 50
    keep: int = 3
    snapshot_dir: str | None = None
    budget: float = 0.01
    min_interval: int = 50
    max_interval: int = 1000

    def __post_init__(self) -> None:
        check_actions(self)
        check_pre_flight(self)

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
