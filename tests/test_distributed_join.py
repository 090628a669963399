"""DDP's ``Join`` (uneven inputs) under a real gloo group: lrwatch is not ``Joinable``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import distributed_workers as dw
from ranks import spawn_ranks

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, throw: bool) -> list[dict]:
    spawn_ranks(dw.ddp_join, args=(2, str(tmp_path / "store"), str(tmp_path), throw), nprocs=2)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_a_watcher_inside_join_stops_every_rank_with_an_error_naming_the_fix(
        tmp_path: Path) -> None:
    # before the fix the flush's gather on the ranks still training met the joined rank's
    # shadow all-reduce: gloo aborted the process (SIGABRT) or a rank waited until the timeout
    results = _run(tmp_path, throw=False)
    for r in results:
        assert r["error"] and r["error"].startswith("ConfigError"), r
        assert "Join" in r["error"] and "throw_on_early_termination=True" in r["error"]
        assert "drop_last" in r["error"]
        assert r["step"] == 5 and r["flushes"] == results[0]["flushes"]   # the first flush


def test_join_that_throws_on_early_termination_keeps_every_rank_in_lock_step(
        tmp_path: Path) -> None:
    # the fix the error names: every rank stops when the first is out of data, at one step
    results = _run(tmp_path, throw=True)
    for r in results:
        assert r["error"] and r["error"].startswith("RuntimeError"), r
        assert r["step"] == 12 and r["flushes"] == results[0]["flushes"]
