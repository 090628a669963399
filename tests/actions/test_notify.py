"""The one notifier of the Watcher and the daemon: what it logs, and that it never raises."""

from __future__ import annotations

import pytest
import torch

import lrwatch
from lrwatch.actions.alerts import AlertSender, LogSink
from lrwatch.actions.notify import Notifier
from lrwatch.rules import Firing


def _firing(kind: str = "firing") -> Firing:
    return Firing(rule="loss_blowup", kind=kind, step=7, time=None, metric="loss", value=9.0,
                  severity="critical", actions=("alert",), message="loss 9 at step 7")


def test_without_a_sender_one_marked_line_per_event(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="lrwatch"):
        Notifier().fire(_firing())
        Notifier(log_without_sender=False).fire(_firing())   # the daemon logs events itself
    lines = [r for r in caplog.records if "loss_blowup" in r.getMessage()]
    assert len(lines) == 1 and getattr(lines[0], "lrwatch_event", False)
    assert lines[0].getMessage() == "lrwatch: loss_blowup (critical): loss 9 at step 7"


def test_fire_and_resolve_go_to_the_sender(caplog: pytest.LogCaptureFixture) -> None:
    sender = AlertSender([LogSink()], resend_interval=3600)
    n = Notifier(sender)
    with caplog.at_level("INFO", logger="lrwatch"):
        n.fire(_firing())
        assert [a.labels["alertname"] for a in sender.active] == ["LrwatchLossBlowup"]
        n.resolve(_firing("resolved"))
        assert sender.flush(10)
    assert sender.active == []
    sender.close()


def test_a_failure_is_counted_logged_once_and_never_raised(
        caplog: pytest.LogCaptureFixture) -> None:
    errors: list[int] = []
    sender = AlertSender([LogSink()], resend_interval=3600)
    n = Notifier(sender, on_error=lambda: errors.append(1))
    with caplog.at_level("WARNING", logger="lrwatch"):
        for _ in range(3):
            n.fire(object())          # not an event: building its alert fails
    sender.close()
    assert errors == [1, 1, 1]
    assert len([r for r in caplog.records if "could not alert" in r.getMessage()]) == 1


def test_the_watcher_uses_it() -> None:
    model = torch.nn.Linear(2, 2)
    w = lrwatch.Watcher(model, torch.optim.SGD(model.parameters(), lr=0.1), port=None)
    try:
        assert isinstance(w.notifier, Notifier)
    finally:
        w.close()
