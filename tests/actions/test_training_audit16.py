"""The sixteenth round's audit of the training side (real torch runs): mixed precision
(``GradScaler``), modules with buffers, schedulers without a storable state.
docs/recovery.md, "Defects found by the sixteenth round's audit"."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

import lrwatch
from flag_rules import NONFINITE_ROLLBACK, flag_rule, write_flag_rules
from fp16_steps import fp16_step
from run_mean import RunMean
from lrwatch.actions.snapshot import capture_state, load_verified, restore_state
from lrwatch.recovery.policy import Progress, RecoveryConfig, RecoveryPolicy, SnapshotInfo


def _data(i: int, bad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + i)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 2, (16,), generator=g)
    if bad:
        x[0, 0] = float("nan")
    return x, y


def _bn_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(4)
    m = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 2))
    return m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)


def _train_step(m: nn.Module, o: torch.optim.Optimizer, i: int, bad: bool = False
                ) -> torch.Tensor:
    """One step on batch ``i`` (``bad``: with a NaN in it); the loss, detached."""
    x, y = _data(i, bad)
    o.zero_grad()
    loss = nn.functional.cross_entropy(m(x), y)
    loss.backward()
    o.step()
    return loss.detach()


def test_a_dropped_nan_batch_that_poisoned_batchnorm_statistics_is_rolled_back(
        tmp_path: Path) -> None:
    """The guard keeps a NaN batch's step off the parameters, but the forward pass already
    put the batch's statistics into BatchNorm's running mean and variance: they stayed NaN
    for the rest of the run (every evaluation NaN, every later snapshot too), while the
    training loss (batch statistics) looked healthy and nothing fired again. The dropped
    step is rolled back now, and the replay trains as the run that never saw the batch."""
    (tmp_path / "r.yml").write_text(NONFINITE_ROLLBACK)
    n, bad_at = 40, 27
    model, opt = _bn_model()
    w = lrwatch.Watcher(model, opt, rules=str(tmp_path / "r.yml"), flush_every=4,
                        recovery={"good_after": 5, "min_interval": 5, "max_interval": 5,
                                  "cooldown": 0, "replay": True, "start_check": "off"})
    assert w.recorder.guard == "hold"   # (the default on the CPU)
    for i in w.batches(range(n)):
        model.train()
        w.log(loss=_train_step(model, opt, i, bad=i == bad_at and not w.rollbacks))
    w.close()
    bn = model[1]
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()
    assert w.rollbacks == 1
    ref, ref_opt = _bn_model()
    for i in range(n):
        if i != bad_at:
            _train_step(ref, ref_opt, i, bad=False)
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_tainted_drop_is_a_rollback_request_even_without_a_firing() -> None:
    """The policy alone: a dropped step the executor found tainted (non-finite buffers after
    it) asks for a rollback before it, even where no rule fired (a finite gradient spike the
    guard dropped); an untainted drop in a quiet stretch asks for nothing."""
    rc = RecoveryConfig(good_after=5, cooldown=0, sudden_hold=0)
    snaps = [SnapshotInfo(0, True, True), SnapshotInfo(10, True), SnapshotInfo(15, False)]
    policies = [RecoveryPolicy(rc), RecoveryPolicy(rc)]
    for pol in policies:
        pol.state.ever_healthy = True   # (the snapshot of step 10 was promoted)
    quiet = policies[0].plan([], Progress(18, snaps, dropped=[17]))
    assert [p.action for p in quiet] == ["dropped"]
    plans = policies[1].plan([], Progress(18, snaps, tainted=[17]))
    rollback = [p for p in plans if p.action == "rollback"]
    assert len(rollback) == 1 and rollback[0].target == 15 and rollback[0].lr_factor == 1.0
    assert rollback[0].rule == "dropped_tainted"


def _amp_run(watch: bool, n: int, nan_at: int | None = None, bn: bool = False,
             listeners: list = ()) -> tuple[nn.Module, Any, int]:
    """A mixed-precision loop (fp16 autocast on the CPU, a GradScaler whose first scale is
    too high for fp16 gradients and that grows every 8 steps: overflows at the start and
    now and then after)."""
    torch.manual_seed(5)
    layers = [nn.Linear(6, 32)] + ([nn.BatchNorm1d(32)] if bn else []) + [nn.Tanh(),
                                                                          nn.Linear(32, 2)]
    model = nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 22, growth_interval=8)
    w = lrwatch.Watcher(model, opt, scaler=scaler, flush_every=5, listeners=listeners,
                        recovery={"start_check": "off", "good_after": 10, "min_interval": 5,
                                  "max_interval": 5}) if watch else None
    for i in (w.batches(range(n)) if w is not None else range(n)):
        x, y = _data(i, bad=i == nan_at and not (w and w.rollbacks))
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if w is not None:
            w.log(loss=loss.detach())
    if w is not None:
        w.close()
    return model, w, scaler


def test_gradscaler_overflows_are_its_calibration_not_a_failure() -> None:
    """A GradScaler skips a step whose fp16 gradients overflowed and halves its scale: at the
    start (the scale too high) and each time it has grown back too far. Every such step was
    recorded with an infinite gradient norm, and the non-finite rules restarted the run from
    its start with the rate cut x0.1, x0.05, ... (four times in 60 steps), the restore putting
    the scale back up to overflow again. The overflow is left to the scaler now: no rollback,
    the run trained exactly as without the Watcher, the skipped steps recorded as such."""
    got: list = []
    model, w, scaler = _amp_run(True, 60, listeners=[got.append])
    bare, _, bare_scaler = _amp_run(False, 60)
    skipped = [s for s in got if s.values.get("skipped")]
    assert len(skipped) >= 4, [s.step for s in skipped]
    assert all("grad_norm" not in s.values and "nonfinite_grad" not in s.values
               and not s.values.get("grad_dropped") for s in skipped)
    assert w.rollbacks == 0 and not w.should_stop
    assert scaler.get_scale() == bare_scaler.get_scale()
    for (k, a), b in zip(model.state_dict().items(), bare.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_nan_batch_under_a_gradscaler_is_a_dropped_step() -> None:
    """A NaN batch under a GradScaler: the scaler skipped the step, so nothing reached the
    parameters; it is a dropped step (as the guard's), not a rollback. With a BatchNorm the
    batch's statistics went in all the same, and the step is rolled back."""
    got: list = []
    _, w, _ = _amp_run(True, 60, nan_at=40, listeners=[got.append])
    bad = next(s for s in got if s.step == 41)
    assert bad.values["grad_dropped"] == 1.0 and bad.values["nonfinite_loss"] == 1.0
    assert any(e.get("type") == "dropped" for e in bad.events)
    assert w.rollbacks == 0
    model, w, _ = _amp_run(True, 60, nan_at=40, bn=True)
    assert w.rollbacks == 1
    assert torch.isfinite(model[1].running_mean).all()


class _Warmup:
    """A warm-up for LambdaLR kept as a callable object, as schedules with settings often are;
    its ``__dict__`` (the scheduler's state holds it) carries a lambda and a logger."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.floor = lambda s: 0.1            # torch.save cannot write a lambda
        self.log = logging.getLogger("warmup")   # weights_only cannot read a logger back

    def __call__(self, s: int) -> float:
        return max(self.floor(s), min(1.0, (s + 1) / self.steps))


class _LoggedWarmup:
    """A warm-up object whose ``__dict__`` pickles, but holds a logger ``weights_only``
    refuses to read back."""

    def __init__(self, steps: int) -> None:
        self.steps, self.log = steps, logging.getLogger("warmup")

    def __call__(self, s: int) -> float:
        return min(1.0, (s + 1) / self.steps)


class _OwnDecay:
    """A scheduler of one's own: ``step()`` sets the rates, no ``state_dict()``."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt, self.n = opt, 0

    def step(self) -> None:
        self.n += 1
        for g in self.opt.param_groups:
            g["lr"] = 0.05 / (1 + 0.01 * self.n)


def _scheduled_run(tmp_path: Path, make: Callable[[Any], Any], where: str | None
                   ) -> tuple[Any, list[float], nn.Module]:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = make(opt)
    rc: dict[str, Any] = {"cooldown": 0, "sudden_hold": 0, "sudden_margin": 0, "guard": "off",
                          "start_check": "off", "min_interval": 5, "max_interval": 5,
                          "good_after": 3}
    if where is not None:
        rc["snapshot_dir"] = str(tmp_path / where)
    rules = write_flag_rules(tmp_path / "poison.yml", flag_rule("poisoned", "poison"))
    w = lrwatch.Watcher(model, opt, sched, flush_every=1, rules=rules, recovery=rc)
    rates = []
    for i in w.batches(range(30)):
        rates.append(opt.param_groups[0]["lr"])
        loss = _train_step(model, opt, i)
        sched.step()
        w.log(loss=loss, poison=1.0 if w.step == 20 and not w.rollbacks else 0.0)
    w.close()
    return w, rates, model


@pytest.mark.parametrize("kind", ["lambda", "logger", "cyclic", "multiplicative"])
def test_a_scheduler_state_a_snapshot_file_cannot_hold_is_kept_beside_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str) -> None:
    """``snapshot_dir`` with a LambdaLR/MultiplicativeLR whose lambda is a callable object,
    or a CyclicLR whose ``scale_fn`` is one: the scheduler's state holds its ``__dict__``.
    With a lambda in it every snapshot failed to be written (no rollback had anywhere to go:
    the run stopped); with a logger in it the file was written but ``weights_only`` refused
    to read it back, and the rollback failed and stopped the run. That state is kept in
    memory beside each file now, and the run rolls back as with snapshots in memory."""
    sched = torch.optim.lr_scheduler
    make = {"lambda": lambda o: sched.LambdaLR(o, _Warmup(10)),
            "logger": lambda o: sched.LambdaLR(o, _LoggedWarmup(10)),
            "multiplicative": lambda o: sched.MultiplicativeLR(o, _Warmup(10)),
            "cyclic": lambda o: sched.CyclicLR(o, 0.01, 0.1, step_size_up=5,
                                               scale_fn=_Warmup(3))}[kind]
    mem, mem_rates, mem_model = _scheduled_run(tmp_path, make, None)
    with caplog.at_level(logging.WARNING, logger="lrwatch"):
        disk, rates, model = _scheduled_run(tmp_path, make, "snaps")
    assert "kept in memory beside each snapshot" in caplog.text
    assert disk.rollbacks == mem.rollbacks == 1 and not disk.should_stop
    assert disk.store.failed == 0 and disk.store.directory is not None
    assert rates == mem_rates
    for a, b in zip(model.parameters(), mem_model.parameters()):
        assert torch.equal(a, b)


def test_a_scheduler_without_state_dict_leaves_the_snapshots_to_the_rest(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A scheduler of one's own without ``state_dict()`` made every snapshot fail (the
    start's included: "no snapshot to go back to", the run stopped at its first rollback).
    The snapshots hold the rest now, the Watcher says once what is not restored, and the
    rollback is carried out."""
    with caplog.at_level(logging.WARNING, logger="lrwatch"):
        w, _, _ = _scheduled_run(tmp_path, _OwnDecay, None)
    assert "_OwnDecay has no state_dict()/load_state_dict()" in caplog.text
    assert w.rollbacks == 1 and not w.should_stop and w.store.failed == 0


def test_the_range_tests_run_with_a_scheduler_without_state_dict(
        caplog: pytest.LogCaptureFixture) -> None:
    """The range tests keep the run's state to put it back (``lrwatch.lr_find``): with a
    scheduler of one's own the pre-flight check raised ``AttributeError`` inside lrwatch
    (an internal error, counted, a traceback in the log) and never ran."""
    from prometheus_client import generate_latest

    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 2))
    opt = torch.optim.SGD(model.parameters(), lr=5.0, momentum=0.9)
    sched = _OwnDecay(opt)

    def probe(m: nn.Module, b: int) -> torch.Tensor:
        x, y = _data(b)
        return nn.functional.cross_entropy(m(x), y)

    with caplog.at_level(logging.WARNING, logger="lrwatch"):
        w = lrwatch.Watcher(model, opt, sched, flush_every=5, probe_loss=probe,
                            recovery={"lr_check": "auto", "start_check": "off"})
        for i in w.batches(range(12)):
            loss = _train_step(model, opt, i)
            sched.step()
            w.log(loss=loss)
        w.close()
    assert "lrwatch_internal_errors_total 0.0" in generate_latest(w.registry).decode()
    assert "learning-rate check: in a" in caplog.text


@pytest.mark.parametrize("log_first", [False, True])
def test_a_loop_that_clips_records_the_norm_before_clipping_it_logs(log_first: bool) -> None:
    """A plain loop that clips before ``optimizer.step()``: the step hook measures the
    clipped gradients (a norm flat at ``max_norm``: 0.1 at every step here, the 15x spike of
    batch 5 unseen), where ``grad_norm`` is the norm before clipping. The norm the loop
    logs (``clip_grad_norm_``'s) is the step's now; logged before the step it was
    overwritten by the clipped one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    got: list = []
    norms: list[float] = []
    w = lrwatch.Watcher(model, opt, flush_every=5, listeners=[got.append],
                        recovery={"start_check": "off"})
    for i in w.batches(range(10)):
        x, y = _data(i)
        if i == 5:
            x = x * 100
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        norms.append(float(total))
        if log_first:
            w.log(loss=loss.detach(), grad_norm=total)
        opt.step()
        if not log_first:
            w.log(loss=loss.detach(), grad_norm=total)
    w.close()
    assert [s.values["grad_norm"] for s in got] == pytest.approx(norms, rel=1e-6)
    assert max(norms) > 10 * 0.1


def test_parameters_another_optimizer_trains_are_named_at_the_start(
        caplog: pytest.LogCaptureFixture) -> None:
    """A GAN watched through its generator's optimizer, the model holding both networks: a
    rollback put the discriminator's weights back and left its optimizer's moments where
    the abandoned steps had taken them, and nothing said so. The Watcher names such
    parameters once; a model whose trained parameters are all in the optimizer (the rest
    frozen) hears nothing."""
    gan = nn.ModuleDict({"G": nn.Linear(6, 6), "D": nn.Linear(6, 1)})
    with caplog.at_level(logging.WARNING, logger="lrwatch"):
        lrwatch.Watcher(gan, torch.optim.Adam(gan["G"].parameters())).close()
    assert "2 parameter tensor(s) of the model that require gradients" in caplog.text
    assert "D.weight, D.bias" in caplog.text
    caplog.clear()
    gan["D"].requires_grad_(False)
    with caplog.at_level(logging.WARNING, logger="lrwatch"):
        lrwatch.Watcher(gan, torch.optim.Adam(gan["G"].parameters())).close()
        lrwatch.Watcher(gan, torch.optim.Adam(gan["G"].parameters()), recovery=False).close()
    assert "require gradients" not in caplog.text


def _run_mean_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(4)
    m = nn.Sequential(nn.Linear(6, 12), RunMean(12), nn.Tanh(), nn.Linear(12, 2))
    return m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)


@pytest.mark.parametrize("on_disk,guard", [(False, "auto"), (True, "auto"), (False, "off")])
def test_a_rollback_puts_back_a_buffer_the_state_dict_leaves_out(
        tmp_path: Path, on_disk: bool, guard: str) -> None:
    """A buffer registered with ``persistent=False`` was in no snapshot: a NaN batch the
    guard kept off the parameters left the running mean NaN for good, and the tainted-drop
    check passed it over (rolling back would have mended nothing). Snapshots hold such
    buffers now (on disk in the snapshot file), the dropped step is rolled back, and the run
    ends equal to the run that never saw the batch, the buffer included. With the guard off
    the NaN loss's rule rolls back: the weights came back, the running mean stayed NaN."""
    (tmp_path / "r.yml").write_text(NONFINITE_ROLLBACK)
    n, bad_at = 40, 27
    model, opt = _run_mean_model()
    recovery: dict[str, Any] = {"good_after": 5, "min_interval": 5, "max_interval": 5,
                                "cooldown": 0, "replay": True, "start_check": "off",
                                "guard": guard}
    if on_disk:
        recovery["snapshot_dir"] = str(tmp_path / "snaps")
    w = lrwatch.Watcher(model, opt, rules=str(tmp_path / "r.yml"), flush_every=4,
                        recovery=recovery)
    for i in w.batches(range(n)):
        w.log(loss=_train_step(model, opt, i, bad=i == bad_at and not w.rollbacks))
        if on_disk and i == 30:   # (the file holds the buffer: a resumed run's too)
            snap = w.store.latest()
            assert snap.path and "1.avg" in load_verified(snap.path, snap.checksum)["buffers"]
    w.close()
    assert w.rollbacks == 1 and torch.isfinite(model[1].avg).all()
    ref, ref_opt = _run_mean_model()
    for i in range(n):
        if i != bad_at:
            _train_step(ref, ref_opt, i, bad=False)
    assert torch.equal(model[1].avg, ref[1].avg)
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


class _Cache(nn.Module):
    """A cache of its own in a buffer no state_dict holds, grown (rebound) on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.arange(4.0), persistent=False)
        self.register_buffer("count", torch.zeros((), dtype=torch.long), persistent=False)

    def grow(self, n: int) -> None:
        self.table = torch.arange(float(n))


def test_a_snapshot_restores_buffers_the_state_dict_leaves_out_to_its_values() -> None:
    """The restore puts each such buffer back to the snapshot's values: in place where it
    has its shape (the live tensor kept), rebound where it grew since; one the model did not
    have then is left as it is."""
    model = nn.Sequential(nn.Linear(3, 3), _Cache())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = capture_state(model, opt)
    assert set(state["buffers"]) == {"1.table", "1.count"}
    live = model[1].count
    model[1].count += 5
    model[1].grow(9)
    model[1].register_buffer("later", torch.ones(2), persistent=False)
    restore_state(state, model, opt)
    assert model[1].count is live and int(live) == 0
    assert torch.equal(model[1].table, torch.arange(4.0))
    assert torch.equal(model[1].later, torch.ones(2))


def _epoch_run(tmp_path: Path, make: Callable[[Any], Any], poison: bool
               ) -> tuple[Any, list[float], Any]:
    """Five epochs of ten steps, the scheduler stepped at each epoch's end; with ``poison``
    a bad step 22 (in epoch 2) rolls back to the snapshot of step 18 (epoch 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = make(opt)
    rules = write_flag_rules(tmp_path / "poison.yml", flag_rule("poisoned", "poison"))
    w = lrwatch.Watcher(model, opt, sched, flush_every=1, rules=rules,
                        recovery={"cooldown": 0, "sudden_hold": 0, "sudden_margin": 0,
                                  "guard": "off", "start_check": "off", "min_interval": 6,
                                  "max_interval": 6, "good_after": 3, "replay": True})
    ends = []
    for epoch in range(5):
        for i in w.batches(range(epoch * 10, epoch * 10 + 10)):
            w.log(loss=_train_step(model, opt, i),
                  poison=1.0 if poison and w.step == 22 and not w.rollbacks else 0.0)
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(1.0)   # a validation loss that never improves: cut every 2nd epoch
        else:
            sched.step()
        ends.append(opt.param_groups[0]["lr"])
    w.close()
    return w, ends, sched


@pytest.mark.parametrize("kind", ["step", "cosine", "plateau", "chained"])
def test_a_rollback_across_an_epoch_end_keeps_a_per_epoch_schedule_where_the_loop_is(
        tmp_path: Path, kind: str) -> None:
    """A scheduler stepped at each epoch's end, a rollback from epoch 2 to a snapshot in
    epoch 1: the restore put the scheduler back to epoch 1, and no replay steps it again
    (the loop's epoch end is behind it), so the schedule stayed an epoch behind the loop for
    the rest of the run (StepLR halving per epoch ended at 0.00625 instead of 0.003125). It
    keeps the loop's epoch now, as the run without the failure does."""
    s = torch.optim.lr_scheduler
    make = {"step": lambda o: s.StepLR(o, 1, gamma=0.5),
            "cosine": lambda o: s.CosineAnnealingLR(o, T_max=5),
            "plateau": lambda o: s.ReduceLROnPlateau(o, patience=0),
            "chained": lambda o: s.ChainedScheduler([s.StepLR(o, 1, gamma=0.5),
                                                     s.ExponentialLR(o, 0.9)])}[kind]
    _, clean, _ = _epoch_run(tmp_path, make, False)
    w, ends, _ = _epoch_run(tmp_path, make, True)
    assert w.rollbacks == 1
    assert ends == pytest.approx(clean, rel=1e-12)


def _skipping_run(tmp_path: Path, watch: bool, omit: int | None = None
                  ) -> tuple[Any, Any, nn.Module]:
    """40 fp16 steps under a GradScaler whose first scale (2**38) makes the first ones
    overflow (steps 1-19 and 22 skipped), a per-step scheduler the loop steps only where the
    scaler did not skip (its scale did not drop); watched, a flag at step 22 rolls back to
    the snapshot of step 18 (two of the four steps since it skipped); ``omit``: a batch the
    loop leaves out (the run without the failed step)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.97)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 38, growth_interval=10000)
    w = lrwatch.Watcher(
        model, opt, sched, scaler=scaler, flush_every=1,
        rules=write_flag_rules(tmp_path / "poison.yml", flag_rule("poisoned", "poison")),
        recovery={"cooldown": 0, "sudden_hold": 0, "sudden_margin": 0, "guard": "off",
                  "start_check": "off", "min_interval": 6, "max_interval": 6,
                  "good_after": 3, "replay": True}) if watch else None
    for i in (w.batches(range(40)) if w is not None else range(40)):
        if i == omit:
            continue
        loss, applied = fp16_step(model, opt, scaler, *_data(i))
        if applied:
            sched.step()
        if w is not None:
            w.log(loss=loss.detach(), poison=float(w.step == 22 and not w.rollbacks))
    if w is not None:
        w.close()
    return w, sched, model


def test_a_rollback_over_steps_the_scaler_skipped_restores_a_per_step_schedule(
        tmp_path: Path) -> None:
    """A per-step scheduler stepped only on the steps the GradScaler applied, a rollback over
    a window the scaler mostly skipped (an fp16 run's first steps): stepped twice over four
    steps, it was read as per-epoch and kept where the loop was, and the replayed steps
    stepped it again (two steps ahead of the run without the failed step at the end). The
    cadence is read against the steps applied now: restored, and the run ends as the run
    that never saw the failed step's batch."""
    w, sched, model = _skipping_run(tmp_path, True)
    assert w.rollbacks == 1
    _, ref_sched, ref = _skipping_run(tmp_path, False, omit=21)
    assert sched.last_epoch == ref_sched.last_epoch
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.slow
def test_under_ddp_each_rank_gets_back_its_own_buffer_the_state_dict_leaves_out(
        tmp_path: Path) -> None:
    """2 gloo ranks, DDP without buffer broadcast (each rank its own running mean in a
    ``persistent=False`` buffer), a NaN input on the last rank: every rank rolls back to its
    own snapshot, its own running mean included (before, the last rank's stayed NaN), and
    ends as the run without the batch."""
    import json

    import dist_buffers16_workers as dw
    from ranks import spawn_ranks

    spawn_ranks(dw.loose_buffer_rollback,
                args=(2, str(tmp_path / "store"), str(tmp_path), 30, 17), nprocs=2)
    r = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in range(2)]
    for x in r:
        assert x["rollbacks"] == 1 and x["finite"] and x["avg_equal"] and x["weights_equal"], x
    assert r[0]["avg"] != r[1]["avg"]   # (each rank's own)


@pytest.mark.parametrize("as_tensor,on_disk", [(False, False), (True, False), (True, True)])
def test_restore_best_puts_back_a_buffer_the_state_dict_leaves_out(
        tmp_path: Path, as_tensor: bool, on_disk: bool) -> None:
    """The best evaluated state held the model's ``state_dict()`` only: after
    ``restore_best()`` the weights were the best step's and a ``persistent=False`` running
    mean was the end of the run's. It holds such buffers now (in the file with a
    ``snapshot_dir``), and two evaluations of one flush (tensors) keep the winner's."""
    model, opt = _run_mean_model()
    kw: dict[str, Any] = {"rules": None, "keep_best": "eval_loss", "flush_every": 8}
    if on_disk:
        kw["recovery"] = {"snapshot_dir": str(tmp_path / "snaps"), "start_check": "off"}
    w = lrwatch.Watcher(model, opt, **kw)
    seen: dict[int, tuple[dict[str, torch.Tensor], torch.Tensor]] = {}
    for i in w.batches(range(40)):
        loss = _train_step(model, opt, i, bad=False)
        if i % 3 == 2:   # a made-up evaluation, best at step 14, worse after
            value = 0.5 + abs(i - 14) / 10
            seen[i] = ({k: v.clone() for k, v in model.state_dict().items()},
                       model[1].avg.clone())
            w.log(loss=loss, eval_loss=torch.tensor(value) if as_tensor else value)
        else:
            w.log(loss=loss)
    w.close()
    assert w.best_eval is not None and w.best_eval.step == 15   # (batch 14 is step 15)
    assert (w.best_eval.where != "memory") == on_disk
    weights, avg = seen[14]
    assert not torch.equal(model[1].avg, avg)
    w.restore_best()
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert torch.equal(model[1].avg, avg)


def test_a_best_state_kept_without_its_loose_buffers_still_restores(tmp_path: Path) -> None:
    """A best state file written before the buffers were kept (a plain state dict) loads the
    weights and leaves the ``persistent=False`` buffer as it is."""
    from lrwatch.actions.best import BestState, model_state
    model, _ = _run_mean_model()
    old = BestState("eval_loss", directory=tmp_path)
    old.offer(10, 0.5, model.state_dict)
    assert not any(k.startswith("<") for k in load_verified(
        old.record.where, old.state_dict()["best"]["sha256"]))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].avg.fill_(3.0)
    assert old.restore(model) is not None
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert torch.equal(model[1].avg, torch.full((12,), 3.0))
    assert set(model_state(model)) == set(weights) | {
        "<lrwatch persistent=False buffer>.1.avg"}


@pytest.mark.slow
def test_under_ddp_restore_best_puts_back_each_rank_its_own_loose_buffer(
        tmp_path: Path) -> None:
    """2 gloo ranks, DDP without buffer broadcast (each rank its own running mean in a
    ``persistent=False`` buffer), the best state on disk, a file per rank: ``restore_best()``
    gives every rank the best step's weights and its own running mean of then (before, the
    end of the run's)."""
    import json

    import dist_buffers16_workers as dw
    from ranks import spawn_ranks

    spawn_ranks(dw.loose_buffer_best,
                args=(2, str(tmp_path / "store"), str(tmp_path), 30, 14), nprocs=2)
    r = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in range(2)]
    for k, x in enumerate(r):
        assert x["where"] == f"best-eval.rank{k}.pt" and x["moved"], x
        assert x["avg_equal"] and x["weights_equal"], x
    assert r[0]["avg"] != r[1]["avg"]   # (each rank's own)


def test_a_loose_cache_that_grew_between_two_pending_evaluations_keeps_the_first() -> None:
    """Two tensor evaluations before one flush, a ``persistent=False`` cache grown (rebound)
    between them: the merge of the pending copy cannot take the winner's without a sync, so
    it keeps the first one's (no error, the run's best still kept), and the restore rebinds
    the cache to it; the weights are the winner's."""
    from lrwatch.actions.best import BestState, model_state
    model = nn.Sequential(nn.Linear(3, 3), _Cache())
    best = BestState("eval_loss")
    best.offer(1, torch.tensor(0.5), lambda: model_state(model))
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[1].grow(9)
    best.offer(2, torch.tensor(0.4), lambda: model_state(model))
    weights = model[0].weight.clone()
    record = best.decide_at_flush([0.5, 0.4])
    assert record is not None and record.step == 2
    model[1].grow(2)
    with torch.no_grad():
        model[0].weight.zero_()
    best.restore(model)
    assert torch.equal(model[0].weight, weights)
    assert torch.equal(model[1].table, torch.arange(4.0))
