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


def _report(machine: str, cgroup: str, need: int, machine_free: int | None,
            cgroup_free: int | None = None) -> host_memory.MemoryReport:
    return host_memory.MemoryReport(machine, cgroup, need, machine_free, cgroup_free)


def test_the_ranks_of_one_machine_share_its_memory() -> None:
    fit = host_memory.reports_fit
    # two ranks whose copies each fit in half of their machine's room, but not together
    assert fit([_report("a", "c", 100, 300)], 1) == (True, "")
    ok, why = fit([_report("a", "c", 100, 300), _report("a", "c", 100, 300)], 1)
    assert not ok and "of the 2 ranks sharing it" in why and "host memory available" in why
    # on two machines they do not share
    assert fit([_report("a", "c", 100, 300), _report("b", "c", 100, 300)], 1)[0]
    # the smallest room reported on a machine counts (it was read at different moments)
    assert not fit([_report("a", "c", 10, 300), _report("a", "c", 10, 30)], 1)[0]
    # copies multiply the need; an unknown room is assumed to fit
    assert not fit([_report("a", "c", 100, 300)], 2)[0]
    assert fit([_report("a", "c", 10 ** 12, None)], 5)[0]


def test_each_cgroup_is_held_to_its_own_limit() -> None:
    fit = host_memory.reports_fit
    # two containers on one machine: plenty of machine memory, each with a limit of its own
    two = [_report("a", "c1", 100, 10 ** 6, 300), _report("a", "c2", 100, 10 ** 6, 300)]
    assert fit(two, 1)[0]
    same = [_report("a", "c1", 100, 10 ** 6, 300), _report("a", "c1", 100, 10 ** 6, 300)]
    ok, why = fit(same, 1)
    assert not ok and "room under the cgroup's memory limit" in why


@pytest.mark.parametrize("files, room", [
    (("max\n", "5000\n", "inactive_file 1000\n"), None),                  # v2, no limit
    (("8000\n", "5000\n", "anon 4000\ninactive_file 1000\n"), 4000),      # v2: 8000 - 4000
    (("9223372036854771712\n", "5000\n", "total_inactive_file 10\n"), None),   # v1, none
    (("8000\n", "5000\n", "total_inactive_file 2000\n"), 5000),           # v1: 8000 - 3000
    (("8000\n", "9000\n", ""), 0),                                        # over the limit
    ((None, None, None), None),                                           # no cgroup files
])
def test_the_room_under_a_cgroup_limit(monkeypatch: pytest.MonkeyPatch, files: tuple,
                                       room: int | None) -> None:
    monkeypatch.setattr(host_memory, "_cgroup_files", lambda: files)
    assert host_memory.cgroup_room_bytes() == room
    monkeypatch.setattr(host_memory, "_meminfo_available", lambda: 4500)
    assert host_memory.host_available_bytes() == (4500 if room is None else min(room, 4500))


def test_a_report_of_this_process_reads_the_machine() -> None:
    model, opt = _run()
    r = host_memory.local_report(model, opt)
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert r.need == 3 * weights          # weights + momentum not made yet, counted as Adam's
    assert r.machine and (r.machine_free is None or r.machine_free > 0)
