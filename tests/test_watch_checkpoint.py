"""The Watcher's checkpoint (``state_dict``/``load_state_dict``, lrwatch/checkpointing.py):
the defects the thirteenth round's audit found (docs/recovery.md, "Defects found by the
thirteenth round's audit"). Real torch runs on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

import lrwatch
from lrwatch.errors import ConfigError
from lrwatch.exporters.trace import read_trace
from lrwatch.rules import load_pack, parse_rules
from lrwatch.rules.replay import replay_trace
from flag_rules import train_step


def _checkpoint(model: nn.Module, opt: torch.optim.Optimizer, w: lrwatch.Watcher) -> dict:
    """What a training script saves: the weights (copied), the optimizer, the Watcher."""
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizer": opt.state_dict(), "lrwatch": w.state_dict()}


def _resume(ckpt: dict, model: nn.Module, opt: torch.optim.Optimizer,
            w: lrwatch.Watcher) -> None:
    """A new process starting from :func:`_checkpoint` (the Watcher's state through JSON)."""
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    w.load_state_dict(json.loads(json.dumps(ckpt["lrwatch"], allow_nan=True)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 2))


_step = train_step


def test_load_state_dict_after_close_raises_and_leaves_the_trace_alone(tmp_path: Path) -> None:
    """A closed Watcher given a checkpoint opened its trace again (moving the lines it had
    written aside) and kept it open: a closed Watcher wrote again, and the Watcher built for
    the resumed run could not write the same path."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trace = tmp_path / "run.jsonl"
    w = lrwatch.Watcher(model, opt, flush_every=5, trace=trace)
    for i in range(10):
        w.log(loss=_step(model, opt, i))
    state = w.state_dict()
    w.close()
    written = trace.read_bytes()
    with pytest.raises(ConfigError, match="closed Watcher.*new Watcher"):
        w.load_state_dict(state)
    assert trace.read_bytes() == written
    assert not (tmp_path / "run.jsonl.before").exists()
    assert w.step == 10   # nothing was loaded
    w2 = lrwatch.Watcher(model, opt, flush_every=5, trace=trace)   # the resumed run's
    w2.load_state_dict(state)
    for i in range(10, 15):
        w2.log(loss=_step(model, opt, i))
    w2.close()
    assert [s.step for s in read_trace(trace)] == list(range(1, 16))
    assert w2.exporter.internal_errors._value.get() == 0
    json.dumps(state, allow_nan=True)   # (what the HF callback writes)


# --- a checkpoint written after a failure, before the flush that judges it -------------------

_REC = {"guard": "off", "good_after": 5, "min_interval": 5, "max_interval": 5, "cooldown": 0}


def _bombed_step(model: nn.Module, opt: torch.optim.Optimizer, i: int, bomb: bool
                 ) -> torch.Tensor:
    """A training step; ``bomb``: this one step runs at 3000x the rate (finite, ruined
    weights: the loss goes from 0.7 to about 18 and stays up)."""
    scale = 3000.0 if bomb else 1.0
    for group in opt.param_groups:
        group["lr"] *= scale
    try:
        return _step(model, opt, i)
    finally:
        for group in opt.param_groups:
            group["lr"] /= scale


def _bomb_run(trace: Path, rec: dict, *, checkpoint_at: int | None = None,
              resume: dict | None = None, until: int = 60, flush_lag: int = 0,
              bomb_at: int = 23) -> tuple[dict | None, lrwatch.Watcher]:
    """flush_every=5, the rate bomb at step ``bomb_at``; ``checkpoint_at``: keep what a script
    saves right after that step (at 24: before the flush at 25 judges 21-24); ``resume``: a
    new process (model, optimizer, Watcher) starts from such a checkpoint."""
    def step(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> torch.Tensor:
        return _bombed_step(model, opt, i, bomb=i + 1 == bomb_at and resume is None)

    return _checkpointed_run(trace, rec, step, checkpoint_at, resume, until, flush_lag)


def _checkpointed_run(trace: Path, rec: dict, step: Callable[..., torch.Tensor],
                      checkpoint_at: int | None, resume: dict | None, until: int,
                      flush_lag: int) -> tuple[dict | None, lrwatch.Watcher]:
    """The run of :func:`_bomb_run` and :func:`_ruin_run`: ``step(model, opt, i)`` trains
    step ``i`` and gives its loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    w = lrwatch.Watcher(model, opt, flush_every=5, trace=trace, recovery=rec,
                        flush_lag=flush_lag)
    if resume is not None:
        _resume(resume, model, opt, w)
    ckpt = None
    while w.step < until and not w.should_stop:
        w.log(loss=step(model, opt, w.step))
        if w.step == checkpoint_at and ckpt is None:
            ckpt = _checkpoint(model, opt, w)
    w.close()
    return ckpt, w


def _events(trace: Path, *types: str) -> list[dict]:
    return [{**e, "line": s.step} for s in read_trace(trace) for e in s.events
            if e.get("type") in types]


@pytest.mark.parametrize("flush_lag", [0, 1])
def test_a_checkpoint_before_the_flush_carries_the_failure_it_had_not_judged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, flush_lag: int) -> None:
    """The checkpoint of step 24 was written after the bomb (step 23) and before the flush
    at 25: it held no record of the failure (the detectors' state of step 20). The resumed
    run saw the loss high from its first step and rolled back to its resume point, the
    ruined state, five times (the cut compounding), then stopped on a spent budget. Now the
    checkpoint carries steps 21-24, the resumed run judges them first, and its resumed state
    (out of a failure) is no rollback target: it stops at once and says why. With
    ``flush_lag=1`` the checkpoint of step 25 carries the flush in flight (21-25)."""
    trace = tmp_path / "run.jsonl"
    at = 24 + flush_lag
    ckpt, _ = _bomb_run(trace, _REC, checkpoint_at=at, until=26, flush_lag=flush_lag)
    assert ckpt is not None
    assert [r["step"] for r in ckpt["lrwatch"]["unjudged"]] == list(range(21, at + 1))
    _, w = _bomb_run(trace, _REC, resume=ckpt, flush_lag=flush_lag)   # (the trace goes on)
    assert not _events(trace, "rollback"), _events(trace, "rollback")
    assert w.should_stop and w.exit_status == 4
    assert "not known good" in caplog.text and f"steps 21-{at}" in caplog.text
    samples = read_trace(trace)
    assert [s.step for s in samples] == list(range(1, w.step + 1))
    assert samples[at].events[0]["type"] == "resume"   # after 21-24(25) were judged
    live = [(e["rule"], e["step"], e["severity"]) for s in samples for e in s.events
            if e.get("type") == "firing"]
    replayed = replay_trace(trace, load_pack("training"))
    assert replayed.error is None
    assert [(f.rule, f.step, f.severity) for f in replayed.firings] == live


def test_a_checkpoint_before_the_flush_rolls_back_before_the_failure_from_snapshot_dir(
        tmp_path: Path) -> None:
    """The same with snapshots on disk: the checkpoint names those from before the steps it
    had not judged, and the resumed run goes back before the bomb, as the run that was not
    interrupted does, and recovers."""
    rec = {**_REC, "snapshot_dir": str(tmp_path / "snaps")}
    ckpt, _ = _bomb_run(tmp_path / "a.jsonl", rec, checkpoint_at=24, until=26)
    trace = tmp_path / "b.jsonl"
    _, w = _bomb_run(trace, rec, resume=ckpt)
    (rb,) = _events(trace, "rollback")
    assert rb["to_step"] < 23, rb
    assert w.policy.rollbacks == 1 and not w.should_stop and w.step == 60


def test_a_resume_after_a_change_of_directory_continues_the_same_trace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trace given as a relative path, and a process that changed directory before it
    resumed from a checkpoint: the trace was opened again relative to the new directory, so
    the resumed steps went to a second file there without the steps before the checkpoint,
    and the first kept the abandoned ones (fourteenth round's audit, docs/design.md)."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    monkeypatch.chdir(first)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = lrwatch.Watcher(model, opt, trace="run.jsonl", flush_every=1)

    def train(n: int) -> None:
        for _ in range(n):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss)

    train(5)
    checkpoint = w.state_dict()
    train(5)
    monkeypatch.chdir(second)
    w.load_state_dict(checkpoint)
    train(3)
    w.close()
    assert not (second / "run.jsonl").exists()
    assert [s.step for s in read_trace(first / "run.jsonl")] == list(range(1, 9))


# --- a checkpoint written while a rule's for: window is under way ----------------------------

_DAMAGE_RULES = """version: 1
rules:
  - name: damaged
    metric: damage
    detector: threshold
    params: {above: 0.5}
    for: 3
    severity: critical
    actions: [rollback]
    annotations: {summary: "damaged at step {step}", description: "test rule"}
"""
_WINDOW_REC = {"guard": "off", "sudden_hold": 0, "max_rollbacks": 3, "good_after": 5,
               "min_interval": 2, "max_interval": 2, "cooldown": 0}


def _damage_run(tmp: Path, name: str, rec: dict, *, checkpoint_at: int | None = None,
                resume: dict | None = None, until: int = 40, rules_text: str = _DAMAGE_RULES,
                veto: tuple[int, int] = (0, -1)) -> tuple[dict | None, lrwatch.Watcher, Path]:
    """flush_every=1; before step 20 of the first run the model is damaged (a buffer the
    snapshots carry, logged as ``damage``): the ``for: 3`` rule's window opens at 20 and it
    fires at 22 (``rules_text``: other rules on ``damage``, and on ``falling``, 1 at the steps
    in ``veto``). A rollback to a state from before 20 undoes the damage; one to a later
    state restores it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 2))
    model.register_buffer("damage", torch.zeros(()))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rules = tmp / "damage.yml"
    rules.write_text(rules_text)
    trace = tmp / f"{name}.jsonl"
    w = lrwatch.Watcher(model, opt, flush_every=1, trace=trace, recovery=rec, rules=str(rules))
    if resume is not None:
        _resume(resume, model, opt, w)
    ckpt = None
    while w.step < until and not w.should_stop:
        i = w.step
        if i + 1 == 20 and resume is None:
            model.damage.fill_(1.0)
        w.log(loss=_step(model, opt, i), damage=model.damage.item(),
              falling=float(veto[0] <= i + 1 <= veto[1]))
        if w.step == checkpoint_at and ckpt is None:
            ckpt = _checkpoint(model, opt, w)
    w.close()
    return ckpt, w, trace


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_checkpoint_inside_a_for_window_does_not_roll_back_to_itself(
        tmp_path: Path, on_disk: bool, caplog: pytest.LogCaptureFixture) -> None:
    """The failure began at step 20 (the rule's window opened), the checkpoint was written at
    21 while the window was under way, the rule fired at 22. The run that was not interrupted
    rolls back once, to step 12 (``sudden_margin`` before the firing), and goes on. The run
    resumed at 21 rolled back to its resume point at 22, 23 and 24 (x1, x0.25, x0.125: the
    damage and the window came back with it) and stopped on a spent budget (docs/recovery.md,
    fourteenth round). Now the firing carries its onset (20): with ``snapshot_dir`` the
    checkpoint carries the snapshots from before it and the resumed run rolls back to the same
    step as the run that was not interrupted, and recovers; without, it stops at 22 and says
    why, no rollback spent."""
    rec = {**_WINDOW_REC, **({"snapshot_dir": str(tmp_path / "snaps")} if on_disk else {})}
    _, whole, trace = _damage_run(tmp_path, "whole", rec)
    assert [(e["line"], e["to_step"], e["lr_factor"]) for e in _events(trace, "rollback")] \
        == [(22, 12, 1.0)]
    assert whole.step == 40 and not whole.should_stop
    ckpt, _, _ = _damage_run(tmp_path, "first", rec, checkpoint_at=21, until=21)
    assert ckpt is not None and ckpt["lrwatch"]["engine"]["rules"]["damaged"]["pending"] == 2
    _, w, trace = _damage_run(tmp_path, "first", rec, resume=ckpt)   # (the trace goes on)
    rollbacks = [(e["line"], e["to_step"], e["lr_factor"]) for e in _events(trace, "rollback")]
    if on_disk:
        assert rollbacks == [(22, 12, 1.0)]
        assert w.step == 40 and not w.should_stop and w.policy.rollbacks == 1
    else:
        assert rollbacks == []
        (stop,) = _events(trace, "stop")
        assert stop["line"] == 22 and "began at step 20" in stop["reason"], stop
        assert w.should_stop and w.exit_status == 4 and w.policy.rollbacks == 0
        # The resume point is inside the failure: not restored, and not called known good.
        said = [r.getMessage() for r in caplog.records if "stopping the run" in r.getMessage()]
        assert said and not any("known-good" in m for m in said), said
    live = [(e["rule"], e["step"]) for e in _events(trace, "firing")]
    replayed = replay_trace(trace, parse_rules(_DAMAGE_RULES))
    assert replayed.error is None
    assert [(f.rule, f.step) for f in replayed.firings] == live


# An info building block with the for: window, under a critical escalation that carries the
# action (the structure of the training pack: loss_far_above_start, for: 6, under
# loss_above_start).
_BLOCK_RULES = """version: 1
rules:
  - name: damage_seen
    metric: damage
    detector: threshold
    params: {above: 0.5}
    for: FOR
    severity: info
    annotations: {summary: "damage at step {step}", description: "building block"}
  - name: damaged
    when: {firing: damage_seen}
    severity: critical
    actions: [rollback]
    annotations: {summary: "damaged at step {step}", description: "test escalation"}
"""


@pytest.mark.parametrize("window,keep,checkpoint_at,hold,block", [
    (5, 3, 21, 0, True), (5, 3, 23, 0, True), (15, 12, 22, 0, True), (15, 12, 30, 0, True),
    (15, 12, 22, 5, True), (15, 12, 36, 5, True), (15, 12, 22, 0, False),
    (15, 12, 22, 5, False), (15, 3, 30, 0, True), (15, 3, 22, 5, True), (15, 3, 30, 5, False)])
def test_a_checkpoint_inside_a_building_blocks_window_rolls_back_as_the_whole_run(
        tmp_path: Path, window: int, keep: int, checkpoint_at: int, hold: int,
        block: bool) -> None:
    """The damage at step 20 opens the window of an ``info`` rule (``for: window``) that a
    critical ``when:`` escalation turns into a rollback. A checkpoint written inside the window
    carried no snapshot from before it (only rules with a control action of their own counted
    as an open failure), and the resumed run restarted from its resume point, inside the
    failure, until the budget ran out. And the escalation's target was looked for before the
    step its building block *fired* (``since``), not before the window's first step
    (``onset``): with a window longer than ``sudden_margin`` the run that was not interrupted
    went back to step 24, inside the failure, and so did a failure watched first
    (``sudden_hold: 5``, the default: the watch's end forgot the onset), a checkpoint written
    during the watch (at 36) too, and a critical rule with the window itself (``block``
    False). Now both go back to the same snapshot, before the onset, and the runs
    recover. With the default ``keep: 3`` (sixteenth round) the window outlasted the
    snapshots from before its onset (promoted and trimmed while it was under way): the run
    that was not interrupted went back to its start, step 0, and the run resumed at 30
    carried nothing from before the onset and stopped; now the store keeps the newest
    known-good snapshot before an open onset."""
    rules = (_BLOCK_RULES if block else _DAMAGE_RULES.replace("for: 3", "for: FOR")).replace(
        "FOR", str(window))
    fired = 20 + window - 1
    rec = {**_WINDOW_REC, "keep": keep, "sudden_hold": hold,
           "snapshot_dir": str(tmp_path / "snaps")}
    _, whole, trace = _damage_run(tmp_path, "whole", rec, rules_text=rules)
    (rb,) = [(e["line"], e["to_step"], e["lr_factor"]) for e in _events(trace, "rollback")]
    assert rb[0] == fired + hold and 14 <= rb[1] < 20, rb   # just before the onset
    assert whole.step == 40 and not whole.should_stop
    ckpt, w, _ = _damage_run(tmp_path, "first", rec, checkpoint_at=checkpoint_at,
                             until=checkpoint_at, rules_text=rules)
    carried = [c["step"] for c in ckpt["lrwatch"]["before_failure"]] if ckpt else []
    assert carried and min(carried) < 20, carried
    if checkpoint_at < fired:   # inside the window: only what came before it
        opened = {"damage_seen" if block else "damaged": 20}
        assert w.engine.open_onsets() == opened and max(carried) < 20, carried
    _, w, trace = _damage_run(tmp_path, "first", rec, resume=ckpt, rules_text=rules)
    # (a first run that ends during the watch rolls back at its close(), at 36)
    rollbacks = [(e["line"], e["to_step"], e["lr_factor"]) for e in _events(trace, "rollback")
                 if e["line"] > checkpoint_at]
    assert rollbacks == [rb], (rollbacks, rb)
    assert w.step == 40 and not w.should_stop and w.policy.rollbacks == 1
    live = [(e["rule"], e["step"]) for e in _events(trace, "firing")]
    replayed = replay_trace(trace, parse_rules(rules))
    assert replayed.error is None
    assert [(f.rule, f.step) for f in replayed.firings] == live


def test_a_checkpoint_while_a_veto_holds_an_escalation_back_rolls_back_as_the_whole_run(
        tmp_path: Path) -> None:
    """The building block fires at 24 (its window opened at 20), a veto (``unless``, as
    ``loss_falling`` holds back ``loss_above_start``) holds the escalation back over 22-28,
    the checkpoint is written at 26, and the escalation fires at 29 with onset 20. No window
    was under way at 26, so the checkpoint carried nothing, and the resumed run restarted from
    its resume point, inside the failure, at 29, 30 and 31 (x0.1, x0.05, x0.025), then stopped
    on a spent budget; the run that was not interrupted went back to step 14. Now a firing
    building block under a control rule that is not firing counts as an open failure."""
    rules = _BLOCK_RULES.replace("FOR", "5").replace("when: {firing: damage_seen}", (
        "when: {firing: damage_seen, unless: [damage_falling]}")) + """
  - name: damage_falling
    metric: falling
    detector: threshold
    params: {above: 0.5}
    severity: info
    annotations: {summary: "falling at step {step}", description: "the veto"}
"""
    rec = {**_WINDOW_REC, "snapshot_dir": str(tmp_path / "snaps")}
    _, whole, trace = _damage_run(tmp_path, "whole", rec, rules_text=rules, veto=(22, 28))
    (rb,) = [(e["line"], e["to_step"], e["lr_factor"]) for e in _events(trace, "rollback")]
    assert rb[0] == 29 and rb[1] < 20, rb
    ckpt, w, _ = _damage_run(tmp_path, "first", rec, checkpoint_at=26, until=26,
                             rules_text=rules, veto=(22, 28))
    assert ckpt is not None and w.engine.open_onsets() == {}
    carried = [c["step"] for c in ckpt["lrwatch"]["before_failure"]]
    assert carried and max(carried) < 20, carried
    _, w, trace = _damage_run(tmp_path, "first", rec, resume=ckpt, rules_text=rules,
                              veto=(22, 28))
    rollbacks = [(e["line"], e["to_step"], e["lr_factor"]) for e in _events(trace, "rollback")]
    assert rollbacks == [rb], (rollbacks, rb)
    assert w.step == 40 and not w.should_stop and w.policy.rollbacks == 1


@pytest.mark.parametrize("flush_lag", [0, 1])
def test_a_checkpoint_right_after_the_flush_of_a_failure_is_no_known_good_start(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, flush_lag: int) -> None:
    """The rate bomb in step 25, the checkpoint of step 25: the loss shows the ruined weights
    from step 26 on, in the resumed run. With ``flush_lag=1`` the flush of 21-25 is in flight
    and goes with the checkpoint unjudged (the rate rules fire on it: the resumed state is
    not known good, and the run stops at the first rollback). With ``flush_lag=0`` it was
    judged right before the checkpoint, the resumed state counted as known good, and the
    resumed run rolled back to it five times (x0.5 ... x0.03), to the ruined weights, then
    stopped on a spent budget. Now the rules that fired on that flush go with the checkpoint
    and the resumed run is the same with either lag; with ``snapshot_dir`` it goes back
    before the bomb, as the run that was not interrupted does, and recovers."""
    trace = tmp_path / "run.jsonl"
    ckpt, _ = _bomb_run(trace, _REC, checkpoint_at=25, until=25, flush_lag=flush_lag,
                        bomb_at=25)
    assert ckpt is not None
    _, w = _bomb_run(trace, _REC, resume=ckpt, flush_lag=flush_lag, bomb_at=25)
    assert not _events(trace, "rollback"), _events(trace, "rollback")
    assert w.should_stop and w.exit_status == 4
    assert "not known good" in caplog.text and "steps 21-25" in caplog.text
    live = [(e["rule"], e["step"], e["severity"]) for e in _events(trace, "firing")]
    replayed = replay_trace(trace, load_pack("training"))
    assert replayed.error is None
    assert [(f.rule, f.step, f.severity) for f in replayed.firings] == live
    rec = {**_REC, "snapshot_dir": str(tmp_path / "snaps")}
    _, whole = _bomb_run(tmp_path / "whole.jsonl", {**rec, "snapshot_dir": str(tmp_path / "w")},
                         flush_lag=flush_lag, bomb_at=25)
    (first,) = _events(tmp_path / "whole.jsonl", "rollback")
    ckpt, _ = _bomb_run(tmp_path / "a.jsonl", rec, checkpoint_at=25, until=25,
                        flush_lag=flush_lag, bomb_at=25)
    _, w = _bomb_run(tmp_path / "b.jsonl", rec, resume=ckpt, flush_lag=flush_lag, bomb_at=25)
    (rb,) = _events(tmp_path / "b.jsonl", "rollback")
    assert rb["to_step"] == first["to_step"] < 25, (rb, first)
    assert w.policy.rollbacks == 1 and not w.should_stop and w.step == 60


# --- a skip back into a watched failure's for: window (sixteenth round's audit) --------------

def test_a_skip_into_a_watched_failures_window_does_not_end_the_watch(tmp_path: Path) -> None:
    """The ``for: 3`` window opens at 20 (the damage), the rule fires at 22 and is watched
    (``sudden_hold: 5``); a ``skip`` asked for in the same flush goes back to step 21, inside
    the window. The policy compared the skip's target with the step the rule *fired* at (22),
    not its onset (20): it ended the watch as "undone by the skip", the restored window fired
    the rule again at 23, no longer out of a quiet stretch, and the run rolled back with a
    cut (x0.5) it owes to no rate. Now the watch goes on: the rule firing again at 23 ends it
    with the watched failure's rollback, to a snapshot before the onset, the rate kept."""
    rules = _DAMAGE_RULES + """  - name: glitch
    metric: falling
    detector: threshold
    params: {above: 0.5}
    severity: warning
    actions: [skip]
    annotations: {summary: "glitch at step {step}", description: "test skip"}
"""
    rec = {**_WINDOW_REC, "sudden_hold": 5, "keep": 12, "min_interval": 1, "max_interval": 1}
    _, w, trace = _damage_run(tmp_path, "run", rec, rules_text=rules, veto=(22, 22))
    (skip,) = _events(trace, "skip")
    assert skip["line"] == 22 and 20 <= skip["to_step"] < 22, skip
    assert not _events(trace, "recovered"), _events(trace, "recovered")
    (rb,) = [(e["line"], e["to_step"], e["lr_factor"]) for e in _events(trace, "rollback")]
    assert rb[0] == 23 and rb[1] < 20 and rb[2] == 1.0, rb   # (it fired again: at once)
    assert w.step == 40 and not w.should_stop and w.policy.rollbacks == 1


# --- a failure in the checkpoint's own last update (sixteenth round's audit) ----------------

def _ruin_run(trace: Path, rec: dict, *, checkpoint_at: int | None = None,
              resume: dict | None = None, until: int = 60, flush_lag: int = 0
              ) -> tuple[dict | None, lrwatch.Watcher]:
    """flush_every=5; after step 25's update (its loss measured, no rate signal) the weights
    are ruined: only the samples from step 26 on show it. ``checkpoint_at``, ``resume``: as
    in :func:`_bomb_run`."""
    def step(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> torch.Tensor:
        loss = _step(model, opt, i)
        if i + 1 == 25 and resume is None:
            g = torch.Generator().manual_seed(7)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 3)
        return loss

    return _checkpointed_run(trace, rec, step, checkpoint_at, resume, until, flush_lag)


@pytest.mark.parametrize("flush_lag", [0, 1])
@pytest.mark.parametrize("on_disk", [False, True])
def test_a_failure_in_the_checkpoints_last_update_does_not_loop_back_to_the_resume_point(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, flush_lag: int,
        on_disk: bool) -> None:
    """The weights are ruined by step 25's update, after its loss was measured, and the
    checkpoint is written at 25: no rule sees it before the checkpoint. The run that was not
    interrupted rolls back once, to step 15, and recovers. The resumed run rolled back to its
    resume point, the ruined weights, five times (x1, x0.25 ... x0.03) until the budget was
    spent. Now with ``snapshot_dir`` the checkpoint carries the snapshots on disk from before
    its step, and the resumed run goes back to step 15 as the whole run does; without, it
    tries its resume point once (a bad batch after it would be undone so) and, failing again
    before getting past it, stops and says why (exit status 4)."""
    rec = {**_REC, **({"snapshot_dir": str(tmp_path / "snaps")} if on_disk else {})}
    _, whole = _ruin_run(tmp_path / "whole.jsonl",
                         {**rec, **({"snapshot_dir": str(tmp_path / "w")} if on_disk else {})},
                         flush_lag=flush_lag)
    (first,) = _events(tmp_path / "whole.jsonl", "rollback")
    assert first["to_step"] < 25 and whole.step == 60 and not whole.should_stop, first
    ckpt, _ = _ruin_run(tmp_path / "a.jsonl", rec, checkpoint_at=25, until=25,
                        flush_lag=flush_lag)
    assert ckpt is not None and not ckpt["lrwatch"]["fired_late"]
    trace = tmp_path / "b.jsonl"
    _, w = _ruin_run(trace, rec, resume=ckpt, flush_lag=flush_lag)
    rollbacks = [(e["to_step"], e["lr_factor"]) for e in _events(trace, "rollback")]
    if on_disk:
        assert rollbacks == [(first["to_step"], first["lr_factor"])], rollbacks
        assert w.step == 60 and not w.should_stop and w.policy.rollbacks == 1
        return
    assert rollbacks == [(25, 1.0)], rollbacks
    (stop,) = _events(trace, "stop")
    assert "resumed at (25)" in stop["reason"] and "before step 25" in stop["reason"], stop
    assert w.should_stop and w.exit_status == 4 and w.policy.rollbacks == 1
    said = [r.getMessage() for r in caplog.records if "stopping the run" in r.getMessage()]
    assert said and not any("known-good" in m for m in said), said


@pytest.mark.parametrize("flush_lag", [0, 1])
@pytest.mark.parametrize("on_disk", [False, True])
def test_a_never_healthy_resumed_run_does_not_restart_at_its_resume_point_again_and_again(
        tmp_path: Path, flush_lag: int, on_disk: bool) -> None:
    """The run of the test above with ``good_after: 30``: nothing proved good by the
    checkpoint at 25. The run that was not interrupted restarts from step 0 at x0.1 and
    recovers. The resumed run restarted from its resume point, the ruined weights, at 30, 35,
    40, 45 and 50 (x0.1 down to x0.006) and stopped on the spent budget. Now, without
    ``snapshot_dir``, its restart failing again before getting past where the run failed
    (where the cut would compound) stops the run (exit status 4) and says to resume from an
    earlier checkpoint, keep snapshots on disk, or lower the rate. With ``snapshot_dir`` the
    checkpoint carries the run's start, but the resumed Watcher's own start (step 0, taken
    before the checkpoint is loaded) overwrote its file and deleted it when the resumed state
    replaced it: the stop said to use ``snapshot_dir``. The start's file is now the store's
    own, and the second restart goes to the carried step 0; the run recovers."""
    rec = {**_REC, "good_after": 30,
           **({"snapshot_dir": str(tmp_path / "snaps")} if on_disk else {})}
    _, whole = _ruin_run(tmp_path / "whole.jsonl",
                         {**rec, **({"snapshot_dir": str(tmp_path / "w")} if on_disk else {})},
                         flush_lag=flush_lag)
    (first,) = _events(tmp_path / "whole.jsonl", "rollback")
    assert (first["to_step"], first["lr_factor"]) == (0, 0.1), first
    assert whole.step == 60 and not whole.should_stop
    ckpt, _ = _ruin_run(tmp_path / "a.jsonl", rec, checkpoint_at=25, until=25,
                        flush_lag=flush_lag)
    assert ckpt is not None
    trace = tmp_path / "b.jsonl"
    _, w = _ruin_run(trace, rec, resume=ckpt, flush_lag=flush_lag)
    rollbacks = [(e["to_step"], round(e["lr_factor"], 3)) for e in _events(trace, "rollback")]
    if on_disk:
        assert rollbacks[0] == (25, 0.1) and rollbacks[1][0] == 0, rollbacks
        assert w.step == 60 and not w.should_stop, rollbacks
        return
    assert rollbacks == [(25, 0.1)], rollbacks
    (stop,) = _events(trace, "stop")
    assert "resumed at (25)" in stop["reason"] and "before step 25" in stop["reason"], stop
    assert "snapshot_dir" in stop["reason"], stop
    assert "never proved healthy" in stop["reason"] and "lower learning rate" in stop["reason"]
    assert w.should_stop and w.exit_status == 4 and w.policy.rollbacks == 1


# --- the skip counter (seventeenth round's audit) ---------------------------------------------

def _skip_run(tmp_path: Path, resume: dict | None = None) -> tuple[dict, lrwatch.Watcher]:
    """flush_every=1, a rule that rolls back while the logged ``poison`` flag is up (batch
    12, once), ``skip_batches=3``; the checkpoint is kept at step 20 (the skip behind it);
    ``resume``: a new Watcher starts from such a checkpoint and trains to step 25."""
    from flag_rules import flag_rule, write_flag_rules
    tmp_path.mkdir()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rules = write_flag_rules(tmp_path / "poison.yml", flag_rule("poison", "poison"))
    w = lrwatch.Watcher(model, opt, flush_every=1, trace=tmp_path / "run.jsonl", rules=rules,
                        recovery={"skip_batches": 3, "good_after": 3, "min_interval": 3,
                                  "cooldown": 0, "sudden_hold": 0})
    if resume is not None:
        _resume(resume, model, opt, w)
    ckpt: dict = {}
    for b in w.batches(range(w.data_position, 100)):
        w.log(loss=_step(model, opt, b), poison=float(b == 12 and resume is None))
        if w.step == 20 and not ckpt:
            ckpt = _checkpoint(model, opt, w)
        if w.step >= 25:
            break
    w.close()
    return ckpt, w


def test_a_resumed_watcher_keeps_the_count_of_batches_skipped(tmp_path: Path) -> None:
    """``skipped_batches`` was not in the checkpoint: a resumed Watcher counted from 0 (in
    one process too) while ``data_position`` was restored. A checkpoint from before it
    carries no count and still loads (counting from 0, as before)."""
    ckpt, whole = _skip_run(tmp_path / "whole")
    assert whole.policy.rollbacks == 1 and whole.skipped_batches == 3
    assert ckpt["lrwatch"]["skipped_batches"] == 3
    _, resumed = _skip_run(tmp_path / "resumed", resume=ckpt)
    assert resumed.skipped_batches == 3, resumed.skipped_batches
    assert resumed.data_position == whole.data_position and resumed.step == 25
    old = {**ckpt, "lrwatch": {k: v for k, v in ckpt["lrwatch"].items()
                               if k != "skipped_batches"}}
    _, from_old = _skip_run(tmp_path / "old", resume=old)
    assert from_old.skipped_batches == 0 and from_old.data_position == whole.data_position
