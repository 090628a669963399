"""An unusable ``snapshot_dir`` (a read-only file system, a full one) never turns a rollback into a
stop: the store falls back to memory, says so once, counts it, and the run trains to the end.

The file systems are real tmpfs mounts (``services.tmpfs``: root and ``mount``, else skipped)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import nn

import lrwatch
from lrwatch.actions.snapshot import SnapshotStore
from services import tmpfs


@pytest.fixture(params=["read-only", "full"])
def bad_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    # read-only: nothing can be created; full: 1 MB, less than the model with its momentum
    with tmpfs(tmp_path / "snaps", "ro,size=1m" if request.param == "read-only"
               else "size=1m") as where:
        yield where


def _model() -> nn.Module:
    torch.manual_seed(0)
    # ~200k parameters: the model alone (~0.8 MB) fits the 1 MB file system, the model with its
    # momentum buffers does not
    return nn.Sequential(nn.Linear(32, 1024), nn.Tanh(), nn.Linear(1024, 160), nn.Tanh(),
                         nn.Linear(160, 2))


def test_nan_rolls_back_from_memory_and_trains_to_the_end(
        bad_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    caplog.set_level(logging.WARNING, logger="lrwatch")
    w = lrwatch.Watcher(model, opt, flush_every=1,
                        recovery={"guard": "off", "snapshot_dir": str(bad_dir), "good_after": 3,
                                  "min_interval": 3})
    steps, bad_step = 40, 20
    g = torch.Generator().manual_seed(1)
    for _ in w.batches(range(10_000)):
        if w.step >= steps:
            break
        x, y = torch.randn(16, 32, generator=g), torch.randint(0, 2, (16,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if w.step + 1 == bad_step and w.policy.rollbacks == 0:
            loss = loss * float("nan")
        loss.backward()
        opt.step()
        w.log(loss=loss)
    w.close()
    assert w.policy.rollbacks == 1
    assert not w.should_stop and w.exit_status == 0 and w.step == steps
    assert all(torch.isfinite(p).all() for p in model.parameters())
    store = w.store
    assert store is not None and store.directory is None and store.fallbacks == 1
    # the full disk took the first snapshot (no momentum yet); every one after it is in memory
    on_disk = [s for s in store.snapshots if s.path is not None]
    assert all(s.step == 0 for s in on_disk)
    assert all(s.state is not None for s in store.snapshots if s.step > 0)
    assert w.exporter.internal_errors._value.get() == 1
    said = [r.getMessage() for r in caplog.records if "cannot write snapshots" in r.getMessage()]
    assert len(said) == 1 and str(bad_dir) in said[0], said
    assert not list(bad_dir.glob("*.tmp"))   # nothing half-written left behind


def test_store_falls_back_when_the_directory_fails_later(tmp_path: Path) -> None:
    """A directory that worked and then stopped working (removed, replaced by a file): the
    snapshots already on disk stay usable, the new ones live in memory."""
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    errors: list[int] = []
    snaps = tmp_path / "snaps"
    store = SnapshotStore(directory=snaps, on_error=lambda: errors.append(1))
    first = store.take(0, 0, model, opt, good=True, pinned=True)
    assert first is not None and first.path is not None and first.state is None
    for p in snaps.iterdir():
        p.unlink()
    snaps.rmdir()
    snaps.write_text("not a directory any more")
    with torch.no_grad():
        model.weight.add_(1.0)
    second = store.take(5, 5, model, opt)
    assert second is not None and second.state is not None and second.path is None
    assert store.directory is None and errors == [1] and store.failed == 1
    third = store.take(10, 10, model, opt)
    assert third is not None and third.state is not None and errors == [1]
    assert torch.equal(second.load()["model"]["weight"], model.weight.detach())


def test_all_finite_passes_over_tensors_that_hold_no_values_yet() -> None:
    """A lazy module before its first forward and a model on the meta device (a resume
    checks the weights it starts from): nothing to judge, no error."""
    from lrwatch.actions.snapshot import all_finite

    lazy = torch.nn.Sequential(torch.nn.LazyLinear(3), torch.nn.Linear(3, 2))
    assert all_finite(lazy)
    assert all_finite(torch.nn.Linear(3, 3, device="meta"))
    with torch.no_grad():
        lazy[1].weight[0, 0] = float("nan")
    assert not all_finite(lazy)
