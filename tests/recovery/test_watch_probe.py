"""A Watcher whose run diverges measures the restart rate with a range test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lrwatch
from lrwatch.exporters.trace import read_trace


def _setup(lr: float, seed: int = 0) -> tuple:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 4))
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(20, 4, generator=g)

    def stream():
        while True:
            x = torch.randn(32, 20, generator=g)
            yield x, (x @ truth).argmax(1)

    return model, torch.optim.Adam(model.parameters(), lr=lr), stream()


def _loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _run(tmp_path: Path, probe_loss: object, steps: int = 150) -> dict:
    model, opt, stream = _setup(lr=0.3)     # Adam far too hot: blows up at step 2
    init = [p.detach().clone() for p in model.parameters()]
    trace = tmp_path / f"t{probe_loss is None}.jsonl"
    w = lrwatch.Watcher(model, opt, flush_every=5, trace=trace,
                        recovery={"good_after": 10, "min_interval": 5, "restart_warmup": 20,
                                  "probe": "auto", "start_check": "off"},
                        probe_loss=probe_loss)
    restarted_at_init = None
    rollbacks = 0
    lrs = []
    for batch in w.batches(stream):
        if w.policy.rollbacks != rollbacks:   # a rollback was carried out just now
            rollbacks = w.policy.rollbacks
            if restarted_at_init is None:
                restarted_at_init = all(torch.equal(a, b)
                                        for a, b in zip(init, model.parameters()))
        if w.step >= steps:
            break
        loss = _loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
        w.log(loss=loss.detach())
    w.close()
    events = [e for s in read_trace(trace) for e in s.events]
    return {"w": w, "lrs": lrs, "events": events, "at_init": restarted_at_init}


def test_restart_probes_and_takes_the_measured_rate(tmp_path: Path) -> None:
    r = _run(tmp_path, _loss)
    rb = [e for e in r["events"] if e["type"] == "rollback"]
    probes = [e for e in r["events"] if e["type"] == "probe"]
    assert rb and rb[0]["to_step"] == 0 and rb[0]["restart"] and rb[0]["probe"]
    assert probes, "the restart must run a range test"
    pr = probes[0]
    assert pr["steps"] >= 3 and pr["failed_lr"] == pytest.approx(0.3)
    assert "range test" in pr["reason"]
    # the probe's steps are not the run's: the watcher step did not jump, the model was back
    # at its initial state when training resumed
    assert r["at_init"] is True
    assert r["w"].policy.state.probes == len(probes)
    assert r["w"].policy.state.probe_steps == sum(p["steps"] for p in probes)
    # after the warm-up the run trains at the measured rate
    if len(rb) == 1:
        assert r["lrs"][-1] == pytest.approx(0.3 * pr["lr_factor"], rel=1e-6)
    assert pr["lr_factor"] < 0.3    # Adam at 0.3 on this MLP is far above the stable rate


def test_without_a_probe_loss_the_fixed_factor_stands(tmp_path: Path) -> None:
    r = _run(tmp_path, None)
    rb = [e for e in r["events"] if e["type"] == "rollback"]
    assert rb and rb[0]["lr_factor"] == 0.1 and "probe" not in rb[0]
    assert not [e for e in r["events"] if e["type"] == "probe"]


def test_probe_loss_must_be_callable() -> None:
    model, opt, _ = _setup(0.01)
    with pytest.raises(lrwatch.ConfigError, match="probe_loss"):
        lrwatch.Watcher(model, opt, probe_loss=3)  # type: ignore[arg-type]


def test_a_group_frozen_at_rate_0_leaves_the_probe_measuring_the_others(tmp_path: Path) -> None:
    """Group 0 frozen at rate 0: the restart's range test read its failed rate off group 0
    (0), could not run (an internal error each time) and fell back to the fixed cut. Now it
    tests the first group with a rate and group 0 stays at 0."""
    model, _, stream = _setup(lr=0.3)
    opt = torch.optim.Adam([{"params": model[0].parameters(), "lr": 0.0},
                            {"params": [*model[2].parameters(), *model[4].parameters()],
                             "lr": 3.0}])   # far too hot: it blows up, twice
    trace = tmp_path / "frozen.jsonl"
    w = lrwatch.Watcher(model, opt, flush_every=5, trace=trace,
                        recovery={"good_after": 10, "min_interval": 5, "restart_warmup": 20,
                                  "probe": "auto", "start_check": "off"}, probe_loss=_loss)
    for batch in w.batches(stream):
        if w.step >= 60:
            break
        loss = _loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        w.log(loss=loss.detach())
    w.close()
    probes = [e for s in read_trace(trace) for e in s.events if e["type"] == "probe"]
    assert probes and probes[0]["failed_lr"] > 0 and probes[0]["steps"] >= 3
    assert "range test" in probes[0]["reason"]
    assert w.exporter.internal_errors._value.get() == 0
    assert opt.param_groups[0]["lr"] == 0.0
