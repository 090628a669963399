"""lrwatch.lr_find on real models: the suggestion is where the physics says, and the probe
leaves every piece of training state exactly as it found it."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

import lrwatch
from lrwatch.errors import ConfigError

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
}


def _data(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    return x, y


def _model() -> nn.Module:
    # dropout (RNG) and batch norm (buffers) both change state during a probe
    return nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(32, 2))


def _state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            "opt": opt.state_dict(), "training": [m.training for m in model.modules()]}


def _equal(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))  # type: ignore
    return a == b


def _train(model: nn.Module, opt: torch.optim.Optimizer, sched: object, it: object,
           steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        x, y = next(it)  # type: ignore[call-overload]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sched.step()  # type: ignore[attr-defined]
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_probe_leaves_training_state_bit_exact(name: str) -> None:
    """Train, probe, train on: identical to train, train on without the probe (weights,
    optimizer state, scheduler, RNG, batch order, even leftover gradients)."""
    x, y = _data()
    runs = []
    for probe in (False, True):
        torch.manual_seed(1)
        random.seed(1)
        np.random.seed(1)
        model = _model()
        opt = OPTIMIZERS[name](model.parameters())
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True,
            generator=torch.Generator().manual_seed(5))
        it = iter(loader)
        _train(model, opt, sched, it, 5)
        # a leftover gradient and eval mode: the probe must hand both back
        nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
        model.eval()
        before = _state(model, opt)
        sched_before = sched.state_dict()
        if probe:
            curve = lrwatch.lr_find(model, opt, loader, nn.functional.cross_entropy,
                                    scheduler=sched, num_steps=40)
            assert curve.steps > 5 and curve.suggestion is not None
            after = _state(model, opt)
            assert _equal(before, after), "the probe changed the model or optimizer"
            assert sched.state_dict() == sched_before
        rng = (torch.rand(3), random.random(), np.random.rand())
        model.train()
        fresh = iter(loader)
        runs.append((rng, _train(model, opt, sched, it, 5), _train(model, opt, sched, fresh, 3),
                     _state(model, opt)))
    assert _equal(runs[0], runs[1])


def test_largest_stable_rate_matches_the_stability_edge() -> None:
    """Full-batch gradient descent on a least-squares problem diverges above 2/lambda_max of
    the loss's Hessian. The curve turns somewhat above that edge (an instability needs a few
    steps to grow from the small residual left in the stiff direction, while the rate keeps
    rising), which is why the suggestion is a tenth of the turn: safely below the edge, yet
    within a decade of it."""
    torch.manual_seed(0)
    scales = torch.tensor([3.0, 1.0, 1.0, 0.5, 0.2])
    x = torch.randn(256, 5) * scales
    y = x @ torch.randn(5, 1) + 0.1 * torch.randn(256, 1)
    model = nn.Linear(5, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    hessian = 2 * x.T @ x / len(x)                     # of mean((xw - y)^2)
    edge = 2 / float(torch.linalg.eigvalsh(hessian).max())
    full = [(x, y)]
    curve = lrwatch.lr_find(model, opt, full, nn.functional.mse_loss, min_lr=1e-4,
                            max_lr=10.0, num_steps=60, fraction=0.1)
    assert curve.stopped in ("diverged", "nonfinite")
    assert edge / 2 < curve.largest_stable < edge * 8, (curve.largest_stable, edge)
    assert curve.suggestion == pytest.approx(0.1 * curve.largest_stable)
    assert edge / 20 < curve.suggestion < edge


def test_groups_keep_their_ratio_and_tensor_lrs_work() -> None:
    x, y = _data()
    model = _model()
    opt = torch.optim.Adam([{"params": model[0].parameters(), "lr": 1e-3},
                            {"params": model[4].parameters(), "lr": 1e-4},
                            {"params": model[1].parameters(), "lr": 1e-3}])
    seen: list[tuple[float, float]] = []

    def batch_loss(m: nn.Module, batch: tuple) -> torch.Tensor:
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]))
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    lrwatch.lr_find(model, opt, [(x[:64], y[:64])], batch_loss=batch_loss, num_steps=20)
    assert all(b == pytest.approx(a / 10) for a, b in seen)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-4, 1e-3]


def test_grad_scaler_state_is_restored() -> None:
    x, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    before = scaler.state_dict()
    curve = lrwatch.lr_find(model, opt, [(x, y)], nn.functional.cross_entropy, scaler=scaler,
                            num_steps=30, max_lr=1e3)
    assert curve.steps >= 3
    assert scaler.state_dict() == before


def test_errors_tell_what_to_pass() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="exactly one of loss_fn"):
        lrwatch.lr_find(model, opt, [])
    with pytest.raises(ConfigError, match="yielded no batch"):
        lrwatch.lr_find(model, opt, [], nn.functional.cross_entropy)
    with pytest.raises(ConfigError, match="batch_loss=lambda"):
        lrwatch.lr_find(model, opt, [{"x": 1}], nn.functional.cross_entropy)
    before = _state(model, opt)
    with pytest.raises(ConfigError):   # restored even when the probe fails part-way
        lrwatch.lr_find(model, opt, [{"x": 1}], nn.functional.cross_entropy)
    assert _equal(before, _state(model, opt))


def test_groups_keep_their_ratio_under_a_warm_up_that_starts_at_0() -> None:
    """A warm-up from 0 (HF's linear schedule, a LambdaLR from 0) leaves every group at rate 0
    when the test starts: the groups keep the proportions of the schedule's base rates. Before,
    they all ran at group 0's rate (the 10:1 of the two groups was lost)."""
    x, y = _data()
    model = _model()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                           {"params": model[4].parameters(), "lr": 0.01}], momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / 10)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
    seen: list[tuple[float, float]] = []

    def batch_loss(m: nn.Module, batch: tuple) -> torch.Tensor:
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]))
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    lrwatch.lr_find(model, opt, [(x[:64], y[:64])], batch_loss=batch_loss, scheduler=sched,
                    num_steps=10)
    assert len(seen) == 10 and all(b == pytest.approx(a / 10) for a, b in seen)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]


def test_a_loss_below_0_is_tested_like_the_same_loss_above_0() -> None:
    """A loss that is negative (a negative log-likelihood, an ELBO; here the MSE less 10,
    which has the same gradients) gives the curve the plain MSE gives. Before, the stop test
    compared the smoothed loss with 4 x its negative minimum, which every loss exceeds: the
    test stopped at its second step as "diverged", with no suggestion."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    curves = []
    for shift in (0.0, 10.0):
        torch.manual_seed(0)
        model = nn.Linear(8, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
        curves.append(lrwatch.lr_find(
            model, opt, loader, lambda out, t, s=shift: nn.functional.mse_loss(out, t) - s))
    plain, shifted = curves
    assert plain.stopped == shifted.stopped == "diverged" and shifted.steps > 50
    assert shifted.suggestion == pytest.approx(plain.suggestion)


def test_an_iterator_is_refused_before_a_batch_is_drawn() -> None:
    """A one-shot iterator as the loader: the test consumed the batches it drew (the data
    moved on), and one shorter than the test ended in "the loader yielded no batch" after
    yielding 8. Now it is refused before anything is drawn, saying what to pass; an iterable
    whose passes run dry is told apart from an empty one."""
    x, y = _data(256)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    it = iter(loader)
    with pytest.raises(ConfigError, match="iterator .* list of batches"):
        lrwatch.lr_find(model, opt, it, nn.functional.cross_entropy, num_steps=20)
    assert torch.equal(next(it)[0], x[:32])   # nothing was drawn from it
    batches = ((x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32))

    class Once:   # a new iterator each pass, over one shared generator
        def __iter__(self) -> object:
            return batches

    with pytest.raises(ConfigError, match="yielded 8 batches, then none when iterated again"):
        lrwatch.lr_find(model, opt, Once(), nn.functional.cross_entropy, num_steps=20)


def test_a_loader_with_persistent_workers_keeps_its_order_and_its_pass() -> None:
    """``persistent_workers=True`` keeps the loader's iterator for the next pass, which only
    resets it: the test's pass left its iterator behind, and the run's first pass then drew
    another order (no fresh base seed drawn first); a pass in progress was reset under the
    run. Now the test iterates with workers of its own and the loader gets its iterator back."""
    def run(probe_at: int | None) -> list[int]:
        torch.manual_seed(0)
        ds = torch.utils.data.TensorDataset(torch.arange(64.0).unsqueeze(1),
                                            torch.zeros(64, dtype=torch.long))
        loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, num_workers=1,
                                             persistent_workers=True)
        model = nn.Linear(1, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        seen: list[int] = []
        for _ in range(2):   # two passes; the probe before the first, or inside it
            if probe_at == -1 and not seen:
                lrwatch.lr_find(model, opt, loader, nn.functional.cross_entropy, num_steps=5)
            for i, (x, _) in enumerate(loader):
                seen.append(int(x[0, 0]))
                if probe_at == i and len(seen) == i + 1:
                    lrwatch.lr_find(model, opt, loader, nn.functional.cross_entropy,
                                    num_steps=5)
        return seen

    bare = run(None)
    assert run(-1) == bare     # before the first pass
    assert run(3) == bare      # in the middle of the first pass


class _Rebinding(nn.Module):
    """Keeps a count and an average of its inputs in buffers it *rebinds* in its forward
    (``self.seen = self.seen + n``), as custom modules often do."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(10, 2)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("avg", torch.zeros(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen = self.seen + x.shape[0]
            self.avg = 0.9 * self.avg + 0.1 * x.mean(0)
        return self.lin(x)


def test_buffers_the_model_rebinds_are_put_back() -> None:
    """A buffer the forward rebinds holds a new tensor after each step: the probe copied the
    saved values into the old tensors and left the new ones in the model (its count at the
    test's 640 samples, its average moved). Now every buffer slot gets its own tensor back;
    the scoring pass of the pre-flight check (``reference_loss``) does the same."""
    from lrwatch.recovery.lr_find import reference_loss

    x, y = _data(64)
    model = _Rebinding()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x)   # the buffers hold values of their own before the test
    before = {k: v.clone() for k, v in model.state_dict().items()}
    held = dict(model.named_buffers())
    lrwatch.lr_find(model, opt, [(x, y)], nn.functional.cross_entropy, num_steps=10)
    assert _equal(before, model.state_dict())
    assert all(model.get_buffer(k) is t for k, t in held.items())
    reference_loss(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), (x, y))
    assert _equal(before, model.state_dict())


def test_a_watcher_on_the_optimizer_does_not_record_the_tests_steps(tmp_path) -> None:
    """``lrwatch.lr_find`` on an optimizer a Watcher already watches: the Watcher's step hooks
    recorded the test's steps as the run's (its step at 50 before training began, the trace's
    first 50 lines at the test's rates, the rules judging its blow-up). Now they skip them, as
    they skip the Watcher's own range tests, and the curve is the one without a Watcher."""
    x, y = _data(256)
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
    curves = []
    for watched in (False, True):
        torch.manual_seed(0)
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        w = lrwatch.Watcher(model, opt, flush_every=1, trace=tmp_path / "t.jsonl",
                            rules="training") if watched else None
        curves.append(lrwatch.lr_find(model, opt, batches, nn.functional.cross_entropy,
                                      num_steps=50))
    assert w is not None and w.step == 0
    for bx, by in batches[:3]:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(bx), by)
        loss.backward()
        opt.step()
        w.log(loss=loss)
    w.close()
    assert w.step == 3
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all('"lr": 0.1' in ln for ln in lines)
    assert curves[0].losses == curves[1].losses


def test_a_group_frozen_at_rate_0_stays_frozen() -> None:
    """Group 0 at rate 0 (a backbone frozen by its rate): every group ran at the test's
    rates, the frozen one included, so the curve was of another model than the one trained.
    Now it stays at 0, the first group with a rate leads and the others keep their ratio."""
    x, y = _data()
    model = _model()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.0},
                           {"params": model[4].parameters(), "lr": 0.01},
                           {"params": model[1].parameters(), "lr": 0.005}])
    seen: list[list[float]] = []

    def batch_loss(m: nn.Module, batch: tuple) -> torch.Tensor:
        seen.append([g["lr"] for g in opt.param_groups])
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    curve = lrwatch.lr_find(model, opt, [(x[:64], y[:64])], batch_loss=batch_loss, num_steps=10)
    assert [s[0] for s in seen] == [0.0] * len(seen)
    assert [s[1] for s in seen] == pytest.approx(curve.lrs)
    assert all(c == pytest.approx(b / 2) for _, b, c in seen)
    from lrwatch.integrations._common import start_at_suggestion
    from lrwatch.recovery.lr_find import leading_rate

    assert leading_rate(opt) == (1, 0.01)
    start_at_suggestion(curve, opt, None)   # the callbacks' lr_find=True: it was kept at 0.01
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(
        [0.0, curve.suggestion, curve.suggestion / 2])
