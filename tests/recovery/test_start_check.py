"""The start check (``RecoveryConfig.start_check``, on by default): after the first steps, a
shadow of the run started again at a tenth of its rate on the same batches, both scored on the
next batches; the shadow is adopted only when it is better with 95% confidence. It must leave
no trace when the rate stands, lose or repeat no batch, and be booked against the budget."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from torch import nn

import lrwatch
from shadow_checks import (assert_equals_reference, assert_replay_equals_live, check_events,
                          train_watched)
from lrwatch.errors import ConfigError
from lrwatch.exporters.trace import read_trace
from lrwatch.recovery.policy import RecoveryConfig, RecoveryPolicy
from lrwatch.recovery.start_check import (check_cost, compare, first_reason, skip_reason,
                                          worst_ratio)

#: the shadow trained whatever the run's first steps did (the gate off), for the tests of
#: the shadow itself; the gate has tests of its own below
ALWAYS = {"start_check_gate": 0}


def _setup(lr: float, seed: int = 0, n: int = 60, momentum: float = 0.9) -> tuple:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(20, 4, generator=g)
    batches = []
    for _ in range(n):
        x = torch.randn(32, 20, generator=g)
        batches.append((x, (x @ truth).argmax(1)))
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum), batches


def _loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _events(path: Path) -> list[dict]:
    return check_events(path, "start_check")


# -- the decision (pure) ---------------------------------------------------------------------

def test_false_adoption_rate_is_the_stated_one_when_both_models_are_equally_good() -> None:
    """Under the null (paired losses with the same mean) the one-sided test at 95% adopts the
    shadow in 5% of checks: 6 held-out batches, batch difficulty shared by both models."""
    rng = random.Random(7)
    trials, adopted = 20_000, 0
    for _ in range(trials):
        hard = [rng.gauss(2.0, 0.5) for _ in range(6)]
        real = [h + rng.gauss(0, 0.1) for h in hard]
        shadow = [h + rng.gauss(0, 0.1) for h in hard]
        adopted += compare(real, shadow).adopt
    assert 0.044 < adopted / trials < 0.056, adopted / trials


def test_a_clearly_better_shadow_is_adopted_and_a_worse_one_never() -> None:
    rng = random.Random(3)
    for _ in range(200):
        hard = [rng.gauss(2.0, 0.5) for _ in range(6)]
        better = [h - 0.5 + rng.gauss(0, 0.05) for h in hard]
        assert compare(hard, better).adopt
        assert not compare(better, hard).adopt


def test_non_finite_losses_and_bad_input() -> None:
    inf, nan = float("inf"), float("nan")
    assert compare([inf, inf], [1.0, 1.2]).adopt                 # the run blew up
    assert not compare([1.0, 1.2], [nan, 1.0]).adopt             # the shadow did
    assert not compare([inf, 1.0], [inf, 1.0]).adopt             # both: nothing to gain
    assert not compare([2.0], [1.0]).adopt                       # one batch: no test
    with pytest.raises(ValueError, match="one loss per held-out batch"):
        compare([1.0, 2.0], [1.0])


def test_policy_runs_the_check_once_books_it_and_resumes_without_it() -> None:
    policy = RecoveryPolicy(RecoveryConfig())
    assert policy.start_check_due(0) and not policy.start_check_due(5)
    v = policy.start_checked(14, [2.0, 2.1, 2.2, 2.0], [1.0, 1.1, 1.0, 1.2])
    assert v is not None and v.adopt
    st = policy.state
    assert st.start_checked and st.probe_steps == 14 and st.probes == 1
    assert not policy.start_check_due(0)
    resumed = RecoveryPolicy(RecoveryConfig())
    resumed.load_state_dict(policy.state_dict())
    assert not resumed.start_check_due(0) and resumed.state.probe_steps == 14
    off = RecoveryPolicy(RecoveryConfig(start_check="off"))
    assert not off.start_check_due(0)


def test_configuration_errors_say_what_to_fix() -> None:
    with pytest.raises(ConfigError, match="start_check must be"):
        RecoveryConfig(start_check="on")
    with pytest.raises(ConfigError, match="start_check_steps"):
        RecoveryConfig(start_check_steps=1)
    with pytest.raises(ConfigError, match="start_check_batches"):
        RecoveryConfig(start_check_batches=True)
    with pytest.raises(ConfigError, match="start_check_confidence"):
        RecoveryConfig(start_check_confidence=1.0)
    for bad in (0, -1.0, float("nan"), float("inf"), True, "1.0"):
        with pytest.raises(ConfigError, match="clip_grad_norm must be None or a positive"):
            RecoveryConfig(clip_grad_norm=bad)


# -- on a real run ---------------------------------------------------------------------------

def test_a_rate_far_too_high_goes_on_from_the_shadow_at_a_tenth(tmp_path: Path) -> None:
    model, opt, batches = _setup(lr=3.0)
    trace = tmp_path / "t.jsonl"
    w = lrwatch.Watcher(model, opt, flush_every=5, trace=trace, probe_loss=_loss,
                        recovery=ALWAYS)
    seen = train_watched(_loss, w, model, opt, batches)
    w.close()
    assert len(seen) == len(batches) and all(a is b for a, b in zip(seen, batches))
    ev = _events(trace)
    assert len(ev) == 1 and ev[0]["lr_factor"] == 0.1 and ev[0]["step"] == 10, ev
    assert ev[0]["shadow_loss"] < ev[0]["held_out_loss"]
    assert ev[0]["cost_steps"] == 10 + 4          # 10 shadow steps, 12 forwards at a third
    assert w.policy.state.probe_steps >= 14
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the rate a restart would go back to is the adopted one
    pinned = [s for s in w.store.snapshots if s.pinned]
    assert len(pinned) == 1
    assert pinned[0].load()["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.3)
    # the detectors start afresh from the run's start (the event carries their state, and
    # the replay, which reads it, gives the live firings)
    assert isinstance(ev[0].get("engine_state"), dict)
    assert_replay_equals_live(trace)


def test_the_adopted_run_is_the_shadow_trained_from_the_start_at_a_tenth() -> None:
    """Going on from the shadow is the same as having trained at a tenth from the start on the
    same batches (the held-out batches are trained on after the check, in their place)."""
    model, opt, batches = _setup(lr=3.0, n=30)
    w = lrwatch.Watcher(model, opt, flush_every=5, probe_loss=_loss, recovery=ALWAYS)
    train_watched(_loss, w, model, opt, batches)
    w.close()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.3)
    ref, ref_opt, _ = _setup(lr=0.3, n=30)
    assert_equals_reference(_loss, model, ref, ref_opt, batches)


def test_the_shadow_clips_its_gradients_as_the_run_does() -> None:
    """A loop that clips its gradients says so (``clip_grad_norm``): the shadow clips the
    same, and the adopted run is the clipped run at a tenth of the rate, bit for bit."""
    runs = []
    for lr, check in ((10.0, "auto"), (1.0, "off")):
        model, opt, batches = _setup(lr=lr, n=30)
        w = lrwatch.Watcher(model, opt, flush_every=5, probe_loss=_loss,
                            recovery={**ALWAYS, "start_check": check, "clip_grad_norm": 0.5})
        events: list = []
        w.add_listener(lambda smp: events.extend(e for e in smp.events
                                                 if e.get("type") == "start_check"))
        for b in w.batches(batches):
            loss = _loss(model, b)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            w.log(loss=loss.detach())
        w.close()
        runs.append((model, opt, events))
    (hot, hot_opt, ev), (ref, ref_opt, _) = runs
    assert len(ev) == 1 and ev[0]["lr_factor"] == 0.1
    assert hot_opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])
    assert all(torch.equal(a, b) for a, b in zip(hot.parameters(), ref.parameters()))


def test_a_good_rate_stands_and_the_check_leaves_no_trace(tmp_path: Path) -> None:
    runs = []
    for check in ("auto", "off"):
        model, opt, batches = _setup(lr=0.05)
        w = lrwatch.Watcher(model, opt, flush_every=5, trace=tmp_path / f"{check}.jsonl",
                            probe_loss=_loss, recovery={**ALWAYS, "start_check": check})
        seen = train_watched(_loss, w, model, opt, batches)
        w.close()
        assert len(seen) == len(batches)
        runs.append([p.detach().clone() for p in model.parameters()])
        assert opt.param_groups[0]["lr"] == 0.05
    for a, b in zip(*runs):
        assert torch.equal(a, b)                   # bit for bit the run without the check
    ev = _events(tmp_path / "auto.jsonl")
    assert len(ev) == 1 and ev[0]["lr_factor"] == 1.0 and "paired t" in ev[0]["reason"]
    assert _events(tmp_path / "off.jsonl") == []


def test_a_schedule_keeps_its_shape_scaled() -> None:
    model, opt, batches = _setup(lr=3.0, n=30)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    w = lrwatch.Watcher(model, opt, sched, flush_every=5, probe_loss=_loss, recovery=ALWAYS)
    rates = []
    for b in w.batches(batches):
        rates.append(opt.param_groups[0]["lr"])
        loss = _loss(model, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        w.log(loss=loss.detach())
    w.close()
    assert sched.base_lrs[0] == pytest.approx(0.3)
    assert rates[9] == pytest.approx(3.0 * 10 / 20)            # the run's own 10th step
    assert rates[10] == pytest.approx(0.3 * 11 / 20)           # from the check on: scaled
    assert rates[-1] == pytest.approx(0.3)


def test_skipped_without_enough_batches_or_with_several_batches_per_step(
        tmp_path: Path) -> None:
    model, opt, batches = _setup(lr=3.0, n=12)                  # 10 + 6 needed
    w = lrwatch.Watcher(model, opt, flush_every=5, probe_loss=_loss, trace=tmp_path / "a.jsonl",
                        recovery=ALWAYS)
    assert len(train_watched(_loss, w, model, opt, batches)) == 12
    w.close()
    assert w.policy.state.start_checked and w.policy.state.probe_steps == 0
    assert opt.param_groups[0]["lr"] == 3.0 and _events(tmp_path / "a.jsonl") == []

    model, opt, batches = _setup(lr=3.0)
    w = lrwatch.Watcher(model, opt, flush_every=5, probe_loss=_loss)
    seen = 0
    for i, b in enumerate(w.batches(batches)):       # two batches per optimizer step
        seen += 1
        (_loss(model, b) / 2).backward()
        if i % 2:
            opt.step()
            opt.zero_grad()
            w.log(loss=torch.tensor(1.0))
    w.close()
    assert seen == len(batches)
    assert w.policy.state.start_checked and w.policy.state.probe_steps == 0
    assert opt.param_groups[0]["lr"] == 3.0


def test_without_probe_loss_there_is_no_check() -> None:
    model, opt, batches = _setup(lr=3.0, n=20)
    w = lrwatch.Watcher(model, opt, flush_every=5)
    assert len(train_watched(_loss, w, model, opt, batches)) == 20
    w.close()
    assert not w.policy.state.start_checked and w.policy.state.probe_steps == 0


def test_skipped_with_a_warning_when_its_copies_would_not_fit_in_host_memory(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        tmp_path: Path) -> None:
    """A large model's copies would take the host's memory from under the run: the check
    says so and does not run (here the host is made to have 1 KiB available)."""
    import logging
    from lrwatch.actions import host_memory
    monkeypatch.setattr(host_memory, "host_available_bytes", lambda: 1024)
    fits, why = host_memory.copies_fit(*_setup(lr=3.0)[:2], 2)
    assert not fits and "2 copies of the run's weights and optimizer state" in why
    model, opt, batches = _setup(lr=0.05, n=30)   # (snapshots are skipped too: no rollback)
    w = lrwatch.Watcher(model, opt, flush_every=5, probe_loss=_loss, trace=tmp_path / "t.jsonl",
                        recovery=ALWAYS)
    with caplog.at_level(logging.WARNING, logger="lrwatch"):
        seen = train_watched(_loss, w, model, opt, batches)
    w.close()
    assert "start check skipped (2 copies" in caplog.text
    assert len(seen) == 30 and w.policy.state.probe_steps == 0
    assert w.policy.state.start_checked and not _events(tmp_path / "t.jsonl")


def test_the_memory_need_counts_an_optimizer_state_not_made_yet(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the first step the optimizer holds no state yet; the need counts two tensors
    per parameter for it (Adam's), so each copy is 3x the weights, and the copies may take
    half of the memory available."""
    from lrwatch.actions import host_memory as hm
    model, _, _ = _setup(lr=0.1)
    adam = torch.optim.Adam(model.parameters())
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    need = 2 * 3 * n
    monkeypatch.setattr(hm, "host_available_bytes", lambda: 2 * need)
    assert hm.copies_fit(model, adam, 2)[0]
    monkeypatch.setattr(hm, "host_available_bytes", lambda: 2 * need - 2)
    assert not hm.copies_fit(model, adam, 2)[0]
    monkeypatch.setattr(hm, "host_available_bytes", lambda: None)   # unknown: fits
    assert hm.copies_fit(model, adam, 10 ** 9)[0]


def test_the_rules_judge_the_run_s_first_steps_before_the_check(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A run that blows up within its first 10 steps: the rules see it at the check (not at
    the next flush, after it) and restart it at a tenth; the check, which would only repeat
    that restart, is skipped. Before, the check adopted its shadow, and the firings on the
    discarded steps then restarted the adopted run once more: a hundredth of the rate."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    g = torch.Generator().manual_seed(1)
    truth = torch.randn(10, 1, generator=g)
    batches = []
    for _ in range(60):
        x = torch.randn(32, 10, generator=g)
        batches.append((x, x @ truth + 0.1 * torch.randn(32, 1, generator=g)))

    def mse(m: nn.Module, b: tuple) -> torch.Tensor:
        return nn.functional.mse_loss(m(b[0]), b[1])

    trace = tmp_path / "t.jsonl"
    w = lrwatch.Watcher(model, opt, trace=trace, probe_loss=mse)
    with caplog.at_level("INFO", logger="lrwatch"):
        for b in w.batches(batches):
            opt.zero_grad()
            loss = mse(model, b)
            loss.backward()
            opt.step()
            w.log(loss=loss.detach())
        w.close()
    assert "start check skipped (the rules acted on the run's first steps)" in caplog.text
    assert not _events(trace)
    restarts = [e for rec in read_trace(trace) for e in rec.events
                if isinstance(e, dict) and e.get("type") == "rollback"]
    assert len(restarts) == 1 and restarts[0]["step"] <= 10 and restarts[0]["to_step"] == 0
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    assert w.policy.state.start_checked and w.rollbacks == 1


def test_scoring_a_model_leaves_its_buffers_as_they_were() -> None:
    """The check scores the run and the shadow on held-out batches with the modules in their
    training mode (batch norm normalises with the batch's statistics, as in a step); those
    forwards are not training steps, so batch norm's running statistics and any counter a
    forward keeps are put back. Before, an adopted shadow carried 6 extra updates."""
    from lrwatch.recovery.lr_find import reference_loss

    class Counted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.Linear(16, 4))
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.net(x)

    torch.manual_seed(0)
    model = Counted()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = (torch.randn(32, 20), torch.randint(0, 4, (32,)))
    loss = reference_loss(model, _loss, batch)
    assert loss == pytest.approx(reference_loss(model, _loss, batch))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training


# -- the gate before the shadow (RecoveryConfig.start_check_gate) -----------------------------

def test_worst_ratio_reads_the_steps_after_the_first_against_the_same_batches() -> None:
    untouched = [2.0, 2.0, 4.0, 1.0]
    assert worst_ratio([2.0, 1.9, 3.0, 0.9], untouched) == pytest.approx(0.95)
    assert worst_ratio([2.0, 1.9, 3.0, 1.5], untouched) == pytest.approx(1.5)
    assert worst_ratio([2.0, float("nan"), 3.0, 0.9], untouched) == math.inf
    # nothing to read: too short, a bad untrained loss, or a first step that does not match
    # the untouched network on its own batch (the logged loss a sum, the level a mean)
    assert worst_ratio([2.0], [2.0]) is None
    assert worst_ratio([2.0, 1.0], [2.0, 0.0]) is None
    assert worst_ratio([64.0, 60.0, 120.0, 30.0], untouched) is None
    assert worst_ratio([float("nan"), 1.0], [2.0, 2.0]) is None
    with pytest.raises(ConfigError, match="start_check_gate"):
        RecoveryConfig(start_check_gate=-1)


def test_the_reasons_to_skip_the_check_and_its_cost_are_decided_on_plain_numbers() -> None:
    # 10 steps on 10 batches, 5 held out drawn: the check runs
    assert skip_reason(10, 5, 10, 10, 5, False, False) is None
    assert skip_reason(9, 5, 9, 10, 5, False, False) == "too few batches"
    assert skip_reason(10, 4, 10, 10, 5, True, True) == "too few batches"
    assert skip_reason(10, 5, 10, 10, 5, True, True) == "the run stopped"
    assert skip_reason(10, 5, 10, 10, 5, False, True) == "lrwatch rolled the run back meanwhile"
    assert skip_reason(10, 5, 5, 10, 5, False, False) == (
        "5 logged steps on its first 10 batches, not one per batch")
    # every rank agrees: this rank's own reason, else the first rank's that has one
    assert first_reason(None, [None, None]) is None
    assert first_reason("mine", [None, "mine", "other"]) == "mine"
    assert first_reason(None, [None, "too few batches", "x"]) == "rank 1: too few batches"
    # the shadow's steps, and its forwards at a third of a step each, rounded up
    assert check_cost(10, 0, 1 / 3) == 10
    assert check_cost(10, 6, 1 / 3) == 12
    assert check_cost(0, 7, 1 / 3) == 3


def test_a_run_whose_steps_made_no_batch_worse_keeps_its_rate_at_no_cost(tmp_path: Path) -> None:
    """A good rate: the gate reads the first steps against the untouched network, trains no
    shadow, books nothing, and the run is bit for bit the run without any check."""
    runs = {}
    for check in ("auto", "off"):
        model, opt, batches = _setup(lr=0.05)
        trace = tmp_path / f"{check}.jsonl"
        w = lrwatch.Watcher(model, opt, flush_every=5, trace=trace, probe_loss=_loss,
                            recovery={"start_check": check})
        train_watched(_loss, w, model, opt, batches)
        w.close()
        runs[check] = (w, [p.detach().clone() for p in model.parameters()], _events(trace))
    w, weights, ev = runs["auto"]
    assert len(ev) == 1 and ev[0]["steps"] == 0 and ev[0]["cost_steps"] == 0, ev
    assert ev[0]["lr_factor"] == 1.0 and ev[0]["worst_ratio"] <= 1.05
    assert "no shadow" in ev[0]["reason"] and w.policy.state.probe_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(weights, runs["off"][1]))


def test_a_rate_that_made_a_batch_worse_opens_the_gate(tmp_path: Path) -> None:
    model, opt, batches = _setup(lr=3.0)
    trace = tmp_path / "t.jsonl"
    w = lrwatch.Watcher(model, opt, flush_every=5, trace=trace, probe_loss=_loss)
    train_watched(_loss, w, model, opt, batches)
    w.close()
    ev = _events(trace)
    assert len(ev) == 1 and ev[0]["lr_factor"] == 0.1 and ev[0]["cost_steps"] == 14, ev


def test_a_probe_loss_on_another_scale_leaves_the_gate_open(tmp_path: Path) -> None:
    """probe_loss sums where the loop logs a mean: step 1's pair disagrees, the ratio means
    nothing, and the shadow decides as before."""
    model, opt, batches = _setup(lr=0.05)
    trace = tmp_path / "t.jsonl"

    def summed(m: nn.Module, b: tuple) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1], reduction="sum")

    w = lrwatch.Watcher(model, opt, flush_every=5, trace=trace, probe_loss=summed)
    train_watched(_loss, w, model, opt, batches)
    w.close()
    ev = _events(trace)
    assert len(ev) == 1 and ev[0]["steps"] == 10 and "held_out_loss" in ev[0], ev


def test_batches_are_the_same_only_when_every_value_is() -> None:
    from lrwatch.recovery.shadow import same_batches

    x = torch.arange(6.0).reshape(2, 3)
    assert same_batches([(x, {"y": torch.tensor([1, 2])})], [(x.clone(), {"y": torch.tensor([1, 2])})])
    assert not same_batches([(x, 1)], [(x + 1, 1)])
    assert not same_batches([x], [x.double()])          # dtype
    assert not same_batches([x], [x, x])                # length
    assert not same_batches({"a": x}, {"b": x})


def test_the_gate_reads_the_first_steps_whatever_the_untrained_batches_are(tmp_path: Path) -> None:
    """16 untrained batches, a check after 10 steps: the gate compares the 10 pairs there are
    (it stood aside before); a loss below zero (a log-likelihood) leaves the gate open."""
    model, opt, batches = _setup(lr=0.05)
    trace = tmp_path / "t.jsonl"
    w = lrwatch.Watcher(model, opt, flush_every=5, trace=trace, probe_loss=_loss,
                        untrained_batches=16)
    train_watched(_loss, w, model, opt, batches)
    w.close()
    ev = _events(trace)
    assert len(ev) == 1 and ev[0]["steps"] == 0 and ev[0]["worst_ratio"] <= 1.05, ev
    assert w._untrained_inputs == [] and w._early_losses is None   # nothing kept after it
    assert worst_ratio([0.5, -1e6, 0.45], [0.5, 0.5, 0.5]) is None


def test_a_skipped_check_keeps_nothing_for_the_gate() -> None:
    model, opt, batches = _setup(lr=0.05, n=14)       # fewer than the check needs
    w = lrwatch.Watcher(model, opt, flush_every=5, probe_loss=_loss)
    train_watched(_loss, w, model, opt, batches)
    w.close()
    assert w._untrained_inputs == [] and w._early_losses is None and w._untrained_each == []


def _adapter_run(tmp_path: Path, name: str, lr: float, untrained: list | None,
                 **recovery: object) -> tuple:
    """Drive the Watcher as a framework callback does (the framework draws the data): the
    untrained loss on ``untrained`` (or none at all: an iterable dataset), each batch handed
    to ``start_check_batch`` before its step, the step logged at the boundary."""
    model, opt, batches = _setup(lr=lr)
    trace = tmp_path / f"{name}.jsonl"
    w = lrwatch.Watcher(model, opt, flush_every=5, trace=trace, probe_loss=_loss,
                        step_hooks=False, recovery=dict(recovery))
    if untrained is not None:
        w.measure_untrained(untrained)
    for b in batches:
        w.start_check_batch(b)
        loss = _loss(model, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        w.after_step()   # the adapter's optimizer step hook
        w.log(loss=loss.detach())
        w.start_check_boundary()
    w.close()
    return w, [p.detach().clone() for p in model.parameters()], _events(trace)


@pytest.mark.parametrize("untrained", ["other", "none"])
def test_the_gate_measures_the_untouched_network_where_the_adapter_drew_other_batches(
        tmp_path: Path, untrained: str) -> None:
    """The untrained loss measured on a sample that is not the run's first batches (the
    transformers callback's), or not at all (an iterable dataset): the gate puts the start
    state back in, scores the run's own first 8 batches, books those 8 forwards (3 steps),
    trains no shadow and leaves the run bit for bit as without the check."""
    other = _setup(lr=0.05, seed=5, n=8)[2] if untrained == "other" else None
    w, weights, ev = _adapter_run(tmp_path, "good", 0.05, other)
    _, off, none = _adapter_run(tmp_path, "off", 0.05, other, start_check="off")
    assert none == [] and len(ev) == 1, ev
    assert ev[0]["steps"] == 0 and ev[0]["worst_ratio"] <= 1.05 and "no shadow" in ev[0]["reason"]
    assert ev[0]["cost_steps"] == w.policy.state.probe_steps == 3
    assert all(torch.equal(a, b) for a, b in zip(weights, off))
    # a rate far too high opens the gate: the shadow runs and the gate's forwards are booked
    w, _, ev = _adapter_run(tmp_path, "hot", 2.0, other)
    assert len(ev) == 1 and ev[0]["lr_factor"] == 0.1, ev
    assert ev[0]["steps"] == 16 and ev[0]["cost_steps"] == 16 + math.ceil((12 + 8) / 3)
