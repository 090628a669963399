"""The Watcher's checkpoint (``state_dict``/``load_state_dict``, lrwatch/checkpointing.py):
the defects the thirteenth round's audit found (docs/recovery.md, "Defects found by the
thirteenth round's audit"). Real torch runs on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import lrwatch
from lrwatch.errors import ConfigError
from lrwatch.exporters.trace import read_trace


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 2))


def _step(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + i)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 2, (16,), generator=g)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def test_load_state_dict_after_close_raises_and_leaves_the_trace_alone(tmp_path: Path) -> None:
    """A closed Watcher given a checkpoint opened its trace again (moving the lines it had
    written aside) and kept it open: a closed Watcher wrote again, and the Watcher built for
    the resumed run could not write the same path."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trace = tmp_path / "run.jsonl"
    w = lrwatch.Watcher(model, opt, flush_every=5, trace=trace)
    for i in range(10):
        w.log(loss=_step(model, opt, i))
    state = w.state_dict()
    w.close()
    written = trace.read_bytes()
    with pytest.raises(ConfigError, match="closed Watcher.*new Watcher"):
        w.load_state_dict(state)
    assert trace.read_bytes() == written
    assert not (tmp_path / "run.jsonl.before").exists()
    assert w.step == 10   # nothing was loaded
    w2 = lrwatch.Watcher(model, opt, flush_every=5, trace=trace)   # the resumed run's
    w2.load_state_dict(state)
    for i in range(10, 15):
        w2.log(loss=_step(model, opt, i))
    w2.close()
    assert [s.step for s in read_trace(trace)] == list(range(1, 16))
    assert w2.exporter.internal_errors._value.get() == 0
    json.dumps(state, allow_nan=True)   # (what the HF callback writes)
