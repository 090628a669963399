"""The sync audit's harness (benchmarks/sync_audit.py): attribution and a CPU run.

On a CPU device nothing synchronises, so these check the bookkeeping: a synchronising-call
warning is caught with its stack, attributed, and told apart from a flush."""

from __future__ import annotations

import sys
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import sync_audit  # noqa: E402
from sync_audit import SYNC_MESSAGE, SyncLog, attribute  # noqa: E402

import lrwatch  # noqa: E402

LRWATCH = Path(lrwatch.__file__).resolve().parent


def _fs(path: str, line: int, name: str) -> traceback.FrameSummary:
    return traceback.FrameSummary(path, line, name)


def test_attribution_prefers_the_innermost_lrwatch_frame():
    stack = [_fs("/home/u/train.py", 10, "main"),
             _fs(str(LRWATCH / "watch.py"), 5, "log"),
             _fs(str(LRWATCH / "actions" / "snapshot.py"), 44, "cpu_copy"),
             _fs(str(Path(torch.__file__).parent / "_tensor.py"), 1, "to")]
    assert attribute(stack) == ("lrwatch", "lrwatch/actions/snapshot.py:44 in cpu_copy")
    other = [_fs("/home/u/train.py", 10, "main"),
             _fs(str(Path(torch.__file__).parent / "_tensor.py"), 1, "item")]
    assert attribute(other) == ("other", "/home/u/train.py:10 in main")


def test_synclog_catches_only_sync_warnings_and_marks_flushes():
    log = SyncLog()
    with log:
        log.step = 3
        warnings.warn(SYNC_MESSAGE)
        warnings.warn("Synchronization debug mode is a prototype feature")  # not a sync
        log.flushing += 1
        warnings.warn(SYNC_MESSAGE)
        log.flushing -= 1
    s = log.summary(steps=10)
    assert s["syncs"] == 2 and log.other_warnings == 1
    assert [e["flush"] for e in log.events] == [False, True]
    assert all(e["step"] == 3 and e["who"] == "other" for e in log.events)
    assert "test_sync_audit_smoke.py" in log.events[0]["where"]


def test_cpu_audit_runs_every_plain_configuration_without_syncs():
    report = sync_audit.audit(torch.device("cpu"), steps=4, models=["tiny"],
                              frameworks=["torch"])
    assert len(report["runs"]) == len(sync_audit.PLAIN)
    assert not [r for r in report["runs"] if "error" in r]
    watched = [r for r in report["runs"] if "flushes" in r]
    assert watched and all(r["internal_errors"] == 0 for r in watched)
    assert all(r["syncs"] == 0 for r in report["runs"])
    assert "| lrwatch defaults | tiny |" in sync_audit.markdown(report)
