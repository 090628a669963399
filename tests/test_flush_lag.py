"""``flush_lag=1``: a due flush is queued at one step and judged at the next (the default on CUDA,
where the host must not wait for the device while the rules run; lrwatch/flushing.py). On the
CPU the copy is immediate, so these tests check the bookkeeping: the same samples, judged one
step later, decisions one step later, nothing judged twice or lost."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lrwatch
from lrwatch.exporters.trace import read_trace
from lrwatch.rules import load_pack
from lrwatch.rules.replay import replay_trace
from lrwatch.samples import Sample

KEYS = ("loss", "grad_norm", "lr", "nonfinite_grad")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 2))


def _data(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(16, 6, generator=g), torch.randint(0, 2, (16,), generator=g)


def _step(model: nn.Module, opt: torch.optim.Optimizer, i: int, nan: bool = False) -> torch.Tensor:
    x, y = _data(i)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    if nan:
        loss = loss * float("nan")
    loss.backward()
    opt.step()
    return loss.detach()


def test_flush_lag_defaults_to_the_device_and_refuses_other_values() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert lrwatch.Watcher(model, opt).flush_lag == 0          # steps recorded on the CPU
    assert lrwatch.Watcher(model, opt, flush_lag=1).flush_lag == 1
    for bad in (2, -1, True, "1", 0.5):
        with pytest.raises(ValueError, match="flush_lag must be 0, 1 or None"):
            lrwatch.Watcher(model, opt, flush_lag=bad)   # type: ignore[arg-type]


def test_a_lagged_flush_hands_over_the_same_samples_one_step_later() -> None:
    runs: dict[int, list[list[Sample]]] = {}
    for lag in (0, 1):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        got: list[Sample] = []
        seen_after: list[list[Sample]] = []
        w = lrwatch.Watcher(model, opt, flush_every=5, flush_lag=lag, listeners=[got.append])
        for i in range(23):
            w.log(loss=_step(model, opt, i))
            seen_after.append(list(got))
        assert not w.flush_in_flight   # 23 steps: the last copy (steps 16-20) landed at step 21
        w.close()
        seen_after.append(list(got))
        runs[lag] = seen_after
    now, lagged = runs[0], runs[1]
    # after step 5 the direct flush has judged steps 1-5; the lagged one has them after step 6
    assert [s.step for s in now[4]] == [1, 2, 3, 4, 5] and lagged[4] == []
    assert [s.step for s in lagged[5]] == [1, 2, 3, 4, 5]
    for k in range(22):
        assert len(lagged[k + 1]) == len(now[k])
    final_now, final_lag = now[-1], lagged[-1]
    assert [s.step for s in final_lag] == [s.step for s in final_now] == list(range(1, 24))
    for a, b in zip(final_now, final_lag):
        assert {k: a.values[k] for k in KEYS} == {k: b.values[k] for k in KEYS}


def test_an_explicit_flush_lands_the_copy_in_flight_and_state_dict_does_not() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    got: list[Sample] = []
    w = lrwatch.Watcher(model, opt, flush_every=4, flush_lag=1, listeners=[got.append])
    for i in range(4):
        w.log(loss=_step(model, opt, i))
    assert w.flush_in_flight and got == []
    # no landing (it could plan a rollback the checkpoint would not carry out, and under
    # torch.distributed it would need every rank): the state is the last judged flush's
    state = w.state_dict()
    assert w.flush_in_flight and got == [] and state["step"] == 4
    assert w.engine is not None and state["engine"] == w.engine.state_dict()
    assert w.engine.last_step is None or w.engine.last_step < 1
    w.log(loss=_step(model, opt, 4))   # step 5 lands steps 1-4
    assert [s.step for s in got] == [1, 2, 3, 4]
    for i in range(5, 8):
        w.log(loss=_step(model, opt, i))
    assert w.flush_in_flight      # steps 5-8 on their way
    assert [s.step for s in w.flush()] == [5, 6, 7, 8] and not w.flush_in_flight
    w.close()


def test_a_rollback_decided_one_step_late_drops_the_abandoned_step(tmp_path: Path) -> None:
    """flush_every=1, the guard off: a NaN step is applied; its flush lands one step later,
    when a step was already trained from the NaN weights. That step is on the trajectory the
    rollback abandons: never judged (no second rollback), not in the trace, and replay of the
    trace decides what the live run decided."""
    trace = tmp_path / "lag.jsonl"
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    w = lrwatch.Watcher(model, opt, flush_every=1, flush_lag=1, trace=trace,
                        recovery={"good_after": 3, "min_interval": 3, "guard": "off"})
    nan_after = []
    for i in range(40):
        bad = w.step + 1 == 20
        w.log(loss=_step(model, opt, i, nan=bad))
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            nan_after.append(w.step)
    w.close()
    # step 21 trained from the NaN weights of step 20 before the flush of step 20 landed (at
    # step 21's log, which then rolled back): after every log but step 20's the weights are finite
    assert nan_after == [20] and all(torch.isfinite(p).all() for p in model.parameters())
    assert w.policy.rollbacks == 1
    samples = read_trace(trace)
    rb = [e for s in samples for e in s.events if e.get("type") == "rollback"]
    assert len(rb) == 1 and rb[0]["step"] == 20 and 0 < rb[0]["to_step"] < 20
    steps = [s.step for s in samples]
    assert 21 not in steps and steps == sorted(steps)   # the abandoned step 21 is not there
    live = [(e["rule"], e["step"]) for s in samples for e in s.events if e.get("type") == "firing"]
    replayed = replay_trace(trace, load_pack("training"))
    assert replayed.error is None and [(f.rule, f.step) for f in replayed.firings] == live


@pytest.mark.parametrize("as_tensor", [True, False])
@pytest.mark.parametrize("lag", [0, 1])
def test_an_evaluation_of_a_step_a_rollback_abandons_is_never_kept_as_the_best(
        tmp_path: Path, lag: int, as_tensor: bool) -> None:
    """A NaN step 20 is rolled back to a snapshot before it; the run's best evaluation is
    logged at step 21. With ``flush_lag=1`` step 20's flush lands at step 21, which was
    trained from the NaN weights and is dropped unjudged: its evaluation was kept as the best
    (restored by ``restore_best()`` and a stop). With ``flush_lag=0`` step 21 is trained from
    the restored state, and its evaluation is the best."""
    trace = tmp_path / "lag.jsonl"
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = lrwatch.Watcher(model, opt, flush_every=1, flush_lag=lag, trace=trace,
                        keep_best="eval_accuracy",
                        recovery={"good_after": 3, "min_interval": 3, "max_interval": 3,
                                  "guard": "off"})
    for i in range(30):
        step = w.step + 1
        loss = _step(model, opt, i, nan=step == 20)
        acc = {12: 0.5, 21: 0.9}.get(step)
        if acc is None:
            w.log(loss=loss)
        else:
            w.log(loss=loss, eval_accuracy=torch.tensor(acc) if as_tensor else acc)
    w.close()
    (rb,) = [e for s in read_trace(trace) for e in s.events if e.get("type") == "rollback"]
    assert (rb["step"], rb["to_step"]) == (20, 18)   # a snapshot every 3 steps
    assert w.best_eval is not None
    assert w.best_eval.step == (21 if lag == 0 else 12)
    assert (21 in [s.step for s in read_trace(trace)]) == (lag == 0)


@pytest.mark.parametrize("lag", [0, 1])
def test_a_rollback_drops_the_evaluations_its_flush_read_after_its_target(
        tmp_path: Path, lag: int) -> None:
    """flush_every=5: an evaluation logged as a tensor at step 19 waits for the flush of
    steps 16-20, which rolls back to a snapshot before step 19 for a poisoned step 20:
    step 19 is abandoned, and its evaluation was decided, and kept, before the rules judged
    that flush."""
    rules = tmp_path / "poison.yml"
    rules.write_text("version: 1\nrules:\n  - name: poisoned\n    metric: poison\n"
                     "    detector: threshold\n    params: {above: 0.5}\n"
                     "    severity: critical\n    actions: [rollback]\n")
    trace = tmp_path / "poison.jsonl"
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = lrwatch.Watcher(model, opt, flush_every=5, flush_lag=lag, keep_best="eval_accuracy",
                        rules=str(rules), trace=trace,
                        recovery={"good_after": 3, "min_interval": 3, "max_interval": 3,
                                  "sudden_hold": 0})   # (the one-step poison rolls back)
    for i in range(30):
        step = w.step + 1
        loss = _step(model, opt, i)
        acc = {4: 0.5, 19: 0.9}.get(step)
        w.log(loss=loss, poison=float(step == 20),
              **({} if acc is None else {"eval_accuracy": torch.tensor(acc)}))
    w.close()
    (rb,) = [e for s in read_trace(trace) for e in s.events if e.get("type") == "rollback"]
    assert rb["step"] == 20 and 4 <= rb["to_step"] < 19   # (6 with lag 0, 14 with lag 1)
    assert w.best_eval is not None and w.best_eval.step == 4


@pytest.mark.parametrize("lag", [0, 1])
def test_a_loop_without_log_rolls_back_once_and_drops_the_step_already_trained(
        tmp_path: Path, lag: int) -> None:
    """No ``log()``: a row is committed at the next step's pre-hook and the rollback comes at
    the optimizer's post-step hook, after a step from the NaN weights whose row is still open.
    That step is on the abandoned trajectory too: dropped, not judged (it fired again and
    planned a second rollback, carried out at close)."""
    trace = tmp_path / "nolog.jsonl"
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    w = lrwatch.Watcher(model, opt, flush_every=1, flush_lag=lag, trace=trace,
                        recovery={"good_after": 3, "min_interval": 3, "max_interval": 3,
                                  "guard": "off"})
    for i in range(30):
        _step(model, opt, i, nan=w.step + 1 == 20)
    w.close()
    assert w.policy.rollbacks == 1 and all(torch.isfinite(p).all() for p in model.parameters())
    samples = read_trace(trace)
    rb = [e for s in samples for e in s.events if e.get("type") == "rollback"]
    assert len(rb) == 1 and rb[0]["step"] == 20
    nonfinite = [s.step for s in samples if s.values.get("nonfinite_grad") == 1.0]
    assert nonfinite == [20]   # the steps trained from the NaN weights were never judged


def test_an_explicit_flush_that_lands_a_rollback_does_not_judge_the_steps_after_it(
        tmp_path: Path) -> None:
    """flush() lands the copy in flight; when that plans a rollback, the step trained since
    (its row still open: no log() in this loop) is on the abandoned trajectory. Judged by the
    detectors the plan had just put back, it fired again: a second rollback with a compounded
    cut, carried out at close."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    w = lrwatch.Watcher(model, opt, flush_every=1, flush_lag=1, trace=tmp_path / "t.jsonl",
                        recovery={"good_after": 3, "min_interval": 3, "max_interval": 3,
                                  "guard": "off"})
    for i in range(30):
        _step(model, opt, i, nan=w.step + 1 == 20)
        if w.step == 21:
            assert w.flush_in_flight   # step 20's copy
            w.flush()
    w.close()
    assert w.policy.rollbacks == 1 and w.policy.lr_scale == 1.0
    nonfinite = [s.step for s in read_trace(tmp_path / "t.jsonl")
                 if s.values.get("nonfinite_grad") == 1.0]
    assert nonfinite == [20]


def test_a_stop_decided_one_step_late_keeps_every_step(tmp_path: Path) -> None:
    rules = tmp_path / "stop.yml"
    rules.write_text("""
version: 1
rules:
  - name: poisoned
    metric: poison
    detector: threshold
    params: {above: 0.5}
    severity: critical
    actions: [stop]
    annotations: {summary: "poison at step {step}"}
""")
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trace = tmp_path / "stop.jsonl"
    w = lrwatch.Watcher(model, opt, flush_every=3, flush_lag=1, rules=str(rules), trace=trace)
    for i in range(30):
        w.log(loss=_step(model, opt, i), poison=1.0 if w.step == 7 else 0.0)
        if w.should_stop:
            break
    w.close()
    # step 8 is poisoned; its flush (steps 7-9) was queued at step 9 and judged at step 10
    assert w.exit_status == 3 and w.step == 10
    assert [s.step for s in read_trace(trace)] == list(range(1, 11))   # step 10 too, at close


def test_an_evaluation_logged_while_a_copy_is_in_flight_is_judged_with_it() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = lrwatch.Watcher(model, opt, flush_every=3, flush_lag=1, keep_best="eval_loss")
    for i in range(2):
        w.log(loss=_step(model, opt, i))
    w.log(loss=_step(model, opt, 2), eval_loss=torch.tensor(0.9))   # step 3: the copy is queued
    assert w.flush_in_flight
    w.log(loss=_step(model, opt, 3), eval_loss=torch.tensor(0.4))   # step 4: lands step 1-3
    # both evaluations waited for a flush; the one of step 4 came after the copy was queued,
    # so the landing reads both values (one extra read) and keeps the better one
    assert w.best_eval is not None and w.best_eval.step == 4 and w.best_eval.value == pytest.approx(0.4)
    w.close()


def _snapshot_run(lag: int, steps: int, recovery: dict, nan_at: tuple[int, ...] = (),
                  trace: Path | None = None) -> tuple[lrwatch.Watcher, list[tuple[int, int]]]:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    w = lrwatch.Watcher(model, opt, flush_every=1, flush_lag=lag, trace=trace,
                        recovery={"guard": "off", **recovery})
    newest_good = []
    for i in range(steps):
        w.log(loss=_step(model, opt, i, nan=w.step + 1 in nan_at))
        assert w.store is not None
        good = w.store.latest_good()
        newest_good.append((w.step, good.step if good else -1))
    w.close()
    return w, newest_good


def test_known_good_snapshots_advance_with_a_lagged_flush() -> None:
    """Snapshots every 2 steps, known good after 2 quiet steps: the promotion of the older one
    lands a step after the newer one is taken; it is held for it (one over ``keep``) instead
    of being trimmed, so the newest known-good snapshot trails the direct flush's by at most
    one step instead of stopping."""
    rc = {"good_after": 2, "min_interval": 2, "max_interval": 2}
    _, now = _snapshot_run(0, 30, rc)
    _, lagged = _snapshot_run(1, 30, rc)
    assert now[-1][1] >= 26
    for (step, good_now), (_, good_lag) in zip(now[1:], lagged[1:]):
        assert good_lag >= dict(now).get(step - 1, -1), (step, good_now, good_lag)


@pytest.mark.parametrize("lag", [0, 1])
def test_the_snapshot_after_a_rollback_keeps_the_restored_detectors(tmp_path: Path,
                                                                    lag: int) -> None:
    """The snapshot taken at the boundary where a rollback put the run back holds the target's
    state, and the detectors were put back with it: it carries their state, so a second
    rollback to it restores them too (before, it waited for a judgement of a step nobody
    judges, and was promoted without it)."""
    trace = tmp_path / "t.jsonl"
    w, _ = _snapshot_run(lag, 40, {"good_after": 2, "min_interval": 4, "max_interval": 4,
                                   "probation": False, "keep": 10, "cooldown": 0},
                         nan_at=(15, 19), trace=trace)
    rb = [e for s in read_trace(trace) for e in s.events if e.get("type") == "rollback"]
    assert len(rb) == 2 and all(e.get("engine_state") is not None for e in rb)
    assert w._snaps is not None and not w._snaps._awaiting_engine


def test_a_resume_from_weights_that_are_not_finite_stops_at_its_first_rollback(
        caplog: pytest.LogCaptureFixture) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = lrwatch.Watcher(model, opt, flush_every=5, recovery={"guard": "off"})
    for i in range(5):
        w.log(loss=_step(model, opt, i))
    state = w.state_dict()
    w.close()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")   # a checkpoint written after an unjudged failure
    w = lrwatch.Watcher(model, opt, flush_every=5, recovery={"guard": "off"})
    w.load_state_dict(state)
    assert "resumed weights are not all finite" in caplog.text
    assert w.store is not None and not any(s.pinned for s in w.store.snapshots)
    for i in range(5, 20):
        w.log(loss=_step(model, opt, i))
        if w.should_stop:
            break
    w.close()
    assert w.should_stop and w.stop_reason == "no snapshot to go back to"


def test_a_scheduler_swapped_in_after_a_cut_is_not_cut_again() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    w = lrwatch.Watcher(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    from lrwatch.actions.rollback import scale_learning_rate
    w.policy.state.lr_scale = 0.5
    scale_learning_rate(opt, w.scheduler, 0.5)          # the cut as lrwatch applies one
    new = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    w.rebind_scheduler(new)
    opt.step()
    new.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5) and w.scheduler is new
    w.close()
