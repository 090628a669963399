"""The measured untrained loss: the Watcher scores the untouched model on the first batches
before the first step, records the mean as ``untrained_loss`` in step 1, leaves everything as it
was, and the start-level detectors judge against it (``given: untrained_loss``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lrwatch
from lrwatch.errors import ConfigError
from lrwatch.rules import Engine, RuleSet, load_pack
from lrwatch.rules.detectors import Baseline, StartRatio, Untrained
from lrwatch.samples import Sample
from lrwatch.untrained import measure_untrained_loss


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3),
                         nn.Linear(16, 3))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g) * (1 + i), torch.randint(0, 3, (8,), generator=g))
            for i in range(n)]


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_the_measurement_is_the_median_and_leaves_model_buffers_and_rng_as_they_were() -> None:
    model, batches = _model(), _batches(5)
    buffers = [b.clone() for b in model.buffers()]
    params = [p.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    got = measure_untrained_loss(model, batches, _loss)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    # the same forwards, in training mode (dropout on) from the same generator state
    want = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for b in batches:
            want.append(float(_loss(model, b)))
    for b, saved in zip(model.buffers(), buffers):
        b.copy_(saved)
    assert got is not None and float(got) == pytest.approx(sorted(want)[2], rel=1e-6)
    four = measure_untrained_loss(model, batches[:4], _loss)   # even: the two middle values
    middle = sorted(want[:4])[1:3]
    assert four is not None and float(four) == pytest.approx(sum(middle) / 2, rel=1e-6)
    assert measure_untrained_loss(model, [], _loss) is None


def _train(w: lrwatch.Watcher, model: nn.Module, opt: torch.optim.Optimizer,
           batches: list) -> list:
    seen = []
    for b in w.batches(batches):
        seen.append(b)
        opt.zero_grad()
        loss = _loss(model, b)
        loss.backward()
        opt.step()
        w.log(loss=loss)
    w.close()
    return seen


def test_the_watcher_records_it_in_step_1_and_trains_on_every_batch_in_order() -> None:
    model, batches = _model(), _batches(12)
    want = float(measure_untrained_loss(model, batches[:4], _loss))  # type: ignore[arg-type]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    got: list[Sample] = []
    w = lrwatch.Watcher(model, opt, flush_every=5, probe_loss=_loss, untrained_batches=4,
                        listeners=[got.append], rules=None, recovery=False)
    seen = _train(w, model, opt, batches)
    assert [id(b) for b in seen] == [id(b) for b in batches]
    assert got[0].step == 1 and got[0].values["untrained_loss"] == pytest.approx(want, rel=1e-6)
    assert all("untrained_loss" not in s.values for s in got[1:])
    assert w.data_position == 12


def test_the_same_run_trains_exactly_as_without_the_measurement() -> None:
    finals = []
    for n in (0, 8):
        model, batches = _model(), _batches(12)
        torch.manual_seed(5)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        w = lrwatch.Watcher(model, opt, flush_every=4, probe_loss=_loss, untrained_batches=n,
                            rules=None, recovery=False)
        _train(w, model, opt, batches)
        finals.append([p.detach().clone() for p in [*model.parameters(), *model.buffers()]])
    assert all(torch.equal(a, b) for a, b in zip(*finals))


def test_no_probe_loss_or_zero_batches_means_no_measurement_and_bad_values_are_refused() -> None:
    for kw in ({}, {"probe_loss": _loss, "untrained_batches": 0}):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        got: list[Sample] = []
        w = lrwatch.Watcher(model, opt, flush_every=5, listeners=[got.append], rules=None,
                            recovery=False, **kw)
        _train(w, model, opt, _batches(6))
        assert all("untrained_loss" not in s.values for s in got), kw
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for bad in (-1, 2.5, True, "8"):
        with pytest.raises(ConfigError, match="untrained_batches"):
            lrwatch.Watcher(model, opt, untrained_batches=bad)  # type: ignore[arg-type]


def test_a_failing_measurement_is_counted_and_the_run_goes_on() -> None:
    def broken(model: nn.Module, batch: object) -> torch.Tensor:
        raise RuntimeError("user code failed")
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    got: list[Sample] = []
    w = lrwatch.Watcher(model, opt, flush_every=5, probe_loss=broken, listeners=[got.append],
                        rules=None, recovery=False)
    seen = _train(w, model, opt, _batches(6))
    assert len(seen) == 6 and len(got) == 6
    assert w.exporter.internal_errors._value.get() == 1


def test_start_level_detectors_take_the_measured_level() -> None:
    # the first batch read 0.74 where the untrained network's loss is 1.0: a run at 0.8 is
    # learning, not flat "at or above its untrained level"
    losses = [0.74] + [0.8] * 40
    det = Untrained(window=20, above=1.0)
    assert any(det.update(x) for x in losses)
    det = Untrained(window=20, above=1.0)
    assert not any(det.update_given(x, 1.0) for x in losses)
    # without a measurement (not seen yet, NaN, zero) the first values set the level
    sr = StartRatio(above=2.0)
    assert [sr.update_given(x, g) for x, g in [(1.0, None), (2.5, float("nan")), (1.5, 0.0)]] \
        == [None, True, False]
    sr = StartRatio(above=2.0)
    assert [sr.update_given(x, 1.5) for x in (1.0, 2.5, 3.1)] == [False, False, True]
    b = Baseline(warmup=3, arm=0.5, level=0.9)
    assert [b.update_given(x, 2.0) for x in (2.0, 0.9, 1.9)] == [False, False, True]


def test_the_default_pack_reads_it_and_replay_equals_live(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pack = load_pack("training")
    given = {r.name for r in pack if r.given == "untrained_loss"}
    assert {"never_learned"} <= {r.name for r in pack} and "loss_flat_above_untrained" in given
    assert "loss_flat_at_constant" in {r.name for r in pack if r.given == "constant_loss"}
    assert "loss_far_above_start" in given and "loss_excursion" in given
    start = {"loss_far_above_start", "loss_falling", "loss_above_start"}
    # a run whose first batch was unlucky: 10x its (measured) untrained loss is a blow-up
    samples = [Sample(step=1, values={"loss": 0.3, "untrained_loss": 1.0})]
    samples += [Sample(step=s, values={"loss": 12.0}) for s in range(2, 12)]
    eng = Engine(RuleSet([r for r in pack if r.name in start]))
    fired = [e.step for s in samples for e in eng.update(s) if e.kind == "firing"]
    assert fired and fired[0] <= 8
    eng2 = Engine(RuleSet([r for r in pack if r.name in start]))
    state = None
    out = []
    for i, s in enumerate(samples):      # cut and resumed from the saved state mid-run
        if i == 5:
            state = eng2.state_dict()
            eng2 = Engine(RuleSet([r for r in pack if r.name in start]))
            eng2.load_state_dict(state)
        out += [e.step for e in eng2.update(s) if e.kind == "firing"]
    assert out == fired
