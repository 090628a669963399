"""The constant-prediction loss: on the untrained-loss batches the Watcher fits the best
input-independent output under the user's own loss and records its median batch loss as
``constant_loss`` in step 1; the dead-network rules take it as a veto (``given:
constant_loss``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lrwatch
from lrwatch.rules import Engine, RuleSet, load_pack
from lrwatch.samples import Sample
from lrwatch.untrained import OutputShapes, measure_constant_loss, measure_untrained_loss


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _measure(model: nn.Module, batches: list, loss_of):  # type: ignore[no-untyped-def]
    outputs = OutputShapes()
    measure_untrained_loss(model, batches, loss_of, outputs)
    return measure_constant_loss(batches, loss_of, outputs)


def test_cross_entropy_gives_the_entropy_of_the_pooled_label_frequencies() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 4))
    g = torch.Generator().manual_seed(3)
    # skewed classes: a constant prediction learns their frequencies
    batches = [(torch.randn(32, 5, generator=g),
                torch.multinomial(torch.tensor([0.55, 0.25, 0.15, 0.05]), 32, True, generator=g))
               for _ in range(6)]

    def ce(m: nn.Module, b: tuple) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1])

    got = _measure(model, batches, ce)
    ys = torch.cat([b[1] for b in batches])
    logp = torch.log(torch.bincount(ys, minlength=4).float() / len(ys))
    want = _median([float(-logp[b[1]].mean()) for b in batches])
    assert got is not None and float(got) == pytest.approx(want, abs=1e-4)
    untrained = measure_untrained_loss(model, batches, ce)
    assert untrained is not None and float(got) < float(untrained)


def test_squared_error_gives_the_spread_about_the_pooled_mean_for_every_output_shape() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    # a (batch, time, channels) output: the constant is one vector over the last dimension,
    # shared by every sample and time step
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    batches = [(torch.randn(16, 7, 3, generator=g),
                torch.randn(16, 7, 2, generator=g) * torch.tensor([1.0, 3.0]) + torch.tensor([2.0, -1.0]))
               for _ in range(5)]

    def mse(m: nn.Module, b: tuple) -> torch.Tensor:
        return nn.functional.mse_loss(m(b[0]), b[1])

    got = _measure(model, batches, mse)
    mean = torch.cat([b[1].reshape(-1, 2) for b in batches]).mean(0)
    want = _median([float(((b[1] - mean) ** 2).mean()) for b in batches])
    assert got is not None and float(got) == pytest.approx(want, rel=1e-4)


def test_it_is_not_measured_when_the_output_is_not_one_tensor_or_the_model_is_not_called() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.lin(x), x

    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(3)]
    pair = Pair()
    assert _measure(pair, batches, lambda m, b: nn.functional.cross_entropy(m(b[0])[0], b[1])) \
        is None
    # probe_loss that calls a submodule: the model's own forward never ran
    assert _measure(pair, batches, lambda m, b: nn.functional.cross_entropy(m.lin(b[0]), b[1])) \
        is None
    # called twice per batch (two views): no single output to stand in for
    lin = nn.Linear(4, 3)
    assert _measure(lin, batches, lambda m, b: nn.functional.cross_entropy(
        m(b[0]) + m(b[0] * 2), b[1])) is None


def _train(w: lrwatch.Watcher, model: nn.Module, opt: torch.optim.Optimizer, batches: list,
           loss_of) -> None:  # type: ignore[no-untyped-def]
    """The README's plain loop: the Watcher hands out the batches and logs every step."""
    for b in w.batches(batches):
        opt.zero_grad()
        loss = loss_of(model, b)
        loss.backward()
        opt.step()
        w.log(loss=loss)
    w.close()


def test_the_watcher_records_it_in_step_1_and_leaves_the_run_as_it_was() -> None:
    def ce(m: nn.Module, b: tuple) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1])

    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
               for _ in range(10)]
    finals = []
    for probe in (None, ce):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        got: list[Sample] = []
        w = lrwatch.Watcher(model, opt, flush_every=4, probe_loss=probe, untrained_batches=4,
                            listeners=[got.append], rules=None, recovery=False)
        _train(w, model, opt, batches, ce)
        finals.append([p.detach().clone() for p in model.parameters()])
        if probe is not None:
            c = got[0].values["constant_loss"]
            assert 0.0 < c <= got[0].values["untrained_loss"] * 1.05 and math.isfinite(c)
            assert all("constant_loss" not in s.values for s in got[1:])
            assert w.exporter.internal_errors._value.get() == 0
    assert all(torch.equal(a, b) for a, b in zip(*finals))


def test_a_probe_loss_that_needs_the_real_model_leaves_it_unmeasured_and_uncounted() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)
            self.scale = 1.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    def uses_attribute(m: nn.Module, b: tuple) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]) * m.scale, b[1])   # the stand-in has no .scale

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    got: list[Sample] = []
    w = lrwatch.Watcher(model, opt, flush_every=2, probe_loss=uses_attribute, listeners=[got.append],
                        rules=None, recovery=False)
    _train(w, model, opt, [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(9)],
           uses_attribute)
    assert "untrained_loss" in got[0].values and "constant_loss" not in got[0].values
    assert w.exporter.internal_errors._value.get() == 0


def _dead_network_firings(constant: float | None) -> list[int]:
    """Replay the default pack's dead_network rule on a run whose evaluations froze and whose
    loss sits flat at 0.75x its untrained level."""
    pack = load_pack("training")
    eng = Engine(pack)
    fired = []
    g = torch.Generator().manual_seed(0)
    for step in range(1, 301):
        v = {"loss": 0.75 + 0.01 * float(torch.randn((), generator=g)), "lr": 0.1}
        if step == 1:
            v["untrained_loss"] = 1.0
            if constant is not None:
                v["constant_loss"] = constant
        if step % 20 == 0:
            v["eval_loss"], v["eval_accuracy"] = 0.7512, 0.5
        fired += [e.step for e in eng.update(Sample(step=step, values=v))
                  if e.kind == "firing" and e.rule == "dead_network"]
    return fired


def test_the_pack_calls_a_network_below_any_constant_prediction_alive() -> None:
    # at the level of the best constant prediction: dead; unmeasured, the veto is off and the
    # rule works as it did without it
    assert _dead_network_firings(0.76)
    assert _dead_network_firings(None)
    # the same flat loss, far below what any constant prediction scores: a hard task that
    # learned what it could (a click-through model at 0.66x its constant loss), not dead
    assert _dead_network_firings(1.0 / 0.66 * 0.75) == []
    pack = load_pack("training")
    assert "loss_below_constant" in {r.name for r in pack if r.given == "constant_loss"}
    dead = next(r for r in pack if r.name == "dead_network")
    assert "loss_below_constant" in dead.when.unless  # type: ignore[union-attr]
    RuleSet(list(pack))   # validates
