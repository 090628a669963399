"""The sudden-failure watch (``RecoveryConfig.sudden_hold``) in real runs, at its edges: what
the eleventh round's audit found (docs/recovery.md, "Defects found by the eleventh round's
audit")."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import lrwatch
from lrwatch.exporters.trace import read_trace

_RULES = """
version: 1
rules:
  - name: poisoned
    metric: poison
    detector: threshold
    params: {above: 0.5}
    severity: critical
    actions: [rollback]
    annotations: {summary: "poison at step {step}", description: "test rule"}
  - name: nonfinite
    metric: loss
    detector: nonfinite
    severity: critical
    actions: [rollback]
    annotations: {summary: "loss is {value} at step {step}", description: "test rule"}
  - name: halt
    metric: halt
    detector: threshold
    params: {above: 0.5}
    severity: critical
    actions: [stop]
    annotations: {summary: "halt at step {step}", description: "test rule"}
  - name: nudge
    metric: nudge
    detector: threshold
    params: {above: 0.5}
    severity: warning
    actions: [reduce_lr]
    annotations: {summary: "nudge at step {step}", description: "test rule"}
"""


def _data(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(16, 6, generator=g), torch.randint(0, 2, (16,), generator=g)


def _train(tmp_path: Path, steps: int, flush_every: int,
           extra: Callable[[int, list[dict[str, Any]]], dict[str, float]],
           recovery: dict[str, Any] | None = None) -> dict[str, Any]:
    """A quiet, healthy run; ``extra(step, events so far)`` gives the metrics logged besides
    the loss at ``step`` (``poison``, ``halt``, ``nudge``; ``nan``: the loss is NaN)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rules = tmp_path / "rules.yml"
    rules.write_text(_RULES)
    trace = tmp_path / "trace.jsonl"
    events: list[dict[str, Any]] = []
    rec = {"good_after": 5, "min_interval": 3, "cooldown": 0, "guard": "off",
           "sudden_hold": 5, **(recovery or {})}
    w = lrwatch.Watcher(model, opt, flush_every=flush_every, trace=trace, rules=str(rules),
                        recovery=rec,
                        listeners=[lambda s: events.extend(
                            e for e in s.events if e.get("type") not in ("firing", "resolved"))])
    for i in range(steps):
        if w.should_stop:
            break
        step = w.step + 1
        more = extra(step, events)
        x, y = _data(i)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if more.pop("nan", 0.0):
            loss = loss * float("nan")
        loss.backward()
        opt.step()
        w.log(loss=loss.detach(), **{k: more.get(k, 0.0) for k in ("poison", "halt", "nudge")})
    w.close()
    return {"w": w, "events": events, "trace": read_trace(trace)}


def _types(r: dict[str, Any]) -> list[str]:
    return [e["type"] for e in r["events"]]


def test_a_nonfinite_firing_in_the_flush_of_a_finite_one_is_not_watched(tmp_path: Path) -> None:
    """A finite firing (the poisoned step) and a NaN loss the step after, judged in the same
    flush: the rollback the NaN asks for comes at once (a non-finite value is never watched:
    the parameters may be lost), not two flushes later, after NaN steps trained on."""
    r = _train(tmp_path, 40, 3, lambda s, ev: {"poison": float(s == 20), "nan": float(s == 21)})
    assert "watch" not in _types(r), r["events"]
    rb = [e for e in r["events"] if e["type"] == "rollback"]
    assert rb and r["w"].policy.rollbacks == 1
    at = next(s.step for s in r["trace"] if any(e.get("type") == "rollback" for e in s.events))
    assert at <= 21 + 3   # decided at the flush that judged the NaN
