"""Snapshots, rollback, skip, reduce_lr and stop, on real models, optimizers and schedulers."""

from __future__ import annotations

import itertools
import math
import os
import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from torch import nn

import lrwatch
from lrwatch.actions.policy import EXIT_BUDGET, EXIT_STOPPED, RecoveryConfig
from lrwatch.actions.snapshot import SnapshotStore, capture_state, restore_state
from lrwatch.errors import ConfigError
from lrwatch.exporters.trace import read_trace
from lrwatch.rules import load_pack
from lrwatch.rules.replay import replay_trace
from flag_rules import NONFINITE_ROLLBACK
from prometheus_client import generate_latest


def _rules(tmp_path: Path, action: str = "rollback", metric: str = "poison",
           severity: str = "critical", extra: str = "") -> str:
    path = tmp_path / f"rules-{action}.yml"
    path.write_text(f"""
version: 1
rules:
  - name: poisoned
    metric: {metric}
    detector: threshold
    params: {{above: 0.5}}
    severity: {severity}
    actions: [{action}]
    annotations:
      summary: "{metric} is {{value}} at step {{step}}"
      description: "test rule"
{extra}
""")
    return str(path)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Dropout(0.1), nn.Linear(12, 2))


def _data(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(16, 6, generator=g), torch.randint(0, 2, (16,), generator=g)


def _batches() -> Iterator[int]:
    i = 0
    while True:
        yield i
        i += 1


def _step(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> torch.Tensor:
    x, y = _data(i)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def _state_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return set(a) == set(b) and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("on_disk", [False, True])
def test_snapshot_restores_bit_identical_state_and_rng(tmp_path: Path, on_disk: bool) -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=100)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    scaler.scale(torch.tensor(1.0))  # the scaler's state exists once it has scaled something
    for i in range(5):
        _step(model, opt, i)
        sched.step()
    store = SnapshotStore(directory=tmp_path / "snaps" if on_disk else None)
    snap = store.take(5, 5, model, opt, sched, scaler)
    assert snap is not None
    expected = capture_state(model, opt, sched, scaler)
    after = (torch.rand(3), random.random(), np.random.rand())
    for i in range(5, 12):  # move everything on, RNG included (dropout draws from it)
        _step(model, opt, i)
        sched.step()
    scaler.update(128.0)
    restore_state(snap.load(), model, opt, sched, scaler)
    got = capture_state(model, opt, sched, scaler)
    for key in ("model", "optimizer", "scheduler", "scaler"):
        assert _state_equal(expected[key], got[key]), key
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(again[0], after[0]) and again[1:] == after[1:]
    if on_disk:
        files = sorted(p.name for p in (tmp_path / "snaps").iterdir())
        assert files == ["snapshot-0000000005.json", "snapshot-0000000005.pt"]


def test_restored_rng_replays_the_same_draws() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    store = SnapshotStore()
    snap = store.take(0, 0, model, opt)
    assert snap is not None
    first = (torch.rand(4), random.random(), np.random.rand(2))
    restore_state(snap.load(), model, opt)
    again = (torch.rand(4), random.random(), np.random.rand(2))
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    assert np.array_equal(first[2], again[2])


def test_corrupt_disk_snapshot_is_refused(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    store = SnapshotStore(directory=tmp_path)
    snap = store.take(3, 0, model, opt)
    assert snap is not None and snap.path is not None
    data = bytearray(Path(snap.path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(snap.path).write_bytes(bytes(data))
    with pytest.raises(OSError, match="corrupt"):
        snap.load()


def _run(tmp_path: Path, *, steps: int, poison_from: int, poison_to: int | None = None,
         recovery: dict[str, Any] | None = None, action: str = "rollback",
         sched_kind: str = "lambda", flush_every: int = 1,
         poison_windows: list[tuple[int, int]] | None = None, **kw: Any) -> dict[str, Any]:
    """Train with a rule that fires while the logged ``poison`` metric is 1.

    Poison is keyed on the *schedule* step, so after a rollback it does not recur unless the
    window is still ahead (like a real bad stretch of data, it is not replayed).
    """
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if sched_kind == "lambda":
        sched: Any = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
    else:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    # sudden_hold 0: these tests are about what a rollback does; a single poisoned step out of
    # a quiet run would otherwise be watched first (test_a_sudden_failure_that_passes_...)
    rec = {"good_after": 5, "min_interval": 3, "cooldown": 0, "sudden_hold": 0,
           **(recovery or {})}
    trace = tmp_path / "trace.jsonl"
    w = lrwatch.Watcher(model, opt, sched, flush_every=flush_every, trace=trace,
                        rules=_rules(tmp_path, action), recovery=rec, **kw)
    used_batches: list[int] = []
    lrs: list[tuple[int, float]] = []  # (schedule step, lr used)
    poisoned_at: list[int] = []
    fired = False
    done_windows: set[tuple[int, int]] = set()
    for b in w.batches(_batches()):
        if w.step >= steps:
            break
        used_batches.append(b)
        s = sched.last_epoch
        lrs.append((s, opt.param_groups[0]["lr"]))
        hi = poison_to if poison_to is not None else math.inf
        poison = 1.0 if (poison_from <= s < hi and (not fired or poison_to is not None)) else 0.0
        if poison_windows is not None:   # each window poisons once
            win = next((w for w in poison_windows if w[0] <= s < w[1]), None)
            poison = 1.0 if win is not None and win not in done_windows else 0.0
            if poison:
                done_windows.add(win)
        if poison:
            fired = True
            poisoned_at.append(w.step + 1)
        loss = _step(model, opt, b)
        sched.step()
        w.log(loss=loss, poison=poison)
    w.close()
    return {"w": w, "model": model, "opt": opt, "sched": sched, "batches": used_batches,
            "lrs": lrs, "trace": read_trace(trace), "poisoned_at": poisoned_at}


def test_rollback_continues_the_schedule_from_the_restored_step_scaled(tmp_path: Path) -> None:
    # (a single poisoned step out of a quiet run is a sudden failure, which keeps the rate by
    # default: sudden_lr_factor makes it cut, to see the schedule scaled)
    r = _run(tmp_path, steps=40, poison_from=20, recovery={"lr_factor": 0.5,
                                                             "sudden_lr_factor": 0.5,
                                                             "lr_recover": False})
    w = r["w"]
    assert w.policy.rollbacks == 1 and w.exit_status == 0
    rollback = [e for s in r["trace"] for e in s.events if e.get("type") == "rollback"]
    assert len(rollback) == 1 and rollback[0]["rule"] == "poisoned"
    to_step = rollback[0]["to_step"]
    assert 0 < to_step < 20
    # The detectors go back to what they knew at the snapshot (and replay can follow).
    assert isinstance(rollback[0]["engine_state"], dict)
    # After the rollback the scheduler resumes at the snapshot's step, scaled by 0.5.
    lrs = r["lrs"]
    idx = next(i for i in range(1, len(lrs)) if lrs[i][0] <= lrs[i - 1][0])
    sched_step, lr = lrs[idx]
    assert sched_step == to_step
    assert lr == pytest.approx(0.5 * 0.1 / (1 + 0.1 * to_step), rel=1e-12)
    for s, lr in lrs[idx:]:
        assert lr == pytest.approx(0.5 * 0.1 / (1 + 0.1 * s), rel=1e-12)
    assert "lrwatch_rollbacks_total 1.0" in generate_latest(w.registry).decode()


def test_rollback_scales_chainable_schedulers_too(tmp_path: Path) -> None:
    r = _run(tmp_path, steps=40, poison_from=20, sched_kind="step",
             recovery={"lr_factor": 0.25, "sudden_lr_factor": 0.25, "lr_recover": False})
    lrs = r["lrs"]
    idx = next(i for i in range(1, len(lrs)) if lrs[i][0] <= lrs[i - 1][0])
    for s, lr in lrs[idx:]:
        assert lr == pytest.approx(0.25 * 0.1 * 0.5 ** (s // 7), rel=1e-12)


def test_rollback_restores_the_snapshot_bit_for_bit(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    went: list[int] = []
    w = lrwatch.Watcher(model, opt, rules=_rules(tmp_path), flush_every=1,
                        recovery={"good_after": 3, "min_interval": 4, "lr_factor": 1.0,
                                  "sudden_hold": 0},
                        listeners=[lambda s: went.extend(e["to_step"] for e in s.events
                                                         if e.get("type") == "rollback")])
    captured: dict[int, dict[str, Any]] = {}
    for i in range(30):
        loss = _step(model, opt, i)
        w.log(loss=loss, poison=1.0 if i == 25 else 0.0)
        if w.policy.rollbacks:
            break
        snap = w.store.latest() if w.store is not None else None
        if snap is not None and snap.step not in captured:
            captured[snap.step] = capture_state(model, opt)  # what the snapshot should hold
    w.close()
    assert w.policy.rollbacks == 1 and len(went) == 1
    assert went[0] in captured   # (a sudden failure may go to a not-yet-good snapshot)
    now = capture_state(model, opt)
    assert _state_equal(now["model"], captured[went[0]]["model"])
    assert _state_equal(now["optimizer"], captured[went[0]]["optimizer"])


def test_skipped_batches_are_exactly_the_configured_window(tmp_path: Path) -> None:
    r = _run(tmp_path, steps=30, poison_from=15, recovery={"skip_batches": 4})
    batches = r["batches"]
    assert r["w"].policy.rollbacks == 1
    gaps = [(a, b) for a, b in zip(batches, batches[1:]) if b != a + 1]
    assert len(gaps) == 1
    a, b = gaps[0]
    assert b - a - 1 == 4  # exactly four batches drawn and dropped
    assert r["w"].skipped_batches == 4


def test_a_sudden_failure_replays_the_batches_since_the_snapshot_but_its_own(
        tmp_path: Path) -> None:
    r = _run(tmp_path, steps=40, poison_from=15, recovery={"min_interval": 5,
                                                           "max_interval": 5, "replay": True})
    w, batches = r["w"], r["batches"]
    (rb,) = [e for s in r["trace"] for e in s.events if e.get("type") == "rollback"]
    assert rb["lr_factor"] == 1.0 and rb["replay_drop"] == [rb["step"] - 9, rb["step"]]
    lo, hi = rb["replay_drop"]
    # batch b is trained at step b + 1 until the rollback; then the ones drawn after the
    # snapshot and outside the failure's window come again, in order, then new ones
    back = next(i for i in range(1, len(batches)) if batches[i] < batches[i - 1])
    replayed = [b for b in range(rb["to_step"], back) if not lo <= b + 1 <= hi]
    assert replayed  # (the test needs a snapshot some steps before the window)
    assert batches[back:back + len(replayed)] == replayed
    assert batches[back + len(replayed)] == back     # the batch drawn before the rollback
    assert all(b2 == b1 + 1 for b1, b2 in zip(batches[back + len(replayed):],
                                               batches[back + len(replayed) + 1:]))
    assert w.policy.rollbacks == 1 and w.skipped_batches == 0


def _nonfinite_rules(tmp_path: Path) -> str:
    rules = tmp_path / "nonfinite.yml"
    rules.write_text(NONFINITE_ROLLBACK)
    return str(rules)


@pytest.mark.parametrize("nan_at,flush_every,flush_lag",
                         [(33, 4, 0), (59, 4, 0), (59, 1, 0), (59, 4, 1), (59, 1, 1), (58, 1, 1)])
def test_replay_after_a_nan_batch_trains_exactly_as_a_run_without_that_batch(
        tmp_path: Path, nan_at: int, flush_every: int, flush_lag: int) -> None:
    """The NaN batch mid-run, and as the last batch of the data (59): the rollback is carried
    out at the end of the data, and the batches since its snapshot are still trained again
    (before, ``batches()`` ended there and the run kept the snapshot's weights). With
    ``flush_lag=1`` (the default on CUDA) the flush still in flight at the end of the data
    is judged there first (not when a rollback already waits: 58)."""
    _replay_run_equals_run_without(tmp_path, 60, nan_at, flush_every, flush_lag)


@pytest.mark.parametrize("n,flush_every,flush_lag", [(62, 4, 0), (62, 4, 1), (61, 4, 1)])
def test_a_nan_last_batch_after_the_last_full_flush_is_replayed_too(
        tmp_path: Path, n: int, flush_every: int, flush_lag: int) -> None:
    """The fifteenth round: data whose length is no multiple of ``flush_every`` (the common
    case: 24 lengths in 25 with the default) left its last steps unflushed at the end of the
    data; a NaN among them was judged at ``close()`` and the run ended at the snapshot's
    weights. The end of the data judges every step not judged yet."""
    _replay_run_equals_run_without(tmp_path, n, n - 1, flush_every, flush_lag)


def _replay_run_equals_run_without(tmp_path: Path, n: int, nan_at: int, flush_every: int,
                                   flush_lag: int) -> None:
    """``n`` batches, batch ``nan_at``'s loss NaN, ``replay: True``: one rollback, the bad
    batch trained once, and the final weights those of the run without it."""
    def model_opt() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(3)
        m = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 2))
        return m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)

    def step(m: nn.Module, o: torch.optim.Optimizer, b: int, bad: bool) -> torch.Tensor:
        x, y = _data(b)
        loss = nn.functional.cross_entropy(m(x), y)
        if bad:
            loss = loss * float("nan")
        o.zero_grad()
        loss.backward()
        o.step()
        return loss.detach()

    model, opt = model_opt()
    w = lrwatch.Watcher(model, opt, rules=_nonfinite_rules(tmp_path), flush_every=flush_every,
                        flush_lag=flush_lag,
                        recovery={"good_after": 5, "min_interval": 5, "cooldown": 0,
                                  "replay": True,
                                  "guard": "off"})   # (the guard would drop it: no rollback)
    seen = []
    for b in w.batches(iter(range(n))):
        seen.append(b)
        w.log(loss=step(model, opt, b, bad=b == nan_at))
    w.close()
    assert w.policy.rollbacks == 1 and seen.count(nan_at) == 1
    clean, copt = model_opt()
    for b in range(n):
        if b != nan_at:
            step(clean, copt, b, bad=False)
    for p, q in zip(model.parameters(), clean.parameters()):
        assert torch.equal(p, q)


def _sgd_run(tmp_path: Path, nan_at: set[int], recovery: dict[str, Any] | None,
             n: int = 60, fused: bool = False, poison_at: frozenset[int] = frozenset(),
             adam: bool = False, mode: str | None = None
             ) -> tuple[lrwatch.Watcher | None, nn.Module]:
    """Plain SGD (a zero gradient changes nothing; ``adam``: Adam, where it does) over batches
    0..n-1; the loss of the batches in ``nan_at`` is NaN, those in ``poison_at`` are garbage
    (inputs x1000). ``recovery=None``: bare, without those batches. ``mode`` forces the step
    path's guard mode (``"zero"`` is what a non-fused optimizer on a GPU gets with
    ``guard="on"``)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 2))
    kw = {"fused": True} if fused else {}
    opt = (torch.optim.Adam(model.parameters(), lr=0.01, **kw) if adam
           else torch.optim.SGD(model.parameters(), lr=0.05, **kw))
    w = (lrwatch.Watcher(model, opt, rules=_nonfinite_rules(tmp_path), flush_every=4,
                         trace=tmp_path / "guard.jsonl",
                         recovery={"good_after": 5, "min_interval": 5, "sudden_hold": 0,
                                   **recovery})
         if recovery is not None else None)
    if w is not None and mode is not None:
        w.recorder.set_guard(mode, w.recovery.guard_ratio)
    for b in (w.batches(iter(range(n))) if w else iter(range(n))):
        if w is None and (b in nan_at or b in poison_at):
            continue
        x, y = _data(b)
        if b in poison_at:
            x = x * 1e3
        loss = nn.functional.cross_entropy(model(x), y)
        if b in nan_at:
            loss = loss * float("nan")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if w is not None:
            w.log(loss=loss.detach())
    if w is not None:
        w.close()
    return w, model


GUARDS = [(True, "auto", None),     # a fused optimizer skips the step itself (free)
          (False, "auto", None),    # parameters on the CPU: the gradients are held back
          (False, "on", None),
          (False, "on", "zero")]    # what a non-fused optimizer on a GPU gets with "on"


@pytest.mark.parametrize("fused,guard,mode", GUARDS)
def test_a_nonfinite_gradient_is_dropped_and_nothing_rolls_back(
        tmp_path: Path, fused: bool, guard: str, mode: str | None) -> None:
    w, model = _sgd_run(tmp_path, {33}, {"guard": guard}, fused=fused, mode=mode)
    assert w is not None and w.recorder.guard == (mode or ("skip" if fused else "hold"))
    assert w.policy.rollbacks == 0 and w.policy.state.drops_handled == 1
    events = [e for s in read_trace(tmp_path / "guard.jsonl") for e in s.events]
    acts = [(e["type"], e["step"]) for e in events if e.get("type") not in (None, "firing",
                                                                              "resolved")]
    assert acts == [("dropped", 34)]
    _, clean = _sgd_run(tmp_path, {33}, None)     # the same run without batch 33
    for p, q in zip(model.parameters(), clean.parameters()):
        assert torch.equal(p, q)
    assert "lrwatch_skipped_steps_total 1.0" in generate_latest(w.registry).decode()
    # with the guard off, the NaN reaches the parameters and the rule rolls back
    off, _ = _sgd_run(tmp_path, {33}, {"guard": "off"}, fused=fused)
    assert off is not None and off.recorder.guard is None and off.policy.rollbacks == 1


@pytest.mark.parametrize("fused,guard,mode", GUARDS)
def test_a_garbage_batch_is_dropped_and_nothing_rolls_back(
        tmp_path: Path, fused: bool, guard: str, mode: str | None) -> None:
    w, model = _sgd_run(tmp_path, set(), {"guard": guard}, fused=fused,
                        poison_at=frozenset({40}), mode=mode)
    assert w is not None and w.policy.rollbacks == 0 and w.policy.state.drops_handled == 1
    _, clean = _sgd_run(tmp_path, set(), None, poison_at=frozenset({40}))
    for p, q in zip(model.parameters(), clean.parameters()):
        assert torch.equal(p, q)
    # guard_ratio=0: non-finite steps only; the garbage batch is applied
    off, bad = _sgd_run(tmp_path, set(), {"guard": guard, "guard_ratio": 0}, fused=fused,
                        poison_at=frozenset({40}), mode=mode)
    assert off is not None and off.policy.state.drops_handled == 0
    assert not all(torch.equal(p, q) for p, q in zip(bad.parameters(), clean.parameters()))


@pytest.mark.parametrize("fused", [True, False])
def test_a_held_step_leaves_adam_as_if_the_batch_never_came(tmp_path: Path, fused: bool) -> None:
    # skipping (fused) and holding the gradients back (CPU) leave Adam's moments and step
    # count alone, so the run equals the run without the batch; zeroing would not (a zero
    # gradient still decays the moments and moves the weights)
    w, model = _sgd_run(tmp_path, {33}, {}, fused=fused, adam=True)
    assert w is not None and w.policy.state.drops_handled == 1
    _, clean = _sgd_run(tmp_path, {33}, None, adam=True, fused=fused)
    for p, q in zip(model.parameters(), clean.parameters()):
        assert torch.equal(p, q)
    # and the caller's gradients are given back after the held step
    assert all(p.grad is not None for p in model.parameters())
    _, zeroed = _sgd_run(tmp_path, {33}, {}, adam=True, mode="zero")
    assert not all(torch.equal(p, q) for p, q in zip(zeroed.parameters(), clean.parameters()))


def test_nonfinite_gradients_in_a_row_are_a_failure_that_rolls_back(tmp_path: Path) -> None:
    w, model = _sgd_run(tmp_path, {33, 34, 35, 36}, {}, fused=True)
    assert w is not None and w.policy.rollbacks >= 1
    rb = [e for s in read_trace(tmp_path / "guard.jsonl") for e in s.events
          if e.get("type") == "rollback"]
    # the second drop within good_after steps: not out of a quiet stretch, so an ordinary
    # rollback with a cut and new batches
    assert (rb[0]["rule"], rb[0]["step"], rb[0]["lr_factor"]) == ("dropped_again", 35, 0.5)
    assert "replay_drop" not in rb[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_guard_leaves_finite_steps_untouched_bit_for_bit(tmp_path: Path) -> None:
    runs = []
    for guard, fused, mode in (("on", False, None), ("off", False, None), ("on", False, "zero"),
                               ("auto", True, None), ("off", True, None)):
        torch.manual_seed(5)
        model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 2))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
        w = lrwatch.Watcher(model, opt, flush_every=5, recovery={"guard": guard})
        if mode is not None:
            w.recorder.set_guard(mode, 100.0)
        for b in range(40):
            x, y = _data(b)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss.detach())
        w.close()
        assert not hasattr(opt, "found_inf")   # the flag handed to a fused step is taken back
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert all(torch.equal(a, b) for a, b in zip(runs[2], runs[1]))
    assert all(torch.equal(a, b) for a, b in zip(runs[3], runs[4]))


def test_the_guard_leaves_a_flag_someone_else_handed_the_step_alone() -> None:
    # a GradScaler the Watcher was not told about sets optimizer.found_inf itself
    model = nn.Sequential(nn.Linear(6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    w = lrwatch.Watcher(model, opt, flush_every=1)
    theirs = torch.tensor(0.0)
    x, y = _data(0)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.found_inf = theirs
    opt.step()
    assert opt.found_inf is theirs
    del opt.found_inf
    w.log(loss=1.0)
    w.close()


def test_budget_stops_the_run_cleanly(tmp_path: Path) -> None:
    snapdir = tmp_path / "snaps"
    r = _run(tmp_path, steps=200, poison_from=10, poison_to=10**9,
             recovery={"max_rollbacks": 2, "snapshot_dir": str(snapdir), "good_after": 3})
    w = r["w"]
    assert w.policy.rollbacks == 2
    assert w.should_stop and w.exit_status == EXIT_BUDGET
    assert "budget" in (w.stop_reason or "")
    assert w.step < 200  # the loop ended by itself
    stops = [e for s in r["trace"] for e in s.events if e.get("type") == "stop"]
    assert len(stops) == 1
    final = sorted(snapdir.glob("snapshot-*.pt"))
    assert any(p.name == f"snapshot-{w.step:010d}.pt" for p in final)  # the final snapshot


def test_a_budget_stop_leaves_the_good_state_at_the_rate_the_run_was_cut_to(
        tmp_path: Path) -> None:
    """The budget stop restores the last known-good snapshot: its rates carry the scale of
    their time and are brought to the run's (the final snapshot is tagged with it). Before,
    a snapshot taken before a cut to half came back at the full rate, tagged 0.5."""
    r = _run(tmp_path, steps=200, poison_from=20, poison_to=10**9,
             recovery={"max_rollbacks": 1, "sudden_lr_factor": 0.5, "lr_recover": False})
    w, sched, opt = r["w"], r["sched"], r["opt"]
    assert w.exit_status == EXIT_BUDGET and w.policy.lr_scale == pytest.approx(0.5)
    planned = 0.1 / (1 + 0.1 * sched.last_epoch) * w.policy.lr_scale
    assert opt.param_groups[0]["lr"] == pytest.approx(planned, rel=1e-12)
    final = w.store.latest()
    assert final is not None and final.step == w.step
    assert final.extra["lr_scale"] == pytest.approx(0.5)
    assert final.load()["optimizer"]["param_groups"][0]["lr"] == pytest.approx(planned)


def test_stop_action_exits_with_status_and_final_snapshot(tmp_path: Path) -> None:
    r = _run(tmp_path, steps=50, poison_from=8, action="stop")
    w = r["w"]
    assert w.should_stop and w.exit_status == EXIT_STOPPED
    assert w.store is not None and w.store.latest() is not None
    assert w.store.latest().step == w.step


def test_reduce_lr_scales_without_restoring(tmp_path: Path) -> None:
    r = _run(tmp_path, steps=30, poison_from=10, action="reduce_lr")
    lrs = r["lrs"]
    steps = [s for s, _ in lrs]
    assert steps == sorted(steps)  # no rollback: the schedule never goes back
    assert lrs[-1][1] == pytest.approx(0.5 * 0.1 / (1 + 0.1 * lrs[-1][0]), rel=1e-12)


@pytest.mark.parametrize("guard", ["on", "off"])
def test_nonfinite_gradient_is_undone_with_default_rules(tmp_path: Path, guard: str) -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    w = lrwatch.Watcher(model, opt, flush_every=1,
                        recovery={"good_after": 3, "min_interval": 3, "guard": guard})
    bad_step = 20
    for i in range(40):
        x, y = _data(i)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if w.step + 1 == bad_step:
            loss = loss * float("nan")
        loss.backward()
        opt.step()
        w.log(loss=loss)
        # After every log the run is at a safe point: no NaN ever persists in the weights.
        assert all(torch.isfinite(p).all() for p in model.parameters()), f"NaN after step {i}"
    w.close()
    # the guard drops the step on the device (nothing to undo); without it, a rollback
    assert w.policy.rollbacks == (guard == "off")
    assert w.policy.state.drops_handled == (guard != "off")
    assert "lrwatch_nonfinite_steps_total 1.0" in generate_latest(w.registry).decode()


def test_snapshot_write_failure_is_counted_and_training_goes_on(tmp_path: Path) -> None:
    # Every snapshot file the store will write is a link to /dev/full: a real ENOSPC.
    snapdir = tmp_path / "full"
    snapdir.mkdir()
    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full is needed for a real disk-full error")
    for step in range(0, 60):
        os.symlink("/dev/full", snapdir / f"snapshot-{step:010d}.pt.tmp")
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = lrwatch.Watcher(model, opt, recovery={"snapshot_dir": str(snapdir), "min_interval": 5})
    for i in range(30):
        w.log(loss=_step(model, opt, i))
    w.close()
    assert w.step == 30
    # The first failed write switches the store to memory: one failure, counted once, and
    # every snapshot is kept, so rollbacks still have a target: the start on disk (its file
    # is the store's own name since the sixteenth round, not one of the links), every one
    # after it in memory.
    assert w.store is not None and w.store.failed == 1 and w.store.directory is None
    start, *later = w.store.snapshots
    assert start.pinned and start.path and os.path.exists(start.path)
    assert w.store.taken >= 2 and later and all(s.state is not None for s in later)
    text = generate_latest(w.registry).decode()
    line = next(ln for ln in text.splitlines() if ln.startswith("lrwatch_internal_errors_total "))
    assert float(line.split()[1]) == w.store.failed


def test_recovery_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="lr_factor"):
        RecoveryConfig(lr_factor=2.0)
    with pytest.raises(ConfigError, match="valid"):
        RecoveryConfig.coerce({"lr_facto": 0.5})


def test_state_dict_resumes_budget_and_detectors(tmp_path: Path) -> None:
    r = _run(tmp_path, steps=30, poison_from=12)
    state = r["w"].state_dict()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w2 = lrwatch.Watcher(model, opt, rules=_rules(tmp_path))
    w2.load_state_dict(state)
    assert w2.policy.rollbacks == 1 and w2.step == 30
    assert w2.engine is not None and w2.engine.state_dict() == state["engine"]
    w2.close()


def test_a_resumed_run_whose_rate_was_cut_restarts_from_its_resumed_rate() -> None:
    """The pinned snapshot a restart goes back to is taken when the Watcher is built, before
    ``load_state_dict`` brings back the policy's scale; it is taken again then. Before, it
    was tagged with a scale of 1 while holding a rate already cut to a tenth, and a restart
    after the resume cut the rate a tenth further than it said."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = lrwatch.Watcher(model, opt, rules=None)   # a run lrwatch had cut to a tenth:
    state = {**w.state_dict(), "step": 40, "policy": {"lr_scale": 0.1}}
    w.close()
    for group in opt.param_groups:
        group["lr"] = 0.01
    w2 = lrwatch.Watcher(model, opt, start_step=40, recovery={"guard": "off"})
    w2.load_state_dict(state)
    pinned = [s for s in w2.store.snapshots if s.pinned]
    assert [(s.step, s.extra["lr_scale"]) for s in pinned] == [(40, 0.1)]
    for i in _batches():
        loss = _step(model, opt, i) * (float("nan") if i in (3, 5) else 1.0)
        w2.log(loss=loss)
        if w2.rollbacks or i > 40:
            break
    w2.close()
    assert w2.rollbacks == 1
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * w2.policy.lr_scale / 0.1)


def test_a_rollback_to_before_the_swa_swap_after_a_cut_cuts_swa_lr_once(tmp_path: Path) -> None:
    """Lightning's StochasticWeightAveraging swaps SWALR in mid-run and the Watcher is rebound
    to it (``rebind_scheduler``: the standing cut reaches ``swa_lr``). A later rollback to a
    snapshot from before the swap and before the cut keeps the groups' ``swa_lr`` (and
    SWALR's ``initial_lr``), which carry today's scale; they were then scaled by the factor
    measured from the snapshot's scale, so the standing cut reached them twice."""
    cut = """
  - name: cut
    metric: cut
    detector: threshold
    params: {above: 0.5}
    severity: warning
    actions: [reduce_lr]
"""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    trace = tmp_path / "swa.jsonl"
    w = lrwatch.Watcher(model, opt, flush_every=1, rules=_rules(tmp_path, extra=cut),
                        trace=trace,
                        recovery={"good_after": 2, "min_interval": 10, "max_interval": 10,
                                  "cooldown": 0, "guard": "off", "lr_recover": False,
                                  "sudden_lr_factor": 0.5, "sudden_hold": 0})
    swa = None
    for b in w.batches(_batches()):
        step = w.step + 1
        if step > 30:
            break
        if step == 25:   # after the cut at step 22 (the rates at x0.5)
            swa = torch.optim.swa_utils.SWALR(opt, swa_lr=0.04, anneal_epochs=1)
            w.rebind_scheduler(swa)
        loss = _step(model, opt, b)
        if swa is not None:
            swa.step()
        w.log(loss=loss, cut=float(step == 22), poison=float(step == 27))
    w.close()
    # the rollback at step 27 went back to step 10 (scale 1, before the cut and the swap)
    # and cut the rate x0.5: the scale 0.5 x 0.5
    rb = [e for x in read_trace(trace) for e in x.events if e.get("type") == "rollback"]
    assert [(e["step"], e["to_step"], e["lr_factor"]) for e in rb] == [(27, 10, 0.5)]
    assert w.policy.lr_scale == 0.25
    group = opt.param_groups[0]
    assert group["swa_lr"] == pytest.approx(0.04 * 0.25)       # not 0.04 * 0.5 * 0.25
    assert group["initial_lr"] == pytest.approx(1.0 * 0.25)    # SWALR's base: the rate x0.25
    assert group["lr"] == pytest.approx(0.04 * 0.25)           # annealed to its target


def test_persistent_fault_escalates_the_cut_and_goes_further_back(tmp_path: Path) -> None:
    r = _run(tmp_path, steps=120, poison_from=15, poison_to=10**9,
             recovery={"max_rollbacks": 4, "good_after": 3, "min_interval": 3})
    rollbacks = [e for s in r["trace"] for e in s.events if e.get("type") == "rollback"]
    assert len(rollbacks) == 4
    # The first failure came out of a quiet run (sudden: the rate is kept); each later one
    # fails soon after the last: the cut compounds from lr_factor.
    assert [e["lr_factor"] for e in rollbacks] == [1.0, 0.25, 0.125, 0.0625]
    w = r["w"]
    assert w.exit_status == EXIT_BUDGET
    # The budget stop leaves the model at its last known-good state, not the diverged one.
    assert all(torch.isfinite(p).all() for p in r["model"].parameters())


def test_failing_again_never_goes_back_to_a_snapshot_a_rollback_abandoned(
        tmp_path: Path) -> None:
    """A rollback to a snapshot older than the newest known-good one (the newest failed once
    already) abandons the trajectory the newer ones belong to: they are dropped, so that the
    next failure goes further back still. Before, the newer one stayed the newest known-good
    snapshot, and the rollbacks went back and forth between two states (30, 25, 30, ...)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trace = tmp_path / "trace.jsonl"
    w = lrwatch.Watcher(model, opt, flush_every=1, trace=trace, rules=_rules(tmp_path),
                        recovery={"good_after": 5, "min_interval": 5, "max_interval": 5,
                                  "keep": 4, "cooldown": 0, "guard": "off", "sudden_hold": 0})
    for b in w.batches(_batches()):
        if w.step >= 60:
            break
        step = w.step + 1
        w.log(loss=_step(model, opt, b), poison=1.0 if step in (40, 43, 46) else 0.0)
    w.close()
    rb = [e for s in read_trace(trace) for e in s.events if e.get("type") == "rollback"]
    assert [e["step"] for e in rb] == [40, 43, 46]
    to = [e["to_step"] for e in rb]
    assert to[0] < 40 and to[1] < to[0] and to[2] < to[1], to


def _two_nans_in_a_cooldown(w: lrwatch.Watcher, model: nn.Module,
                            opt: torch.optim.Optimizer, steps: int = 15) -> None:
    """Train ``steps`` steps with a NaN loss at steps 10 and 14: the second falls inside the
    cooldown of the first one's rollback, so its rollback is held."""
    for i in range(steps):
        x, y = _data(i)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if i in (10, 14):
            loss = loss * float("nan")
        loss.backward()
        opt.step()
        w.log(loss=loss)


def test_rollback_held_by_the_cooldown_is_not_lost_at_close(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = lrwatch.Watcher(model, opt, flush_every=1,
                        recovery={"guard": "off",
                                  "good_after": 3, "min_interval": 3, "cooldown": 1000})
    _two_nans_in_a_cooldown(w, model, opt)
    assert w.policy.held is not None
    w.close()
    assert w.policy.rollbacks == 2 and w.policy.held is None
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("flush_every", [1, 4])
def test_a_rollback_held_by_the_cooldown_and_released_at_close_is_in_the_trace(
        tmp_path: Path, flush_every: int) -> None:
    """The rollback that ``close()`` releases (held by the cooldown until the end) was carried
    out but left no event in the trace: its records went nowhere. Its event now sits on the
    run's last line, whether the final flush wrote lines (``flush_every=4``) or the last line
    was written before (``flush_every=1``: written again with the event)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trace = tmp_path / "held.jsonl"
    w = lrwatch.Watcher(model, opt, flush_every=flush_every, trace=trace,
                        recovery={"guard": "off",
                                  "good_after": 3, "min_interval": 3, "cooldown": 1000})
    seen: list[Any] = []
    w.add_listener(seen.append)
    _two_nans_in_a_cooldown(w, model, opt)
    assert (w.policy.held is not None) == (flush_every == 1)
    w.close()
    assert w.policy.rollbacks == 2
    samples = read_trace(trace)   # strict: the steps increase
    assert [s.step for s in samples] == list(range(1, 16))
    rb = [(s.step, e) for s in samples for e in s.events if e.get("type") == "rollback"]
    assert [(at, e["step"]) for at, e in rb] == [(12 if flush_every == 4 else 11, 11), (15, 15)]
    assert "held by the cooldown until the end" in rb[1][1]["reason"]
    live = [(e["rule"], e["step"]) for x in seen for e in x.events if e.get("type") == "firing"]
    replayed = replay_trace(trace, load_pack("training"))
    assert replayed.error is None and [(f.rule, f.step) for f in replayed.firings] == live


_WARN_RULE = """
  - name: wobble
    metric: wobble
    detector: threshold
    params: {above: 0.5}
    severity: warning
    actions: [alert]
  - name: lr_jump
    metric: lr
    detector: threshold
    params: {above: 1.0}
    severity: warning
    actions: [alert]
"""


def _probation_run(tmp_path: Path, wobble_at: int, recovery: dict[str, Any] | None = None,
                   big_lr_at: int | None = None) -> dict[str, Any]:
    """A critical ``poisoned`` firing at step 20, then a warning at executed step ``wobble_at``."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trace = tmp_path / f"trace-{wobble_at}.jsonl"
    w = lrwatch.Watcher(model, opt, flush_every=1, trace=trace,
                        rules=_rules(tmp_path, extra=_WARN_RULE),
                        recovery={"good_after": 5, "min_interval": 3, "cooldown": 0,
                                  "sudden_hold": 0, **(recovery or {})})
    for b in w.batches(_batches()):
        if w.step >= 80:
            break
        step = w.step + 1
        if big_lr_at is not None:   # a warning on a setting, not on an outcome
            opt.param_groups[0]["lr"] = 5.0 if step == big_lr_at else 0.1
        loss = _step(model, opt, b)
        w.log(loss=loss, poison=1.0 if step == 20 else 0.0,
              wobble=1.0 if step == wobble_at else 0.0)
    w.close()
    rollbacks = [e for s in read_trace(trace) for e in s.events if e.get("type") == "rollback"]
    return {"w": w, "rollbacks": rollbacks}


def test_warning_right_after_a_rollback_escalates_to_a_rollback(tmp_path: Path) -> None:
    r = _probation_run(tmp_path, wobble_at=24)
    rb = r["rollbacks"]
    assert [e["rule"] for e in rb] == ["poisoned", "wobble"]
    assert "probation after the rollback at step 20" in rb[1]["reason"]
    assert rb[1]["lr_factor"] == 0.25          # it failed again soon: the cut compounds
    assert r["w"].policy.rollbacks == 2


def test_warning_outside_probation_or_with_probation_off_only_alerts(tmp_path: Path) -> None:
    # The run got past the failure point plus good_after: back to normal, warnings alert.
    late = _probation_run(tmp_path, wobble_at=70)
    assert [e["rule"] for e in late["rollbacks"]] == ["poisoned"]
    off = _probation_run(tmp_path, wobble_at=24, recovery={"probation": False})
    assert [e["rule"] for e in off["rollbacks"]] == ["poisoned"]
    # A warning on a setting (the learning rate) is no evidence that training diverges.
    lr = _probation_run(tmp_path, wobble_at=10**6, big_lr_at=24)
    assert [e["rule"] for e in lr["rollbacks"]] == ["poisoned"]
    assert any(e.get("rule") == "lr_jump" and e.get("type") == "firing"
               for s in read_trace(tmp_path / "trace-1000000.jsonl") for e in s.events)


@pytest.mark.parametrize("warmup", ["auto", 100])
def test_blow_up_at_the_second_step_rolls_back_to_the_start_with_default_rules(
        tmp_path: Path, warmup: Any) -> None:
    # Adam far too hot for this MLP: the loss goes 1.4 -> 36 at step 2, then falls back to the
    # untrained level with a dead network. No relative rule sees it (the spike is the history);
    # the default pack's blowup_then_dead sees a spike 10x above the untrained loss followed by
    # a flat loss near the untrained level (a transient that keeps learning would not fire).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.3)
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(20, 4, generator=g)
    trace = tmp_path / "trace.jsonl"
    w = lrwatch.Watcher(model, opt, flush_every=5, trace=trace, rules="training",
                        recovery={"good_after": 10, "min_interval": 5,
                                  "restart_warmup": warmup})
    lrs = []
    for _ in w.batches(_batches()):
        if w.step >= 110:
            break
        x = torch.randn(32, 20, generator=g)
        loss = nn.functional.cross_entropy(model(x), (x @ truth).argmax(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
        w.log(loss=loss.detach())
    w.close()
    rb = [e for s in read_trace(trace) for e in s.events if e.get("type") == "rollback"]
    assert rb and rb[0]["rule"] == "blowup_then_dead" and rb[0]["to_step"] == 0
    # It diverged before any later state proved healthy: a restart, with restart_lr_factor.
    assert rb[0]["lr_factor"] == RecoveryConfig().restart_lr_factor == 0.1
    after = lrs[lrs.index(min(lrs)):]
    assert lrs[0] == 0.3 and len(after) > 10
    if warmup == "auto":
        # Adam's estimates are bias-corrected: a fresh state takes no oversized first steps,
        # so the restart goes straight to the cut rate (restart_warmup_for: 0 steps)
        assert "warmup" not in rb[0]
        assert all(lr == pytest.approx(0.03) for lr in after)
    else:
        # ... warmed up again: linearly from 1% of the new rate, 0.0003 more per step
        assert rb[0]["warmup"] == 100
        assert after[0] == pytest.approx(0.0003)
        assert all(b - a == pytest.approx(0.0003) for a, b in zip(after, after[1:]))


@pytest.mark.parametrize("make, steps", [
    (lambda ps: torch.optim.RMSprop(ps, lr=0.01), 29),
    (lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.95), 6),
    (lambda ps: torch.optim.AdamW(ps, lr=0.01), 0),
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), 0),
])
def test_the_watcher_reads_the_restart_warmup_off_its_optimizer(make: Any, steps: int) -> None:
    model = nn.Linear(4, 2)
    w = lrwatch.Watcher(model, make(model.parameters()), flush_every=5, rules="training")
    for _ in range(5):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        w.optimizer.zero_grad()
        loss.backward()
        w.optimizer.step()
        w.log(loss=loss.detach())
    w.close()
    assert w.recovery is not None and w.recovery.restart_warmup == "auto"
    assert w.policy.auto_warmup == steps


def test_learning_rate_comes_back_after_a_one_off_fault(tmp_path: Path) -> None:
    r = _run(tmp_path, steps=90, poison_from=20,
             recovery={"lr_factor": 0.5, "sudden_lr_factor": 0.5, "lr_recover": True})
    events = [e for s in r["trace"] for e in s.events if e.get("type") in ("rollback",
                                                                          "lr_recover")]
    assert [e["type"] for e in events] == ["rollback", "lr_recover"]
    rec = events[1]
    assert rec["factor"] == pytest.approx(2.0) and rec["steps"] == 5
    # the schedule runs at its full rate again, geometrically ramped back over 5 steps
    lrs = r["lrs"]
    assert lrs[-1][1] == pytest.approx(0.1 / (1 + 0.1 * lrs[-1][0]), rel=1e-9)
    ratios = [lr * (1 + 0.1 * s) / 0.1 for s, lr in lrs]
    ramp = [x for x in ratios if 0.5 + 1e-9 < x < 1 - 1e-9]
    assert ramp == pytest.approx([2 ** (k / 5) / 2 for k in range(1, 5)])
    assert r["w"].state_dict()["policy"]["lr_recovered"] is True
    assert r["w"].registry.get_sample_value("lrwatch_actions_total",
                                            {"action": "lr_recover"}) == 1.0


def test_a_fault_that_comes_back_after_the_rate_did_keeps_the_cut(tmp_path: Path) -> None:
    # Poison at schedule steps 20 and again from 45: after the first rollback the rate comes
    # back, the run fails again, and from then on the cut stays.
    r = _run(tmp_path, steps=160, poison_from=20,
             recovery={"lr_factor": 0.5, "sudden_lr_factor": 0.5, "lr_recover": True},
             poison_windows=[(20, 21), (45, 46)])
    kinds = [e["type"] for s in r["trace"] for e in s.events
             if e.get("type") in ("rollback", "lr_recover")]
    assert kinds == ["rollback", "lr_recover", "rollback"]
    assert r["w"].policy.persistent
    s, lr = r["lrs"][-1]
    assert lr == pytest.approx(0.5 * 0.1 / (1 + 0.1 * s), rel=1e-9)


def test_restart_during_a_warm_up_cuts_from_the_rate_it_was_heading_for(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trace = tmp_path / "trace.jsonl"
    w = lrwatch.Watcher(model, opt, flush_every=1, trace=trace, rules=_rules(tmp_path),
                        recovery={"restart_warmup": 10, "cooldown": 0})
    lrs = []
    for b in w.batches(_batches()):
        if w.step >= 40:
            break
        step = w.step + 1
        lrs.append(opt.param_groups[0]["lr"])
        w.log(loss=_step(model, opt, b), poison=1.0 if step in (2, 7) else 0.0)
    w.close()
    rb = [e for s in read_trace(trace) for e in s.events if e.get("type") == "rollback"]
    assert [(e["to_step"], e["lr_factor"], e["warmup"]) for e in rb] == [(0, 0.1, 10),
                                                                         (0, 0.05, 10)]
    # The second restart came 4 steps into the first warm-up (rate 0.1 * 0.1 * 5/10): the new
    # cut applies to the rate the ramp was heading for, 0.01, not to the 0.005 reached.
    assert lrs[-1] == pytest.approx(0.1 * 0.1 * 0.05)
    assert lrs[3] == pytest.approx(0.1 * 0.1 * 2 / 10)
    # the steps carry lrwatch's own warm-up (the never-learned rules' veto): absent before the
    # first restart, 1 while a restart's ramp is under way, 0 once it is over
    warm = {s.step: s.values.get("recovery_warmup") for s in read_trace(trace)}
    assert [warm[k] for k in (1, 2)] == [None, None]       # until the restart at step 2
    assert {warm[k] for k in range(3, 17)} == {1.0}        # both ramps: 9 steps after step 7
    assert {warm[k] for k in range(17, 41)} == {0.0}


def _warm_up_rates(tmp_path: Path, skip_batches: int = 0,
                   resume_at: int | None = None) -> list[float]:
    """The rate of every trained step of a run restarted at step 2 with a 10-step warm-up
    (``resume_at``: checkpointed at the top of that step's loop, after its boundary, and
    resumed from there in a new Watcher)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = {"restart_warmup": 10, "cooldown": 0, "skip_batches": skip_batches, "guard": "off"}
    w = lrwatch.Watcher(model, opt, flush_every=1, rules=_rules(tmp_path), recovery=rec)
    lrs: list[float] = []
    it = _batches()
    for stop in (resume_at or 20, 20):
        for b in w.batches(it):
            if w.step == stop:
                break
            step = w.step + 1
            lrs.append(opt.param_groups[0]["lr"])
            w.log(loss=_step(model, opt, b), poison=1.0 if step == 2 else 0.0)
        if w.step == 20:
            break
        state, opt_state = w.state_dict(), opt.state_dict()   # the checkpoint
        w.close()
        opt.load_state_dict(opt_state)
        w = lrwatch.Watcher(model, opt, flush_every=1, start_step=state["step"],
                            rules=_rules(tmp_path), recovery=rec)
        w.load_state_dict(state)
        it = itertools.chain([b], it)   # the batch drawn at the checkpoint is trained on
    w.close()
    return lrs


def test_a_warm_up_ramps_once_per_trained_step(tmp_path: Path) -> None:
    """The batches of a skip window are drawn and dropped between two boundaries that train
    nothing, and a run resumed from a checkpoint written after its step's boundary meets that
    boundary again: neither moves the ramp. Before, each skipped batch took a step of the
    warm-up (the first trained step after the restart ran at 4/10 of the cut rate, not 1/10)
    and a resumed warm-up ended a step early."""
    lrs = _warm_up_rates(tmp_path)
    cut = 0.1 * 0.1
    # steps 1-2 at the configured rate, then the restart's ramp from 1/10 of the cut rate
    assert lrs[:12] == pytest.approx([0.1, 0.1] + [cut * k / 10 for k in range(1, 11)])
    assert lrs[12:] == pytest.approx([cut] * (len(lrs) - 12))
    assert _warm_up_rates(tmp_path, skip_batches=3) == pytest.approx(lrs)
    assert _warm_up_rates(tmp_path, resume_at=6) == pytest.approx(lrs)


def _stalled_regression(rules: Any, *, scheduler: bool = False, recovery: Any = True,
                        trace: Any = None) -> tuple[float, Any]:
    """A linear regression whose loss reaches its noise floor in a few dozen steps and stays
    there (constant rate, SGD): what the training pack's ``loss_plateau`` halves the rate on
    when the run has no scheduler (``scheduler=True``: a ``LambdaLR`` holding it constant)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0) if scheduler else None
    w = lrwatch.Watcher(model, opt, sched, flush_every=10, rules=rules, recovery=recovery,
                        trace=trace)
    g = torch.Generator().manual_seed(5)
    true_w = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    for _ in range(300):
        x = torch.randn(32, 4, generator=g)
        y = x @ true_w.T + torch.randn(32, 1, generator=g)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        w.log(loss=loss)
    w.close()
    return opt.param_groups[0]["lr"], w


def test_a_stalled_loss_halves_the_rate_of_a_run_without_a_scheduler(tmp_path: Path) -> None:
    lr, w = _stalled_regression("training")
    cuts = w.policy.state.lr_reductions
    assert cuts >= 1 and lr == pytest.approx(0.05 * 0.5 ** cuts)
    assert w.policy.lr_scale == pytest.approx(0.5 ** cuts)
    assert w.policy.rollbacks == 0
    # a run with a scheduler of its own is left to it, and the cut can be turned off
    lr, w = _stalled_regression("training", scheduler=True, trace=tmp_path / "s.jsonl")
    assert lr == 0.05 and w.policy.state.lr_reductions == 0
    fired = {e.get("rule") for s in read_trace(tmp_path / "s.jsonl") for e in s.events
             if e.get("type") == "firing"}
    assert "loss_plateau" in fired          # the stall is reported all the same
    lr, w = _stalled_regression("training", recovery={"cut_unscheduled": False})
    assert lr == 0.05 and w.policy.state.lr_reductions == 0


def test_plateau_cut_pack_halves_the_rate_of_a_scheduled_run_too() -> None:
    lr, w = _stalled_regression(["training", "plateau_cut"], scheduler=True)
    cuts = w.policy.state.lr_reductions
    assert cuts >= 1 and lr == pytest.approx(0.05 * 0.5 ** cuts)
    assert "loss_plateau" in {r.name for r in w.engine.rules}


def test_rules_as_a_list_join_in_order_and_bad_entries_are_clear(tmp_path: Path) -> None:
    from lrwatch.wiring import rule_set
    rs = rule_set(["training", "plateau_cut"])
    assert rs is not None and rs.names[-1] == "loss_plateau_cut"
    assert rs.names[:-1] == lrwatch.rules.load_pack("training").names
    with pytest.raises(ConfigError, match="cannot contain None"):
        rule_set(["training", None])
    with pytest.raises(ConfigError, match="rule set 'training' is given twice"):
        rule_set(["training", "training"])
    with pytest.raises(ConfigError, match="non-empty list"):
        rule_set([])


@pytest.mark.parametrize("flush_every", [1, 10])
def test_a_sudden_failure_that_passes_is_watched_and_not_rolled_back(
        tmp_path: Path, flush_every: int) -> None:
    """One poisoned step out of a quiet, healthy run (RecoveryConfig.sudden_hold, default 5):
    the rule resolves at the next step and nothing else fails, so the run goes on with every
    batch in order and no rollback; the trace says what was watched and that it passed. With
    the hold off the same run rolls back."""
    r = _run(tmp_path, steps=40, poison_from=20, flush_every=flush_every,
             recovery={"sudden_hold": 5})
    events = [e for s in r["trace"] for e in s.events if e.get("type") in
              ("watch", "recovered", "rollback", "skip")]
    assert [e["type"] for e in events] == ["watch", "recovered"]
    assert events[0]["rule"] == events[1]["rule"] == "poisoned"
    assert events[0]["step"] == events[1]["step"] == r["poisoned_at"][0]
    assert r["w"].policy.rollbacks == 0 and r["batches"] == list(range(len(r["batches"])))
    (tmp_path / "off").mkdir()
    off = _run(tmp_path / "off", steps=40, poison_from=20, flush_every=flush_every)
    assert off["w"].policy.rollbacks == 1     # (the helper turns the hold off)
