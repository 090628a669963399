"""Snapshots in memory never take the host's memory from under the run: a snapshot whose copy
would need more than half of the available host memory is skipped, said, and counted; a
rollback with no snapshot to go to then stops the run cleanly instead of the kernel killing
it. (The host's available memory is made small here; ``copies_fit`` is tested with the start
check, ``tests/recovery/test_start_check.py``.)"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import lrwatch
from lrwatch.actions import host_memory
from lrwatch.actions.snapshot import SnapshotStore


def _run() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def test_a_copy_that_would_not_fit_is_skipped_said_and_counted(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        tmp_path: Path) -> None:
    model, opt = _run()
    errors = []
    store = SnapshotStore(keep=3, on_error=lambda: errors.append(1))
    monkeypatch.setattr(host_memory, "host_available_bytes", lambda: 1024)
    with caplog.at_level(logging.WARNING, logger="lrwatch"):
        assert store.take(0, 0, model, opt) is None
    assert store.failed == 1 and errors == [1] and not store.snapshots
    assert "snapshot at step 0 skipped: 1 copy of the run's weights" in caplog.text
    assert "snapshot_dir" in caplog.text
    # on disk the copy costs no memory; under torch.distributed every rank must hold the same
    # snapshots, so the store does not decide alone there
    disk = SnapshotStore(keep=3, directory=tmp_path)
    assert disk.take(0, 0, model, opt) is not None
    ranks = SnapshotStore(keep=3, deferred_schedule=True)
    assert ranks.take(0, 0, model, opt) is not None
    monkeypatch.setattr(host_memory, "host_available_bytes", lambda: 10 ** 12)
    assert store.take(10, 10, model, opt) is not None and store.failed == 1


def test_a_rollback_with_no_snapshot_stops_the_run_instead_of_exhausting_the_host(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = _run()
    monkeypatch.setattr(host_memory, "host_available_bytes", lambda: 1024)
    w = lrwatch.Watcher(model, opt, flush_every=1,
                        recovery={"guard": "off", "start_check": "off"})
    g = torch.Generator().manual_seed(1)
    for _ in w.batches(range(60)):
        x, y = torch.randn(16, 16, generator=g), torch.randint(0, 2, (16,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if w.step + 1 == 20:
            loss = loss * float("nan")
        loss.backward()
        opt.step()
        w.log(loss=loss)
    w.close()
    assert w.store is not None and not w.store.snapshots and w.store.failed >= 1
    assert w.should_stop and w.step == 20 and w.exit_status != 0
    assert "no snapshot to go back to" in str(w.stop_reason)
