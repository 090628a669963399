"""An optimizer whose parameter groups hold no learning rate to set (Hugging Face's Adafactor
with ``relative_step=True`` holds ``lr=None``; an optimizer of one's own may hold no ``lr``):
the range tests that set rates (the start check, ``lr_check``, a rollback's probe) are skipped
and said so once, and the run trains and rolls back as usual. Before, the start check (on by
default whenever ``probe_loss`` is given, as the framework callbacks give it) and ``lr_check``
raised ``TypeError``/``KeyError`` out of ``watch.batches()`` into the training loop."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from torch import nn

import lrwatch
from prometheus_client import generate_latest

from flag_rules import flag_rule, write_flag_rules


class StepSizeSGD(torch.optim.Optimizer):
    """Plain SGD whose groups call their rate ``step_size``: no ``lr`` key at all."""

    def __init__(self, params: Any, step_size: float = 0.05) -> None:
        super().__init__(params, {"step_size": step_size})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["step_size"])


def _adafactor(params: Any) -> torch.optim.Optimizer:
    transformers = pytest.importorskip("transformers")
    return transformers.optimization.Adafactor(params, lr=None, relative_step=True,
                                               warmup_init=True)


def _data() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    i = 0
    while True:
        g = torch.Generator().manual_seed(1000 + i)
        i += 1
        yield torch.randn(16, 6, generator=g), torch.randint(0, 2, (16,), generator=g)


def _poisoned_run(tmp_path: Path, caplog: pytest.LogCaptureFixture, model: nn.Module,
                  opt: torch.optim.Optimizer) -> Any:
    """30 steps with the range tests on (``lr_check``, a rollback's ``probe``) and one poisoned
    step (15) that rolls back; the closed Watcher (its log in ``caplog``)."""
    rules = write_flag_rules(tmp_path / "rules.yml", flag_rule("poisoned", "poison"))
    with caplog.at_level(logging.INFO, logger="lrwatch"):
        w = lrwatch.Watcher(
            model, opt, flush_every=1, rules=rules,
            probe_loss=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
            recovery={"good_after": 3, "min_interval": 2, "cooldown": 0, "sudden_hold": 0,
                      "probe": "auto", "lr_check": "auto"})
        for i, (x, y) in enumerate(w.batches(_data())):
            if i >= 30:
                break
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            w.log(loss=loss, poison=1.0 if i == 15 else 0.0)
        w.close()
    return w


@pytest.mark.parametrize("make", [StepSizeSGD, _adafactor], ids=["no_lr_key", "lr_none"])
def test_range_tests_are_skipped_and_the_run_rolls_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        make: Callable[[Any], torch.optim.Optimizer]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 2))
    opt = make(model.parameters())
    w = _poisoned_run(tmp_path, caplog, model, opt)
    assert w.policy.rollbacks == 1 and w.exit_status == 0 and w.step == 30
    assert "lrwatch_internal_errors_total 0.0" in generate_latest(w.registry).decode()
    said = [r.getMessage() for r in caplog.records]
    assert sum("hold no learning rate to set" in m and "a rate cut" in m for m in said) == 1
    assert any(m.startswith("lrwatch: start check skipped (") for m in said)
    assert any(m.startswith("lrwatch: learning-rate check skipped") for m in said)


def test_lr_find_says_it_needs_a_rate_to_set() -> None:
    model = nn.Linear(6, 2)
    opt = StepSizeSGD(model.parameters())
    batches = [next(_data())]
    with pytest.raises(lrwatch.ConfigError, match="hold no learning rate to set"):
        lrwatch.lr_find(model, opt, batches, nn.functional.cross_entropy)


def test_every_group_at_rate_0_skips_the_range_tests_without_an_internal_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The fourteenth round: every group at rate 0 and no scheduler (a run whose rates a
    callback of its own sets later, or all frozen) made ``lr_check`` and a rollback's probe
    raise inside lrwatch ("the rate range must satisfy 0 < min_lr < max_lr, got 0.0..0.0"),
    counted as internal errors with a traceback in the log. They are skipped, saying why."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    w = _poisoned_run(tmp_path, caplog, model, opt)
    assert w.policy.rollbacks == 1 and w.step == 30
    assert "lrwatch_internal_errors_total 0.0" in generate_latest(w.registry).decode()
    said = [r.getMessage() for r in caplog.records]
    assert any("learning-rate check skipped" in m and "rate is 0" in m for m in said), said


class MixedRateSGD(torch.optim.Optimizer):
    """SGD whose groups hold a rate of any kind: none (``lr=None``: a fixed step of 0.01), a
    tensor, or a float; only the last holds a momentum."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {"lr": None})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            lr = 0.01 if group["lr"] is None else float(group["lr"])
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-lr)


def _mixed_adafactor(model: nn.Module) -> torch.optim.Optimizer:
    transformers = pytest.importorskip("transformers")
    return transformers.optimization.Adafactor(
        [{"params": model[0].parameters()},   # a relative step: lr=None
         {"params": model[2].parameters(), "lr": 1e-3, "relative_step": False}],
        lr=None, relative_step=True, warmup_init=False)


def _mixed_sgd(model: nn.Module) -> torch.optim.Optimizer:
    return MixedRateSGD([{"params": model[0].parameters()},
                         {"params": [model[2].weight], "lr": torch.tensor(0.25)},
                         {"params": [model[2].bias], "lr": 0.03, "momentum": 0.9}])


@pytest.mark.parametrize("make,series,trace_lr", [
    (_mixed_adafactor, ['lrwatch_learning_rate{param_group="1"} 0.001'], ["nan", 0.001]),
    (_mixed_sgd, ['lrwatch_learning_rate{param_group="1"} 0.25',
                  'lrwatch_learning_rate{param_group="2"} 0.03',
                  'lrwatch_momentum{param_group="2"} 0.9'], ["nan", 0.25, 0.03])],
    ids=["adafactor", "none_tensor_float"])
def test_a_group_without_a_rate_leaves_the_other_groups_labels_in_place(
        tmp_path: Path, make: Callable[[nn.Module], torch.optim.Optimizer],
        series: list[str], trace_lr: list[Any]) -> None:
    """The fifteenth round: a group whose ``lr`` is ``None`` was left out of the exported
    rates, so the next group's rate was exported as ``param_group="0"`` (and written to the
    trace as the only group's); a momentum after a group without one likewise. Scraped from
    the Watcher's own /metrics."""
    import json
    import urllib.request

    from lrwatch.trace import read_trace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 2))
    opt = make(model)
    trace = tmp_path / "run.jsonl"
    live: list[Any] = []
    with lrwatch.Watcher(model, opt, port=0, flush_every=2, trace=trace,
                         listeners=[live.append]) as w:
        for i, (x, y) in enumerate(_data()):
            if i == 4:
                break
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            w.log(loss=1.0)
        assert w.metrics_url is not None
        text = urllib.request.urlopen(w.metrics_url, timeout=5).read().decode()
    got = sorted(line for line in text.splitlines()
                 if line.startswith(("lrwatch_learning_rate{", "lrwatch_momentum{")))
    assert got == sorted(series), got
    first = json.loads(trace.read_text().splitlines()[0])
    assert first["lr"] == trace_lr
    # the run's rate (rules, replay) is the first group's that has one, live and replayed
    assert live[0].values["lr"] == read_trace(trace)[0].values["lr"] == trace_lr[1]
