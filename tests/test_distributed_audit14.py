"""The fourteenth round's audit of lrwatch under torch.distributed (2 gloo ranks on CPU):
each test reproduced a defect on the code before its fix (docs/distributed.md, "Defects found
by the fourteenth round's audit")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dist_audit14_workers as dw
from ranks import spawn_ranks

pytestmark = pytest.mark.slow


def _results(tmp_path: Path, world: int = 2) -> list[dict]:
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def test_a_snapshot_one_rank_cannot_load_stops_every_rank_alike(tmp_path: Path) -> None:
    # before the fix the last rank stopped (its rollback failed) while rank 0 rolled back and
    # trained on alone: its next DDP all-reduce waited for the stopped rank until the timeout
    spawn_ranks(dw.snapshot_unreadable_on_one_rank,
                args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    r0, r1 = _results(tmp_path)
    assert r0["stopped"] and r1["stopped"], (r0, r1)
    assert r0["step"] == r1["step"]
    assert r0["actions"] == r1["actions"]
    assert r0["weights"] == r1["weights"]


def test_a_best_state_one_rank_cannot_load_is_put_back_on_no_rank(tmp_path: Path) -> None:
    # before the fix rank 0 stopped at its best evaluated state (step 6) and the last rank,
    # whose file could not be read, at its last step: the replicas' weights differed
    spawn_ranks(dw.best_unreadable_on_one_rank,
                args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    r0, r1 = _results(tmp_path)
    assert r0["stopped"] and r1["stopped"], (r0, r1)
    assert r0["actions"] == r1["actions"], (r0["actions"], r1["actions"])
    assert r0["step"] == r1["step"]
    assert r0["weights"] == r1["weights"]


def test_a_rank_outside_the_process_group_is_told_so(tmp_path: Path) -> None:
    # before the fix the rank outside the group got "IndexError: list index out of range"
    # from inside the Watcher (its rank there is -1, its gather returned no row)
    spawn_ranks(dw.watcher_outside_its_group,
                args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    member, outsider = _results(tmp_path)
    assert member == {"error": None, "step": 4}
    assert outsider["error"].startswith("ConfigError: process_group: this process (global "
                                        "rank 1) is not a member of the group"), outsider


def test_ranks_built_with_different_settings_are_told_so(tmp_path: Path) -> None:
    # before the fix the ranks flushed at different steps (every 5, every 4) and one rank's
    # gather met another's, until the collective timeout
    spawn_ranks(dw.watchers_built_apart, args=(2, str(tmp_path / "store"), str(tmp_path)),
                nprocs=2)
    r0, r1 = _results(tmp_path)
    assert r0 == r1, (r0, r1)
    interval, rules, trained = r0["errors"]
    assert "different flush_every: rank 0 5, rank 1 4" in interval
    assert "different rules: rank 0 [" in rules and "rank 1 None" in rules
    assert trained == "trained 12 steps"
