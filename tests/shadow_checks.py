"""Shared by the tests of the rate checks that train a shadow of the run (the start check,
tests/recovery/test_start_check.py, and the mid-run check, tests/recovery/test_mid_check.py):
the watched training loop, the check's trace events, the replay's agreement with the live
firings, and the plain reference run an adopted shadow must equal."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

import lrwatch
from lrwatch.exporters.trace import read_trace
from lrwatch.rules import load_pack
from lrwatch.rules.replay import replay_trace

LossFn = Callable[[nn.Module, tuple], torch.Tensor]


def train_watched(loss_fn: LossFn, w: lrwatch.Watcher, model: nn.Module,
                  opt: torch.optim.Optimizer, batches: list, sched: object = None) -> list:
    """The run's loop over ``w.batches(batches)``; returns the batches it was handed."""
    seen = []
    for b in w.batches(batches):
        seen.append(b)
        loss = loss_fn(model, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        w.log(loss=loss.detach())
    return seen


def check_events(path: Path, kind: str) -> list[dict]:
    """The trace's events of type ``kind`` (``start_check``, ``mid_check``)."""
    return [e for rec in read_trace(path) for e in rec.events
            if isinstance(e, dict) and e.get("type") == kind]


def assert_replay_equals_live(trace: Path) -> None:
    """Replaying the trace through the training pack gives the firings the live run had."""
    live = [(e["rule"], e["step"], e["severity"]) for e in check_events(trace, "firing")]
    replayed = replay_trace(trace, load_pack("training"))
    assert replayed.error is None
    assert [(f.rule, f.step, f.severity) for f in replayed.firings] == live


def assert_equals_reference(loss_fn: LossFn, model: nn.Module, ref: nn.Module,
                            ref_opt: torch.optim.Optimizer, batches: list,
                            rates: dict[int, float] | None = None) -> None:
    """Trains ``ref`` on ``batches`` unwatched (``rates``: batch index -> the rate set before
    it) and checks ``model`` ended with its weights."""
    for i, b in enumerate(batches):
        if rates and i in rates:
            ref_opt.param_groups[0]["lr"] = rates[i]
        loss = loss_fn(ref, b)
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)
