"""The sudden-failure watch (``RecoveryConfig.sudden_hold``) in real runs, at its edges: what
the eleventh round's audit found (docs/recovery.md, "Defects found by the eleventh round's
audit")."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import lrwatch
from lrwatch.recovery.policy import EXIT_STOPPED
from lrwatch.exporters.trace import read_trace
from flag_rules import NONFINITE_ROLLBACK_RULE, flag_rule, flag_rules

_RULES = flag_rules(flag_rule("poisoned", "poison"), NONFINITE_ROLLBACK_RULE,
                    flag_rule("halt", "halt", ("stop",)),
                    flag_rule("nudge", "nudge", ("reduce_lr",), severity="warning"))


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
                            {**e, "line": s.step} for e in s.events
                            if e.get("type") not in ("firing", "resolved"))])
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


def test_a_stop_at_the_flush_where_a_watch_ends_is_the_only_control_plan(tmp_path: Path) -> None:
    """A watched failure still firing when its hold ends, and a ``stop`` rule firing at that
    very flush: the run stops, as it would have without the watch (a stop outranks a
    rollback); it is not rolled back after the stop as well."""
    r = _train(tmp_path, 40, 1, lambda s, ev: {"poison": float(s >= 20), "halt": float(s == 25)})
    assert _types(r)[:1] == ["watch"] and r["events"][0]["step"] == 20
    assert "stop" in _types(r)
    assert "rollback" not in _types(r), r["events"]
    w = r["w"]
    assert w.exit_status == EXIT_STOPPED and w.policy.rollbacks == 0


def test_a_rate_cut_at_the_flush_where_a_watch_ends_is_not_a_second_control_plan(
        tmp_path: Path) -> None:
    """A ``reduce_lr`` firing at the flush where a watched failure's hold ends: one control
    plan per flush (the rollback comes at the next flush)."""
    r = _train(tmp_path, 40, 1, lambda s, ev: {"poison": float(s >= 20), "nudge": float(s == 25)})
    by_step: dict[int, list[str]] = {}
    for s in r["trace"]:
        for e in s.events:
            if e.get("type") in ("rollback", "reduce_lr", "skip", "stop"):
                by_step.setdefault(s.step, []).append(e["type"])
    assert "rollback" in sum(by_step.values(), []), by_step
    assert all(len(v) == 1 for v in by_step.values()), by_step


def test_a_run_that_ends_while_a_watched_failure_still_fires_is_rolled_back_at_close(
        tmp_path: Path) -> None:
    """close() three steps into the hold, the watched rule still firing: the rollback comes
    at close() (docs/recovery.md), to the snapshot before the failure the hold's end would
    have gone to, in the trace; not forgotten."""
    r = _train(tmp_path, 40, 1, lambda s, ev: {"poison": float(s >= 37)})
    rb = [e for s in r["trace"] for e in s.events if e.get("type") == "rollback"]
    assert len(rb) == 1 and r["w"].policy.rollbacks == 1, rb
    assert rb[0]["rule"] == "poisoned" and rb[0]["step"] == 37
    assert rb[0]["to_step"] <= 37 - 10          # sudden_margin before the failure
    assert "cooldown" not in rb[0].get("reason", "")
    assert r["w"].policy.state.watching is None


def test_the_rate_does_not_come_back_while_a_sudden_failure_is_watched(tmp_path: Path) -> None:
    """A rollback with a cut, its probation passed, and a sudden failure at the very flush
    that ends the probation: the rate is not ramped back (``lr_recover``) while that failure
    is watched -- with the hold off, the rollback it asks for comes first and no ramp starts.
    The ramp waits for the watch to end."""
    def extra(step: int, events: list[dict[str, Any]]) -> dict[str, float]:
        rb = [e for e in events if e["type"] == "rollback"]
        if not rb:
            return {"poison": float(step >= 20)}     # the first failure: still firing, rolled back
        line, target = rb[0]["line"], rb[0]["to_step"]
        until = 2 * line - target + 5                 # its probation (good_after 5)
        return {"poison": float(step == until + 1)}

    r = _train(tmp_path, 80, 1, extra, recovery={"sudden_lr_factor": 0.5})
    watched = [e for e in r["events"] if e["type"] == "watch"]
    assert len(watched) == 2, r["events"]
    second = watched[1]["line"]
    assert not [e for e in r["events"] if e["type"] == "lr_recover" and e["line"] == second], \
        r["events"]


def test_a_watch_that_passed_before_the_run_ended_closes_with_recovered(tmp_path: Path) -> None:
    """A one-step poison three steps before the end: its rule resolved, but the run ended
    before the hold was over. close() says how the watch ended (``recovered``, no rollback)
    instead of leaving a ``watch`` with nothing after it."""
    r = _train(tmp_path, 40, 1, lambda s, ev: {"poison": float(s == 36)})
    assert _types(r) == ["watch"]   # what the listeners saw before close()
    traced = [e for s in r["trace"] for e in s.events
              if e.get("type") in ("watch", "recovered", "rollback")]
    assert [e["type"] for e in traced] == ["watch", "recovered"], traced
    assert traced[1]["step"] == 36 and r["w"].policy.rollbacks == 0
    assert r["w"].policy.state.watching is None
