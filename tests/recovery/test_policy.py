"""The recovery policy without torch: firings and progress in, plans out."""

from __future__ import annotations

import math
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from lrwatch.recovery.policy import (EXIT_BUDGET, Plan, Progress, RecoveryConfig,
                                     RecoveryPolicy, SnapshotInfo, open_failure)
from lrwatch.rules import Engine, load_pack, parse_rules
from lrwatch.samples import Sample


def fire(rule: str, step: int, actions: tuple[str, ...] = ("rollback",),
         severity: str = "critical", metric: str = "loss", since: int | None = None) -> Any:
    # the pack's `nonfinite` rule fires on a NaN/inf value (a finite sudden failure is watched
    # first, RecoveryConfig.sudden_hold)
    value = math.nan if rule == "nonfinite" else 1.0
    return SimpleNamespace(rule=rule, step=step, kind="firing", actions=actions,
                           severity=severity, metric=metric, since=since, value=value)


START = SnapshotInfo(0, True, pinned=True)


def snaps(*steps: int, good: bool = True) -> list[SnapshotInfo]:
    return [START] + [SnapshotInfo(s, good) for s in steps]


def control(plans: list[Plan]) -> list[Plan]:
    return [p for p in plans if p.action not in ("alert", "resolve", "hook")]


def test_policy_imports_no_torch() -> None:
    code = ("import sys, lrwatch.recovery.policy, lrwatch.recovery.config, "
            "lrwatch.recovery.replay, lrwatch.actions.policy; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_early_divergence_is_a_restart_at_a_tenth_warmed_up() -> None:
    pol = RecoveryPolicy(RecoveryConfig())   # an optimizer it does not know: 100 steps
    (p,) = control(pol.plan([fire("loss_above_start", 8)], Progress(10, snaps())))
    assert (p.action, p.target, p.restart, p.lr_factor, p.warmup) == ("rollback", 0, True,
                                                                       0.1, 100)
    assert pol.lr_scale == pytest.approx(0.1 / 100)
    line = p.describe(5, pol.rollbacks)
    assert line.startswith("restart from the initial state (step 0), learning rate x0.1, "
                           "warmed up over 100 steps (1/5 rollbacks)")
    assert "not a passing fault" in line
    # the warm-up ramp brings the scale to exactly a tenth in 99 steps
    for _ in range(99):
        assert pol.ramp_step() is not None
    assert pol.ramp_step() is None and pol.lr_scale == pytest.approx(0.1)


def test_mid_run_fault_rolls_back_halves_and_recovers_after_probation() -> None:
    cfg = RecoveryConfig(good_after=10)
    pol = RecoveryPolicy(cfg)
    pol.promoted([SnapshotInfo(100, True)])
    # a warning first: the failure grew, it was not sudden
    pol.plan([fire("loss_shift", 112, ("alert",), "warning")], Progress(112, snaps(100, 110)))
    (p,) = control(pol.plan([fire("nonfinite", 118)], Progress(120, snaps(100, 110))))
    assert (p.action, p.target, p.restart, p.lr_factor, p.warmup) == ("rollback", 110, False,
                                                                       0.5, 0)
    assert "rollback to step 110, learning rate x0.5 (1/5 rollbacks)" == p.describe(5, 1)
    assert pol.state.probation_until == 2 * 120 - 110 + 10
    assert pol.plan([], Progress(140, snaps(100, 110))) == []      # still on probation
    (rec,) = pol.plan([], Progress(141, snaps(100, 110)))
    assert rec.action == "lr_recover" and rec.lr_factor == pytest.approx(2.0)
    assert rec.warmup == 10 and "one-off fault" in rec.reason
    while pol.ramp_step() is not None:
        pass
    assert pol.lr_scale == pytest.approx(1.0)


def test_lr_recover_can_be_turned_off_and_never_follows_a_restart() -> None:
    pol = RecoveryPolicy(RecoveryConfig(good_after=10, lr_recover=False, sudden_lr_factor=0.5))
    pol.promoted([SnapshotInfo(100, True)])
    pol.plan([fire("nonfinite", 118)], Progress(120, snaps(100, 110)))
    assert pol.plan([], Progress(200, snaps(100, 110))) == []
    assert pol.lr_scale == 0.5
    pol = RecoveryPolicy(RecoveryConfig(good_after=10, restart_warmup=0))
    pol.plan([fire("nonfinite", 5)], Progress(5, snaps()))
    assert pol.plan([], Progress(100, snaps())) == [] and pol.lr_scale == pytest.approx(0.1)


def test_repeated_failures_compound_and_go_further_back() -> None:
    pol = RecoveryPolicy(RecoveryConfig(good_after=10, cooldown=0))
    pol.promoted([SnapshotInfo(100, True)])
    s = snaps(100, 110)
    pol.plan([fire("loss_shift", 115, ("alert",), "warning")], Progress(115, s))  # not sudden
    (a,) = control(pol.plan([fire("loss_blowup", 118)], Progress(120, s)))
    (b,) = control(pol.plan([fire("loss_blowup", 124)], Progress(125, s)))
    assert (a.target, a.lr_factor) == (110, 0.5)
    # it failed again before getting back past 120: the same state may be damaged -> 100,
    # and the cut compounds (x0.25 of the rate before, which the scale already carries x0.5)
    assert (b.target, b.lr_factor) == (100, 0.25)
    assert "cut compounds" in b.reason
    assert pol.lr_scale == pytest.approx(0.5 * 0.25)


def test_after_a_stop_the_policy_plans_nothing_but_notifications() -> None:
    """A loop that goes on after a stop (it only calls log(), never reads should_stop) is
    left alone: no rollback, skip, cut or recovery of the rate, no held rollback released
    at the end; alerts still go out. A resumed run decides again."""
    pol = RecoveryPolicy(RecoveryConfig(good_after=10, cooldown=0, sudden_hold=0))
    pol.promoted([SnapshotInfo(10, True)])
    s = snaps(10, 20)
    (stop,) = control(pol.plan([fire("halt", 25, ("stop",))], Progress(25, s)))
    assert stop.action == "stop"
    plans = pol.plan([fire("loss_blowup", 30, ("rollback", "alert"))], Progress(30, s))
    assert [p.action for p in plans] == ["alert"]
    assert pol.rollbacks == 0 and pol.release_held(Progress(40, s)) == []
    resumed = RecoveryPolicy(RecoveryConfig(good_after=10, cooldown=0, sudden_hold=0))
    resumed.load_state_dict(pol.state_dict())
    (p,) = control(resumed.plan([fire("loss_blowup", 50)], Progress(50, s)))
    assert p.action == "rollback"


def test_budget_cooldown_and_held_rollbacks() -> None:
    pol = RecoveryPolicy(RecoveryConfig(max_rollbacks=1, cooldown=20, good_after=5,
                                        sudden_hold=0))
    pol.promoted([SnapshotInfo(10, True)])
    s = snaps(10)
    assert control(pol.plan([fire("r", 30)], Progress(30, s)))[0].action == "rollback"
    assert control(pol.plan([fire("r", 35)], Progress(35, s))) == []   # held (cooldown)
    assert pol.held == "r"
    (stop,) = pol.release_held(Progress(40, s))
    assert stop.action == "stop" and stop.exit_status == EXIT_BUDGET
    assert "budget of 1 spent" in stop.reason


def test_no_snapshot_means_stop() -> None:
    pol = RecoveryPolicy(RecoveryConfig())
    (p,) = control(pol.plan([fire("nonfinite", 3)], Progress(3, [])))
    assert p.action == "stop" and p.exit_status == EXIT_BUDGET


def test_probation_warning_escalates_only_on_outcomes() -> None:
    pol = RecoveryPolicy(RecoveryConfig(good_after=10, cooldown=0))
    pol.promoted([SnapshotInfo(100, True)])
    s = snaps(100, 110)
    pol.plan([fire("nonfinite", 118)], Progress(120, s))
    assert control(pol.plan([fire("lr_jump", 122, ("alert",), "warning", "lr")],
                            Progress(122, s))) == []
    (p,) = control(pol.plan([fire("loss_shift", 124, ("alert",), "warning", "loss")],
                            Progress(124, s)))
    assert p.action == "rollback" and "probation after the rollback at step 120" in p.reason


def test_probe_plan_takes_the_measured_rate() -> None:
    off = RecoveryPolicy(RecoveryConfig(probe="auto"))   # the executor cannot probe
    assert not control(off.plan([fire("nonfinite", 4)], Progress(5, snaps())))[0].probe
    default = RecoveryPolicy(RecoveryConfig())          # off by default, even if it could
    default.probe_available = True
    assert not control(default.plan([fire("nonfinite", 4)], Progress(5, snaps())))[0].probe
    pol = RecoveryPolicy(RecoveryConfig(restart_warmup=10, probe="auto"))
    pol.probe_available = True
    (p,) = control(pol.plan([fire("loss_above_start", 4)], Progress(5, snaps())))
    assert p.probe and p.lr_factor == 0.1
    real = pol.probed(p, 0.03, steps=12)
    assert real.lr_factor == pytest.approx(0.03) and not real.probe
    assert "12-step range test" in real.reason
    assert pol.state.probes == 1 and pol.state.probe_steps == 12
    while pol.ramp_step() is not None:
        pass
    assert pol.lr_scale == pytest.approx(0.03)
    # no usable curve: the fixed factor stands in; a measured rate above the failed one is
    # capped at the failed rate
    pol2 = RecoveryPolicy(RecoveryConfig(restart_warmup=0, probe="auto"))
    pol2.probe_available = True
    (q,) = control(pol2.plan([fire("nonfinite", 4)], Progress(5, snaps())))
    assert pol2.probed(q, None, 15).lr_factor == 0.1 and pol2.lr_scale == pytest.approx(0.1)
    pol3 = RecoveryPolicy(RecoveryConfig(restart_warmup=0, probe="auto"))
    pol3.probe_available = True
    (r,) = control(pol3.plan([fire("nonfinite", 4)], Progress(5, snaps())))
    assert pol3.probed(r, 5.0, 15).lr_factor == 1.0


def test_first_mid_run_failure_keeps_the_fixed_factor_a_repeat_probes() -> None:
    pol = RecoveryPolicy(RecoveryConfig(good_after=10, cooldown=0, probe="auto"))
    pol.probe_available = True
    pol.promoted([SnapshotInfo(100, True)])
    s = snaps(100, 110)
    pol.plan([fire("loss_shift", 115, ("alert",), "warning")], Progress(115, s))  # not sudden
    (a,) = control(pol.plan([fire("loss_blowup", 118)], Progress(120, s)))
    (b,) = control(pol.plan([fire("loss_blowup", 124)], Progress(125, s)))
    assert not a.probe and b.probe and b.probe_from == pytest.approx(0.5)


def _script(pol: RecoveryPolicy, start: int = 0, stop: int = 400) -> list[tuple]:
    """A scripted run: snapshots every 20 steps, good 10 steps later; faults at 30 and 36
    (a restart, then a compounding one), a one-off at 250; the ramp ticks every step."""
    out = []
    for step in range(start, stop):
        held = [START] + [SnapshotInfo(s, s + 10 <= step) for s in range(20, step + 1, 20)]
        if step >= 60:
            pol.promoted([h for h in held if h.good and not h.pinned])
        events = [fire("loss_blowup", step)] if step in (30, 36, 250) else []
        plans = pol.plan(events, Progress(step, held))
        out += [(step, p.action, p.target, round(p.lr_factor, 9), p.warmup) for p in plans]
        pol.ramp_step()
        out.append(round(pol.lr_scale, 12))
    return out


def test_state_dict_resumes_exactly() -> None:
    cfg = RecoveryConfig(good_after=10, cooldown=0, restart_warmup=20, sudden_hold=0)
    whole = _script(RecoveryPolicy(cfg))
    first = RecoveryPolicy(cfg)
    part = _script(first, 0, 41)     # mid-warm-up, mid-probation, after a compounding
    resumed = RecoveryPolicy(cfg)
    resumed.load_state_dict(first.state_dict())
    assert part + _script(resumed, 41) == whole
    plans = [x for x in whole if isinstance(x, tuple)]
    # a restart, its compounding repeat, and the sudden one-off at 250: back before its onset
    # with the rate kept (nothing to recover afterwards)
    assert [x[1] for x in plans] == ["rollback", "rollback", "rollback"]
    assert plans[2][0] == 250 and plans[2][3] == 1.0 and plans[2][2] <= 240


def test_real_engine_on_a_recorded_blow_up() -> None:
    """The default rule pack's firings on a loss curve that blows up at step 40 (as a trace
    records it) become one rollback plan to the last good snapshot. The loss triples every
    step: `loss_shift` warns at step 43 and `loss_blowup` fires at 46 (`loss_collapse`, on a
    median of 5 losses for 4 steps, no longer fires at 43 with the warning), so the failure
    grew before it was critical: not sudden, and the rate is cut."""
    engine = Engine(load_pack("training"))
    pol = RecoveryPolicy(RecoveryConfig(good_after=10))
    plans: list[Plan] = []
    for step in range(1, 60):
        loss = 2.3 * math.exp(-step / 15) + 0.2 if step < 40 else 0.2 * 3 ** (step - 39)
        events = engine.update(Sample(step=step, values={"loss": loss, "lr": 0.1,
                                                         "grad_norm": 1.0}))
        held = [START] + [SnapshotInfo(s, s + 10 <= step) for s in range(10, step + 1, 10)]
        if step > 20:
            pol.promoted([h for h in held if h.good and not h.pinned])
        plans += control(pol.plan(events, Progress(step, held)))
        if plans:
            break
    (p,) = plans
    assert p.action == "rollback" and not p.restart and p.target is not None
    # a warning first: back to a good snapshot before the onset, the rate halved
    assert 20 <= p.target <= 39 and p.lr_factor == 0.5
    assert "sudden failure" not in p.reason


@pytest.mark.parametrize("groups, steps", [
    ([{"lr": 0.01, "alpha": 0.99, "centered": False, "momentum": 0}], 29),    # RMSprop
    ([{"lr": 0.01, "alpha": 0.9, "centered": True, "momentum": 0}], 3),
    ([{"lr": 1e-3, "betas": (0.9, 0.999)}], 0),                               # Adam & co.
    ([{"lr": 1e-3, "betas": (0.9, 0.99), "bias_correction": False}], 29),     # fused, uncorrected
    ([{"lr": 0.1, "momentum": 0.9, "dampening": 0}], 0),                      # SGD
    ([{"lr": 1.0, "rho": 0.9}], 3),                                           # Adadelta
    ([{"lr": 0.1, "momentum": 0.9}, {"lr": 0.01, "alpha": 0.99, "centered": False}], 29),
    ([{"lr": 0.1, "something": "else"}], 100),                                # not recognised
    ([{"lr": 0.1, "alpha": "x", "centered": False}], 100),                    # nonsense value
    ([{"lr": 1e-3, "betas": (0.9, 0.99999), "bias_correction": False}], 1000),   # held at 1,000
    ([], 100),                                                                # no groups
])
def test_auto_restart_warmup_lasts_while_uncorrected_estimates_double_the_step(
        groups: list[dict[str, Any]], steps: int) -> None:
    from lrwatch.recovery.policy import restart_warmup_for

    assert restart_warmup_for(groups) == steps
    pol = RecoveryPolicy(RecoveryConfig())            # restart_warmup="auto" by default
    pol.auto_warmup = restart_warmup_for(groups)      # what the executor does at each flush
    (p,) = control(pol.plan([fire("loss_above_start", 8)], Progress(10, snaps())))
    assert p.restart and p.lr_factor == 0.1 and p.warmup == (steps if steps > 1 else 0)
    assert pol.lr_scale == pytest.approx(0.1 / max(steps, 1))
    # an explicit number wins over the optimizer's
    pol = RecoveryPolicy(RecoveryConfig(restart_warmup=30))
    pol.auto_warmup = restart_warmup_for(groups)
    (p,) = control(pol.plan([fire("loss_above_start", 8)], Progress(10, snaps())))
    assert p.warmup == 30


def test_bad_settings_name_the_choices() -> None:
    from lrwatch.errors import ConfigError

    with pytest.raises(ConfigError, match="probe must be 'off' or 'auto'"):
        RecoveryConfig(probe="always")
    with pytest.raises(ConfigError, match="probe_steps"):
        RecoveryConfig(probe_steps=2)
    with pytest.raises(ConfigError, match='restart_warmup must be a non-negative integer or '
                                          '"auto", got \'always\''):
        RecoveryConfig(restart_warmup="always")


def test_one_nonfinite_step_in_a_healthy_run_keeps_the_rate_until_it_repeats() -> None:
    pol = RecoveryPolicy(RecoveryConfig(good_after=10, cooldown=0))
    s = snaps(100) + [SnapshotInfo(140, False)]          # 140: pending, quiet since
    nan = fire("nonfinite", 150)
    nan.value = float("nan")
    # not yet proved healthy: the ordinary path (the newest known-good state, a cut)
    fresh = RecoveryPolicy(RecoveryConfig(good_after=10))
    (p0,) = control(fresh.plan([nan], Progress(150, s)))
    assert p0.target == 100 and p0.lr_factor == 0.5
    pol.promoted([SnapshotInfo(100, True)])
    (p,) = control(pol.plan([nan], Progress(150, s)))
    assert (p.target, p.lr_factor, p.restart) == (140, 1.0, False)
    assert "sudden failure in a healthy run" in p.reason and pol.lr_scale == 1.0
    # it was the rate after all: fails again within the probation -> further back, cut
    again = fire("nonfinite", 153)
    again.value = float("inf")
    (q,) = control(pol.plan([again], Progress(155, s)))
    assert q.target == 100 and q.lr_factor == 0.25 and pol.lr_scale == 0.25


def test_a_sudden_finite_spike_goes_back_before_its_onset_and_keeps_the_rate() -> None:
    pol = RecoveryPolicy(RecoveryConfig(good_after=10, cooldown=0, sudden_hold=0))
    pol.promoted([SnapshotInfo(100, True)])
    s = snaps(100) + [SnapshotInfo(140, False), SnapshotInfo(148, False)]
    (p,) = control(pol.plan([fire("loss_blowup", 150)], Progress(150, s)))
    assert (p.target, p.lr_factor) == (140, 1.0)       # 148 is within the 10-step margin
    # after an alarm (a warning) the run is not quiet: an ordinary rollback with a cut
    pol2 = RecoveryPolicy(RecoveryConfig(good_after=10, cooldown=0, sudden_hold=0))
    pol2.promoted([SnapshotInfo(100, True)])
    pol2.plan([fire("loss_shift", 145, ("alert",), "warning")], Progress(145, s))
    (q,) = control(pol2.plan([fire("loss_blowup", 150)], Progress(150, s)))
    assert (q.target, q.lr_factor) == (100, 0.5)


def test_a_sudden_failure_replays_its_batches_but_those_of_its_window() -> None:
    s = snaps(100) + [SnapshotInfo(140, False)]
    nan = fire("nonfinite", 150)
    nan.value = float("nan")
    spike = fire("loss_blowup", 150)
    for event, drop in ((nan, (150, 150)), (spike, (141, 150))):
        pol = RecoveryPolicy(RecoveryConfig(good_after=10, cooldown=0, replay=True,
                                            sudden_hold=0))
        pol.promoted([SnapshotInfo(100, True)])
        (p,) = control(pol.plan([event], Progress(152, s)))
        assert p.target == 140 and p.replay_drop == drop
    off = RecoveryPolicy(RecoveryConfig(good_after=10, cooldown=0))   # the default: off
    off.promoted([SnapshotInfo(100, True)])
    (q,) = control(off.plan([nan], Progress(152, s)))
    assert q.target == 140 and q.replay_drop is None
    # not sudden (the run never proved healthy): new batches, as after any other rollback
    fresh = RecoveryPolicy(RecoveryConfig(good_after=10, replay=True))
    (r,) = control(fresh.plan([nan], Progress(152, s)))
    assert r.replay_drop is None


def test_the_replay_buffer_holds_what_a_rollback_can_replay_within_its_bytes() -> None:
    from lrwatch.recovery.replay import ReplayBuffer, batch_bytes

    class T:   # a tensor as the buffer sees one
        def __init__(self, n: int) -> None:
            self.n = n

        def nelement(self) -> int:
            return self.n

        def element_size(self) -> int:
            return 4

    assert batch_bytes((T(10), {"y": [T(5), "label"]})) == 60
    buf = ReplayBuffer(max_bytes=400)
    for step in range(1, 21):
        buf.hold(step, (step, T(10)), oldest_target=None)
    assert len(buf) == 10 and buf.held_bytes == 400   # the newest ten fit
    buf.hold(21, (21, T(10)), oldest_target=15)       # nothing at or before a target
    assert [b[0] for b in buf.replayable(15, (18, 19))] == [16, 17, 20, 21]
    buf.start(buf.replayable(15, (18, 19)))
    assert len(buf) == 0 and buf.pending == 4
    assert [buf.next()[1][0] for _ in range(4)] == [16, 17, 20, 21]
    assert buf.next() == (False, None)
    assert len(ReplayBuffer(0)) == 0
    off = ReplayBuffer(0)
    off.hold(1, T(1))
    assert len(off) == 0


def test_replay_settings_are_checked() -> None:
    from lrwatch.errors import ConfigError

    with pytest.raises(ConfigError, match="replay_mb"):
        RecoveryConfig(replay_mb=-1)
    with pytest.raises(ConfigError, match="replay must be"):
        RecoveryConfig(replay="yes")  # type: ignore[arg-type]


def test_a_dropped_nonfinite_gradient_rolls_nothing_back_unless_it_repeats() -> None:
    pol = RecoveryPolicy(RecoveryConfig(good_after=10, cooldown=0))
    pol.promoted([SnapshotInfo(100, True)])
    s = snaps(100, 140)
    nan = fire("nonfinite", 150, actions=("rollback", "alert"))
    nan.value = float("nan")
    plans = pol.plan([nan], Progress(150, s, dropped=[150]))
    assert [(p.action, p.step) for p in plans] == [("dropped", 150), ("alert", 150)]
    assert "not applied" in plans[0].describe(5, 0) and pol.rollbacks == 0
    # far apart (more than good_after steps): handled again
    later = fire("nonfinite", 170)
    later.value = float("nan")
    assert [p.action for p in pol.plan([later], Progress(170, s, dropped=[170]))] == ["dropped"]
    # again within good_after: a failure; the rule itself stays active over a run of NaN
    # steps and fires no more, so the request comes from the drop
    (p,) = control(pol.plan([], Progress(175, s, dropped=[174, 175])))
    assert (p.action, p.rule, p.step) == ("rollback", "dropped_again", 174)
    assert pol.rollbacks == 1 and pol.state.drops_handled == 2
    # a non-finite firing at a step that was not dropped (guard off) rolls back as before
    off = RecoveryPolicy(RecoveryConfig(good_after=10, cooldown=0, guard="off"))
    off.promoted([SnapshotInfo(100, True)])
    (q,) = control(off.plan([nan], Progress(150, s)))
    assert q.action == "rollback" and q.rule == "nonfinite"
    with pytest.raises(Exception, match="guard must be"):
        RecoveryConfig(guard="nonfinite")


def test_a_loader_that_reuses_its_buffer_turns_the_replay_off() -> None:
    from lrwatch.recovery.replay import ReplayBuffer

    class T:
        def __init__(self, ptr: int) -> None:
            self.ptr = ptr

        def nelement(self) -> int:
            return 4

        def element_size(self) -> int:
            return 4

        def data_ptr(self) -> int:
            return self.ptr

    buf = ReplayBuffer(max_bytes=1000)
    for step, ptr in enumerate((100, 200, 300), start=1):
        buf.hold(step, {"x": T(ptr)})
    assert len(buf) == 3 and not buf.reused
    buf.hold(4, {"x": T(200)})        # the memory of a batch still held, handed out again
    assert buf.reused and len(buf) == 0
    buf.hold(5, {"x": T(900)})
    assert len(buf) == 0 and buf.replayable(0, (0, 0)) == []
    # an evicted batch's memory may come back: that is no reuse
    small = ReplayBuffer(max_bytes=32)
    for step, ptr in enumerate((1, 2, 3, 1), start=1):
        small.hold(step, T(ptr))
    assert not small.reused and len(small) == 2


def test_every_firing_of_a_dropped_step_is_disarmed() -> None:
    # the step never reached the parameters: a loss rule that saw its garbage loss acts on
    # nothing
    pol = RecoveryPolicy(RecoveryConfig(good_after=10, cooldown=0))
    pol.promoted([SnapshotInfo(100, True)])
    spike = fire("loss_runaway", 150, actions=("rollback", "alert"))
    spike.value = 5e4
    plans = pol.plan([spike], Progress(150, snaps(100, 140), dropped=[150]))
    assert [p.action for p in plans] == ["dropped", "alert"] and pol.rollbacks == 0
    # a firing at another step is not
    later = fire("loss_runaway", 158)
    later.value = 5e4
    (p,) = control(pol.plan([later], Progress(160, snaps(100, 140))))
    assert p.action == "rollback"


def test_the_guard_drops_non_finite_steps_and_spikes_above_its_ratio() -> None:
    import torch

    from lrwatch.probe import GradGuard

    g = GradGuard(torch.device("cpu"), ratio=100.0, window=50, warmup=20)
    verdicts = [bool(g.bad(torch.tensor(v))) for v in [1.0] * 10 + [500.0]]
    assert verdicts[-1] is False          # fewer than 20 kept steps: no reference yet
    verdicts = [bool(g.bad(torch.tensor(v))) for v in [1.0] * 15 + [99.0, 101.0, 1.0]]
    assert verdicts[-3:] == [False, True, False]
    assert bool(g.bad(torch.tensor(float("nan")))) and bool(g.bad(torch.tensor(float("inf"))))
    # dropped norms stay out of the reference: a run of spikes does not raise it
    assert all(bool(g.bad(torch.tensor(1e4))) for _ in range(60))
    nonfinite_only = GradGuard(torch.device("cpu"), ratio=0.0)
    assert not any(bool(nonfinite_only.bad(torch.tensor(v))) for v in [1.0] * 30 + [1e9])



def test_the_auto_ratio_holds_a_spike_in_a_quiet_run_and_follows_a_spiky_one() -> None:
    """``guard_ratio="auto"``: a step is a spike above max(20, 3 x the largest ratio the run
    kept). A quiet run holds a batch 40x its median (a pointer network's poisoned batch,
    which the fixed 100 lets through); a run whose ordinary steps reach 30-50x keeps them
    (a keypoint locator's, which a fixed 30 held twice and rolled back). The device guard and
    the host guard agree step for step."""
    import random

    import torch

    from lrwatch.probe import GradGuard, HostGradGuard

    def verdicts(norms: list[float], ratio: object) -> tuple[list[bool], list[bool]]:
        dev = GradGuard(torch.device("cpu"), ratio=ratio)   # type: ignore[arg-type]
        host = HostGradGuard(ratio=ratio)                    # type: ignore[arg-type]
        return ([bool(dev.bad(torch.tensor(x))) for x in norms],
                [host.bad(x) for x in norms])

    quiet = [1.0 + 0.1 * (i % 3) for i in range(150)] + [40.0] + [1.0] * 20
    for ratio, held in (("auto", True), (100.0, False)):
        dev, host = verdicts(quiet, ratio)
        assert dev == host and dev[150] is held and sum(dev) == int(held)
    spiky = [1.0] * 30 + [12.0] + [1.0] * 30 + [35.0] + [1.0] * 30 + [50.0] + [1.0] * 10
    dev, host = verdicts(spiky, "auto")
    assert dev == host and not any(dev)
    dev, _ = verdicts(spiky, 30.0)
    assert sum(dev) == 2                     # held twice within 50 steps: a rollback
    rng = random.Random(5)                   # heavy tails, NaNs: the two guards agree
    noisy = [rng.lognormvariate(0, 1.5) if rng.random() > 0.02 else float("nan")
             for _ in range(400)]
    for ratio in ("auto", 100.0, 0.0):
        dev, host = verdicts(noisy, ratio)
        assert dev == host


def test_guard_ratio_takes_auto_and_refuses_other_text() -> None:
    from lrwatch.errors import ConfigError

    assert RecoveryConfig(guard_ratio="auto").guard_ratio == "auto"
    with pytest.raises(ConfigError, match='guard_ratio must be .* or "auto"'):
        RecoveryConfig(guard_ratio="adaptive")


def test_a_stall_cuts_the_rate_only_after_lrwatch_cut_it_for_a_failure() -> None:
    gated = {"loss_plateau": {"reduce_lr": {"after_cut": True}}}
    stall = lambda step: fire("loss_plateau", step, ("reduce_lr",), "info")  # noqa: E731
    pol = RecoveryPolicy(RecoveryConfig(), action_params=gated)
    assert control(pol.plan([stall(60)], Progress(60, snaps(50)))) == []   # a healthy run
    # a one-off fault keeps the rate (a sudden failure's rollback): still no cut
    pol.promoted([SnapshotInfo(100, True)])
    (rb,) = control(pol.plan([fire("nonfinite", 118)], Progress(120, snaps(100, 110))))
    assert rb.lr_factor == 1.0 and pol.lr_scale == 1.0
    assert control(pol.plan([stall(200)], Progress(200, snaps(100, 190)))) == []
    # a run restarted at a tenth whose loss then stalls: the cut was not enough, halve it
    pol = RecoveryPolicy(RecoveryConfig(), action_params=gated)
    (rs,) = control(pol.plan([fire("loss_above_start", 8)], Progress(10, snaps())))
    assert rs.restart and pol.lr_scale < 1
    # not while its own warm-up to the cut rate is under way
    assert control(pol.plan([stall(50)], Progress(50, snaps(40)))) == []
    while pol.ramp_step() is not None:
        pass
    before = pol.lr_scale
    (cut,) = control(pol.plan([stall(150)], Progress(150, snaps(140))))
    assert (cut.action, cut.lr_factor) == ("reduce_lr", 0.5)
    assert pol.lr_scale == pytest.approx(0.5 * before)
    assert pol.state.lr_reductions == 1


def test_a_stall_marked_unscheduled_cuts_only_a_run_without_a_scheduler() -> None:
    marked = {"loss_plateau": {"reduce_lr": {"unscheduled": True}}}
    stall = lambda step: fire("loss_plateau", step, ("reduce_lr",), "info")  # noqa: E731
    pol = RecoveryPolicy(RecoveryConfig(), action_params=marked)
    (cut,) = control(pol.plan([stall(60)], Progress(60, snaps(50))))
    assert (cut.action, cut.lr_factor, pol.lr_scale) == ("reduce_lr", 0.5, 0.5)
    # the reductions share the rollbacks' cooldown
    assert control(pol.plan([stall(70)], Progress(70, snaps(50)))) == []
    # a run with its own schedule: reported, not cut
    pol = RecoveryPolicy(RecoveryConfig(), action_params=marked)
    pol.scheduled = True
    assert control(pol.plan([stall(60)], Progress(60, snaps(50)))) == []
    assert pol.lr_scale == 1.0 and pol.state.lr_reductions == 0
    # turned off
    pol = RecoveryPolicy(RecoveryConfig(cut_unscheduled=False), action_params=marked)
    assert control(pol.plan([stall(60)], Progress(60, snaps(50)))) == []
    # an unmarked reduce_lr (the plateau_cut pack) cuts a scheduled run too
    pol = RecoveryPolicy(RecoveryConfig())
    pol.scheduled = True
    assert [p.action for p in control(pol.plan([stall(60)], Progress(60, snaps(50))))] == [
        "reduce_lr"]
    from lrwatch.errors import ConfigError
    with pytest.raises(ConfigError, match="cut_unscheduled must be true or false"):
        RecoveryConfig(cut_unscheduled="yes")  # type: ignore[arg-type]


def test_action_parameters_nobody_reads_are_rejected_and_exponents_are_numbers() -> None:
    """``{rollback: {lr_factor: 0.1}}`` and ``{alert: {receiver: pager}}`` used to pass and be
    ignored without a word; ``{reduce_lr: {factor: 5e-1}}`` (text to YAML 1.1) was refused
    although detector parameters take exponents as written."""
    from lrwatch.errors import ConfigError
    from lrwatch.recovery.policy import check_action_params
    rule = SimpleNamespace(name="r", source="f.yml:3", action_params={
        "rollback": {"lr_factor": 0.1}, "alert": {"receiver": "pager"}, "skip": {}})
    with pytest.raises(ConfigError) as info:
        check_action_params([rule])
    assert str(info.value).splitlines() == [
        "f.yml:3: rule 'r': rollback: takes no parameters, got 'lr_factor' (write it as a bare "
        "name: rollback)",
        "f.yml:3: rule 'r': alert: takes no parameters, got 'receiver' (write it as a bare "
        "name: alert)"]
    params = {"r": {"reduce_lr": {"factor": "5e-1"}}}
    check_action_params([SimpleNamespace(name="r", source="f.yml:3",
                                         action_params=params["r"])])
    pol = RecoveryPolicy(RecoveryConfig(), action_params=params)
    (p,) = control(pol.plan([fire("r", 5, ("reduce_lr",), "info")], Progress(5, snaps())))
    assert p.lr_factor == 0.5 and pol.lr_scale == 0.5
    bad = SimpleNamespace(name="r", source="f.yml:3",
                          action_params={"reduce_lr": {"factor": "5e1"}})
    with pytest.raises(ConfigError, match="factor: must be a number > 0 and < 1, got 50.0"):
        check_action_params([bad])


def test_reduce_lr_takes_its_factor_from_the_rule_and_checks_it() -> None:
    from lrwatch.errors import ConfigError
    from lrwatch.recovery.policy import check_action_params
    pol = RecoveryPolicy(RecoveryConfig(), action_params={"r": {"reduce_lr": {"factor": 0.25}}})
    (p,) = control(pol.plan([fire("r", 5, ("reduce_lr",), "info")], Progress(5, snaps())))
    assert p.lr_factor == 0.25 and pol.lr_scale == 0.25
    for params, msg in (({"factor": 1.5}, "factor: must be a number > 0 and < 1, got 1.5"),
                        ({"factor": True}, "factor: must be a number"),
                        ({"after_cut": "yes"}, "after_cut: must be true or false, got 'yes'"),
                        ({"by": 2}, "unknown parameter 'by' .valid choices: factor, after_cut")):
        rule = SimpleNamespace(name="r", source="f.yml:3", action_params={"reduce_lr": params})
        with pytest.raises(ConfigError, match=msg):
            check_action_params([rule])


def resolve(rule: str, step: int) -> Any:
    return SimpleNamespace(rule=rule, step=step, kind="resolved", actions=("rollback",),
                           severity="critical", metric="loss", since=None)


def _watching(**cfg: Any) -> tuple[RecoveryPolicy, list[SnapshotInfo]]:
    """A healthy run (good at 100; 140 pending) whose loss blows up at step 150, out of a
    quiet stretch: a sudden failure, watched (sudden_hold 5 by default)."""
    pol = RecoveryPolicy(RecoveryConfig(**{"good_after": 10, "cooldown": 0, **cfg}))
    pol.promoted([SnapshotInfo(100, True)])
    s = snaps(100) + [SnapshotInfo(140, False)]
    (w,) = control(pol.plan([fire("loss_blowup", 150)], Progress(150, s)))
    assert w.action == "watch" and w.step == 150 and "watched for 5 steps" in w.reason
    assert pol.rollbacks == 0 and pol.state.watching == "loss_blowup"
    return pol, s


def test_a_sudden_failure_that_passes_within_the_hold_is_left_alone() -> None:
    """A bad batch that reached the parameters often does no lasting harm: the rule that
    fired resolves, nothing else asks for a rollback, and the run goes on untouched."""
    pol, s = _watching()
    assert control(pol.plan([resolve("loss_blowup", 153)], Progress(154, s))) == []  # hold on
    (ok,) = control(pol.plan([], Progress(160, s)))
    assert ok.action == "recovered" and ok.step == 150 and "no rollback" in ok.reason
    assert pol.rollbacks == 0 and pol.lr_scale == 1.0 and pol.state.watching is None
    # a firing and its resolution within one flush: decided at that flush
    pol2 = RecoveryPolicy(RecoveryConfig(good_after=10, cooldown=0))
    pol2.promoted([SnapshotInfo(100, True)])
    plans = control(pol2.plan([fire("loss_blowup", 150), resolve("loss_blowup", 153)],
                              Progress(160, s)))
    assert [p.action for p in plans] == ["watch", "recovered"] and pol2.rollbacks == 0


def test_a_watched_failure_that_goes_on_rolls_back_before_its_onset() -> None:
    # still firing when the hold is over: the rollback the failure would have had at once
    pol, s = _watching()
    (p,) = control(pol.plan([], Progress(160, s)))
    assert (p.action, p.target, p.lr_factor, p.step) == ("rollback", 140, 1.0, 150)
    assert "sudden failure in a healthy run" in p.reason and pol.rollbacks == 1
    # another rule asks for a rollback meanwhile: at once, to the same snapshot
    pol, s = _watching()
    (q,) = control(pol.plan([fire("loss_runaway", 152)], Progress(152, s)))
    assert (q.action, q.target, q.lr_factor, q.step) == ("rollback", 140, 1.0, 150)
    # one of two rules that fired with it still firing: a rollback too
    pol3 = RecoveryPolicy(RecoveryConfig(good_after=10, cooldown=0))
    pol3.promoted([SnapshotInfo(100, True)])
    pol3.plan([fire("loss_blowup", 150), fire("grad_loss_divergence", 150),
               resolve("grad_loss_divergence", 151)], Progress(150, s))
    (r,) = control(pol3.plan([], Progress(160, s)))
    assert r.action == "rollback" and r.target == 140
    # and a run that ends while still failing is rolled back at close, as a held rollback is
    pol4, s = _watching()
    (h,) = pol4.release_held(Progress(152, s))
    assert h.action == "rollback"


def test_what_is_never_watched() -> None:
    s = snaps(100) + [SnapshotInfo(140, False)]
    # a non-finite value (the parameters may be gone), a run not yet proved healthy, the
    # hold turned off: the rollback comes at once
    cases = [(RecoveryConfig(good_after=10, cooldown=0), fire("nonfinite", 150), True),
             (RecoveryConfig(good_after=10, cooldown=0), fire("loss_blowup", 150), False),
             (RecoveryConfig(good_after=10, cooldown=0, sudden_hold=0),
              fire("loss_blowup", 150), True)]
    for cfg, event, healthy in cases:
        pol = RecoveryPolicy(cfg)
        if healthy:
            pol.promoted([SnapshotInfo(100, True)])
        (p,) = control(pol.plan([event], Progress(150, s)))
        assert p.action == "rollback", (cfg, event.rule, healthy)
    # after an alarm the run is not quiet: not sudden, not watched
    pol = RecoveryPolicy(RecoveryConfig(good_after=10, cooldown=0))
    pol.promoted([SnapshotInfo(100, True)])
    pol.plan([fire("loss_shift", 145, ("alert",), "warning")], Progress(145, s))
    (q,) = control(pol.plan([fire("loss_blowup", 150)], Progress(150, s)))
    assert q.action == "rollback" and q.lr_factor == 0.5
    with pytest.raises(Exception, match="sudden_hold"):
        RecoveryConfig(sudden_hold=-1)


def test_a_resume_during_the_watch_carries_it_on() -> None:
    pol, s = _watching()
    resumed = RecoveryPolicy(RecoveryConfig(good_after=10, cooldown=0))
    resumed.load_state_dict(pol.state_dict())
    (p,) = control(resumed.plan([], Progress(160, s)))
    assert p.action == "rollback" and p.target == 140 and p.step == 150
    pol, s = _watching()
    pol.plan([resolve("loss_blowup", 152)], Progress(152, s))
    resumed = RecoveryPolicy(RecoveryConfig(good_after=10, cooldown=0))
    resumed.load_state_dict(pol.state_dict())
    assert [p.action for p in control(resumed.plan([], Progress(160, s)))] == ["recovered"]


def test_a_resume_past_a_watched_failure_does_not_roll_back_to_the_resume_point() -> None:
    """Resumed at step 152, two steps into a watch, holding only its resume point (pinned):
    a rollback there would undo nothing of the failure at 150. With a snapshot from before
    it (one the checkpoint carried from ``snapshot_dir``) the rollback goes there; without
    one, the run stops and says why, and no rollback is booked."""
    pol, _ = _watching()
    for held in ([SnapshotInfo(152, True, pinned=True)],
                 [SnapshotInfo(100, True), SnapshotInfo(152, True, pinned=True)]):
        resumed = RecoveryPolicy(RecoveryConfig(good_after=10, cooldown=0))
        resumed.load_state_dict({**pol.state_dict(), "resumed_at": 152})
        (p,) = control(resumed.plan([], Progress(160, held)))
        if len(held) == 1:
            assert (p.action, p.exit_status, p.step) == ("stop", EXIT_BUDGET, 150)
            assert "resumed at step 152" in p.reason and resumed.rollbacks == 0
        else:
            assert (p.action, p.target, p.lr_factor) == ("rollback", 100, 1.0)
    # a rollback the cooldown held across the resume: the same
    pol = RecoveryPolicy(RecoveryConfig(good_after=10, cooldown=20, sudden_hold=0))
    pol.plan([fire("loss_blowup", 50, severity="warning")], Progress(50, snaps(40)))
    assert control(pol.plan([fire("loss_runaway", 60)], Progress(60, snaps(40)))) == []
    assert pol.state.held == "loss_runaway" and pol.rollbacks == 1
    resumed = RecoveryPolicy(RecoveryConfig(good_after=10, cooldown=20, sudden_hold=0))
    resumed.load_state_dict({**pol.state_dict(), "resumed_at": 62})
    (q,) = control(resumed.plan([], Progress(70, [SnapshotInfo(62, True, pinned=True)])))
    assert q.action == "stop" and resumed.rollbacks == 1 and "resumed at step 62" in q.reason
    # a run not resumed: its start (pinned, at 0) is before the failure, a restart as before
    fresh = RecoveryPolicy(RecoveryConfig(good_after=10, cooldown=0))
    (r,) = control(fresh.plan([fire("nonfinite", 5)], Progress(5, [START])))
    assert (r.action, r.target, r.restart) == ("rollback", 0, True)


def test_a_failure_that_began_before_the_resume_but_fires_after_it_still_rolls_back() -> None:
    """The resume check compares the *firing* step with the resume point, not the onset
    (``since``, which only escalations carry): an escalation whose warning began at 115,
    before the resume at 120, firing at 130, is answered from the snapshots before its onset
    where the checkpoint carried one (``_target`` looks before ``since``); holding only the
    resume point, the rollback goes there -- it undoes steps 120-130 of the failure, as the
    run that was not interrupted goes back to its start when it holds nothing before the
    onset -- instead of stopping the run as one that would undo nothing (fourteenth round:
    kept, docs/recovery.md)."""
    pol = RecoveryPolicy(RecoveryConfig(good_after=10, cooldown=0))
    pol.promoted([SnapshotInfo(100, True)])
    pol.plan([fire("loss_shift", 115, ("alert",), "warning")], Progress(115, snaps(100, 110)))
    runaway = fire("loss_runaway", 130, since=115)
    for held, target in (([SnapshotInfo(120, True, pinned=True)], 120),
                         ([SnapshotInfo(100, True), SnapshotInfo(120, True, pinned=True)], 100)):
        resumed = RecoveryPolicy(RecoveryConfig(good_after=10, cooldown=0))
        resumed.load_state_dict({**pol.state_dict(), "resumed_at": 120})
        (p,) = control(resumed.plan([runaway], Progress(130, held)))
        assert (p.action, p.target, p.step) == ("rollback", target, 130), p
        assert resumed.rollbacks == 1 and not resumed.state.stopped


def test_a_skip_that_undoes_a_watched_failure_ends_the_watch() -> None:
    """A skip during the watch back to before the failure undid it (the engine goes back
    there too, so the watched rule never resolves): the watch ends at the skip, without a
    rollback. A skip back to after the failure leaves the watch as it was."""
    pol, s = _watching()
    held = s + [SnapshotInfo(152, False)]
    plans = control(pol.plan([fire("spiky", 151, ("skip",), "warning")], Progress(151, s)))
    assert [p.action for p in plans] == ["skip", "recovered"] and plans[0].target == 140
    assert "undone by the skip to step 140" in plans[1].reason and pol.state.watching is None
    assert pol.rollbacks == 0 and control(pol.plan([], Progress(160, s))) == []
    pol, _ = _watching()
    plans = control(pol.plan([fire("spiky", 153, ("skip",), "warning")], Progress(153, held)))
    assert [p.action for p in plans] == ["skip"] and pol.state.watching == "loss_blowup"


def test_a_skip_into_a_watched_failures_window_leaves_the_watch_as_it_was() -> None:
    """The watched failure fired at 150, its ``for:`` window opened at 145 (its onset): a
    skip back to 146 restores a state inside the failure and is no undoing of it (before,
    the target was compared with the firing step, 150, and the watch ended as undone). A
    skip back to before the onset still ends it."""
    for target, undone in ((146, False), (144, True)):
        pol = RecoveryPolicy(RecoveryConfig(good_after=10, cooldown=0))
        pol.promoted([SnapshotInfo(100, True)])
        s = snaps(100) + [SnapshotInfo(target, False)]
        blowup = fire("loss_blowup", 150)
        blowup.onset = 145
        plans = control(pol.plan([blowup, fire("spiky", 150, ("skip",))], Progress(150, s)))
        assert [p.action for p in plans][:2] == ["watch", "skip"] and plans[1].target == target
        assert (plans[-1].action == "recovered") is undone, plans
        assert (pol.state.watching is None) is undone
        if not undone:   # the hold's end: still firing (the engine never saw it resolve)
            (p,) = control(pol.plan([], Progress(155, s)))
            assert (p.action, p.target, p.lr_factor) == ("rollback", 100, 1.0), p


def test_a_rollback_asked_for_during_a_watch_is_not_held_by_a_later_cut() -> None:
    """A rate cut during the watch starts a cooldown; a rollback asked for after it ends the
    watch with the watched failure's rollback, due since before the cut: at once, to the
    snapshot before the onset, the rate kept (before: held for the cooldown, then to the
    newest good snapshot, with a cut)."""
    pol, s = _watching(cooldown=20)
    (cut,) = control(pol.plan([fire("stall", 151, ("reduce_lr",), "warning")],
                              Progress(151, s)))
    assert cut.action == "reduce_lr"
    (p,) = control(pol.plan([fire("loss_runaway", 152)], Progress(152, s)))
    assert (p.action, p.rule, p.step, p.target, p.lr_factor) == (
        "rollback", "loss_blowup", 150, 140, 1.0)
    assert pol.state.held is None and pol.rollbacks == 1


def test_a_skip_or_a_cut_asked_for_beside_a_watched_failure_goes_ahead() -> None:
    """A watch is no control plan: a skip or a rate cut asked for in the flush that starts one
    is decided as in a flush without a rollback request (it was dropped, and a rule fires
    once). A skip back to before the failure undoes it: the watch ends there."""
    pol = RecoveryPolicy(RecoveryConfig(good_after=10, cooldown=0))
    pol.promoted([SnapshotInfo(100, True)])
    s = snaps(100) + [SnapshotInfo(140, False)]
    plans = control(pol.plan([fire("loss_blowup", 150), fire("spiky", 150, ("skip",))],
                             Progress(150, s)))
    assert [p.action for p in plans] == ["watch", "skip", "recovered"], plans
    assert plans[1].target == 140 and pol.skips == 1 and pol.rollbacks == 0
    pol = RecoveryPolicy(RecoveryConfig(good_after=10, cooldown=0))
    pol.promoted([SnapshotInfo(100, True)])
    plans = control(pol.plan([fire("loss_blowup", 150),
                              fire("stall", 150, ("reduce_lr",), "warning")],
                             Progress(150, s)))
    assert [p.action for p in plans] == ["watch", "reduce_lr"] and pol.lr_scale == 0.5
    assert pol.state.watching == "loss_blowup"


def _resumed_at_21(good_after: int = 5) -> RecoveryPolicy:
    """A policy resumed at step 21 of a run that proved healthy (nothing failed before)."""
    pol = RecoveryPolicy(RecoveryConfig(good_after=good_after, cooldown=0, sudden_hold=0,
                                        max_rollbacks=3))
    pol.promoted([SnapshotInfo(10, True)])
    resumed = RecoveryPolicy(RecoveryConfig(good_after=good_after, cooldown=0, sudden_hold=0,
                                            max_rollbacks=3))
    resumed.load_state_dict({**pol.state_dict(), "resumed_at": 21})
    return resumed


def test_a_for_window_under_way_at_the_resume_is_no_rollback_to_the_resume_point() -> None:
    """A ``for: 3`` rule whose condition began at step 20 (its onset), the checkpoint written
    at 21 while it was pending, firing at 22: the resume point is inside the failure, and the
    engine's state restored with it fires the rule again at once (before: rollbacks to step
    21 at 22, 23, 24 with the cut compounding, then the budget stop). Holding only the resume
    point, the run stops at once and says why, no rollback booked; holding snapshots the
    checkpoint carried (``snapshot_dir``), the rollback goes before the onset, to the one the
    run that was not interrupted takes (``sudden_margin`` before the firing, the rate kept)."""
    damaged = SimpleNamespace(**vars(fire("damaged", 22)), onset=20)
    resumed = _resumed_at_21()
    (p,) = control(resumed.plan([damaged], Progress(22, [SnapshotInfo(21, True, pinned=True)])))
    assert (p.action, p.exit_status, p.step) == ("stop", EXIT_BUDGET, 22), p
    assert "began at step 20" in p.reason and "resumed at step 21" in p.reason, p.reason
    assert "checkpoint written before step 20" in p.reason
    assert resumed.rollbacks == 0 and resumed.state.stopped
    carried = [SnapshotInfo(10, True), SnapshotInfo(12, True), SnapshotInfo(19, False),
               SnapshotInfo(21, True, pinned=True)]
    resumed = _resumed_at_21()
    (p,) = control(resumed.plan([damaged], Progress(22, carried)))
    assert (p.action, p.target, p.lr_factor) == ("rollback", 12, 1.0), p
    uninterrupted = RecoveryPolicy(RecoveryConfig(good_after=5, cooldown=0, sudden_hold=0))
    uninterrupted.promoted([SnapshotInfo(10, True)])
    (q,) = control(uninterrupted.plan([damaged], Progress(22, snaps(10, 12, 19, 21))))
    assert (q.action, q.target, q.lr_factor) == (p.action, p.target, p.lr_factor)
    # not sudden (the run never proved healthy): the newest good snapshot before the onset
    resumed = RecoveryPolicy(RecoveryConfig(good_after=5, cooldown=0, sudden_hold=0))
    resumed.load_state_dict({"resumed_at": 21})
    (r,) = control(resumed.plan([damaged], Progress(22, carried)))
    assert (r.action, r.target) == ("rollback", 12), r


_BLOCK = """version: 1
rules:
  - {name: b, metric: loss, detector: threshold, params: {above: 5}, for: 5, severity: info}
  - {name: esc, when: {firing: b}, severity: critical, actions: [rollback]}
"""


def test_an_open_window_of_a_building_block_under_an_escalation_is_an_open_failure() -> None:
    """The training pack's structure: an ``info`` rule with the ``for:`` window (no action of
    its own) under a critical ``when:`` escalation that carries the rollback. Loss 1.0 at
    steps 1-10, then 10.0: after step 13 the window of ``b`` is under way from step 11, and
    ``open_failure`` said ``None`` (it counted only rules with a control action), so a
    checkpoint there carried no snapshot from before the failure. At step 15 ``esc`` fires
    with onset 11, since 15; its rollback looked for a snapshot before 15 only and took 14,
    inside the failure. Now the open failure is 11 and the target 10."""
    eng = Engine(parse_rules(_BLOCK))
    for step in range(1, 14):
        eng.update(Sample(step=step, values={"loss": 1.0 if step <= 10 else 10.0}))
    assert eng.open_onsets() == {"b": 11}
    assert open_failure(eng.open_onsets(), eng.rules) == 11
    events = [e for step in (14, 15) for e in eng.update(Sample(step=step, values={"loss": 10.0}))]
    (esc,) = [e for e in events if e.rule == "esc"]
    assert (esc.step, esc.onset, esc.since) == (15, 11, 15)
    held = snaps(10, 12, 14)
    pol = RecoveryPolicy(RecoveryConfig(good_after=5, cooldown=0, sudden_hold=0))
    (p,) = control(pol.plan([esc], Progress(15, held)))   # never proved healthy: not sudden
    assert (p.action, p.target) == ("rollback", 10), p
    pol = RecoveryPolicy(RecoveryConfig(good_after=5, cooldown=0, sudden_hold=0,
                                        sudden_margin=2))
    pol.promoted([SnapshotInfo(5, True)])   # sudden: sudden_margin before since was 13
    (p,) = control(pol.plan([esc], Progress(15, held)))
    assert (p.action, p.target) == ("rollback", 10), p
    # resumed at 13 inside the window, holding what the checkpoint carried: before the onset
    resumed = RecoveryPolicy(RecoveryConfig(good_after=5, cooldown=0, sudden_hold=0))
    resumed.load_state_dict({"resumed_at": 13})
    carried = [START, SnapshotInfo(10, True), SnapshotInfo(13, True, pinned=True)]
    (p,) = control(resumed.plan([esc], Progress(15, carried)))
    assert (p.action, p.target) == ("rollback", 10), p
    # holding only the resume point, the escalation still rolls back there (by design:
    # test_a_failure_that_began_before_the_resume_but_fires_after_it_still_rolls_back)
    resumed = RecoveryPolicy(RecoveryConfig(good_after=5, cooldown=0, sudden_hold=0))
    resumed.load_state_dict({"resumed_at": 13})
    (p,) = control(resumed.plan([esc], Progress(15, [SnapshotInfo(13, True, pinned=True)])))
    assert (p.action, p.target) == ("rollback", 13), p


def test_a_watched_failure_goes_back_before_its_onset_at_the_end_of_the_hold() -> None:
    """An escalation of a ``for: 15`` building block fires at 34 with onset 20 (its window's
    first step) and is watched (``sudden_hold: 5``). The end of the watch made a new firing
    in the rule's name with neither ``since`` nor ``onset``, so the rollback went
    ``sudden_margin`` before 34, to 24, inside the failure. Now the watch keeps the onset (in
    the policy's state: a run resumed during the watch keeps it too) and goes back to 18."""
    esc = SimpleNamespace(**vars(fire("esc", 34, since=34)), onset=20)
    held = snaps(*range(14, 34, 2))
    cfg = dict(good_after=5, cooldown=0, sudden_hold=5)
    pol = RecoveryPolicy(RecoveryConfig(**cfg))
    pol.promoted([SnapshotInfo(10, True)])
    (w,) = control(pol.plan([esc], Progress(34, held)))
    assert w.action == "watch" and pol.state.watching_onset == 20
    resumed = RecoveryPolicy(RecoveryConfig(**cfg))
    resumed.load_state_dict({**pol.state_dict(), "resumed_at": 36})
    for p in (pol, resumed):
        (rb,) = control(p.plan([], Progress(39, held)))
        assert (rb.action, rb.target) == ("rollback", 18), rb
        assert p.state.watching is None and p.state.watching_onset is None


def test_open_failure_follows_when_references_at_any_depth() -> None:
    """A rule counts when its firing makes a control rule fire, through any number of
    ``when:`` rules; a rule named only in an ``unless`` explains a failure away and does not;
    nor does a chain that ends in notifications only."""
    rules = parse_rules("""version: 1
rules:
  - {name: a, metric: x, detector: threshold, params: {above: 1}, for: 4, severity: info}
  - {name: v, metric: y, detector: threshold, params: {above: 1}, for: 4, severity: info}
  - {name: n, metric: z, detector: threshold, params: {above: 1}, for: 4, severity: info}
  - {name: mid, when: {any: [a, n]}, severity: info}
  - {name: top, when: {all: [mid, a], within: 5, unless: [v]}, severity: critical,
     actions: [skip]}
  - {name: told, when: {firing: n}, severity: warning, actions: [alert]}
""")
    assert open_failure({"a": 7}, rules) == 7
    assert open_failure({"n": 9, "v": 3}, rules) == 9   # n feeds top through mid
    assert open_failure({"v": 3}, rules) is None
    alone = parse_rules("""version: 1
rules:
  - {name: n, metric: z, detector: threshold, params: {above: 1}, for: 4, severity: info}
  - {name: told, when: {firing: n}, severity: warning, actions: [alert]}
""")
    assert open_failure({"n": 9}, alone) is None


def test_a_firing_building_block_under_a_vetoed_escalation_is_an_open_failure() -> None:
    """``b`` fires at 15 (its window opened at 11) while a veto (``unless: [v]``, 14-18)
    holds ``esc`` back; ``esc`` fires at 19 with onset 11. At 17 no window is under way
    (``open_onsets`` is empty), and the failure is not answered yet: it began at 11. Once the
    escalation fires (its decision is the policy's), the building block no longer counts."""
    eng = Engine(parse_rules(_BLOCK.replace("when: {firing: b}", "when: {firing: b, unless: [v]}")
                             + "  - {name: v, metric: falling, detector: threshold, "
                               "params: {above: 0.5}, severity: info}\n"))
    fired = []
    for step in range(1, 20):
        vals = {"loss": 1.0 if step <= 10 else 10.0, "falling": float(14 <= step <= 18)}
        fired += [(e.rule, e.step, e.onset) for e in eng.update(Sample(step=step, values=vals))
                  if e.kind == "firing"]
        if step == 17:
            assert eng.open_onsets() == {} and eng.firing_onsets() == {"v": 14, "b": 11}
            assert open_failure(eng.open_onsets(), eng.rules) is None   # (before)
            assert open_failure(eng.open_onsets(), eng.rules, eng.firing_onsets()) == 11
    assert fired == [("v", 14, 14), ("b", 15, 11), ("esc", 19, 11)]
    assert open_failure(eng.open_onsets(), eng.rules, eng.firing_onsets()) is None


def test_the_training_packs_building_blocks_count_as_open_failures() -> None:
    """The training pack's ``for:`` windows sit on ``info`` building blocks under critical
    escalations (``loss_far_above_start``, ``for: 6``, under ``loss_above_start``;
    ``grad_vanished``, ``for: 3``, under ``vanishing_gradient``): a checkpoint inside either
    window now carries the snapshots from before it. ``loss_falling`` is only an ``unless``."""
    pack = load_pack("training")
    assert open_failure({"loss_far_above_start": 24}, pack) == 24
    assert open_failure({"grad_vanished": 30, "loss_far_above_start": 31}, pack) == 30
    assert open_failure({"loss_falling": 24}, pack) is None
    windows = [r.name for r in pack if r.for_.count > 1 or r.for_.seconds is not None]
    assert all(open_failure({n: 5}, pack) == 5 for n in windows), windows


def test_a_failure_that_began_after_the_resume_still_rolls_back_to_the_resume_point() -> None:
    """The resume point is only skipped for a failure that began at or before it: an onset
    after it (the window opened in the resumed run), an onset the firing does not carry (a
    state saved before onsets were kept), and an escalation (``since``: its cut is the
    remedy, the fourteenth round's decision pinned above) roll back to it as before."""
    resume = [SnapshotInfo(21, True, pinned=True)]
    for onset, since in ((22, None), (None, None), (18, 19)):
        event = SimpleNamespace(**vars(fire("damaged", 24, since=since)), onset=onset)
        resumed = _resumed_at_21()
        (p,) = control(resumed.plan([event], Progress(24, resume)))
        assert (p.action, p.target) == ("rollback", 21), (onset, since, p)
        assert resumed.rollbacks == 1
