"""The fifteenth round's audit of lrwatch under torch.distributed (2 gloo ranks on CPU):
each test reproduced a defect on the code before its fix (docs/distributed.md, "Defects found
by the fifteenth round's audit")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dist_audit15_workers as dw
from ranks import spawn_ranks

pytestmark = pytest.mark.slow


def _results(tmp_path: Path, world: int = 2) -> list[dict]:
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("n,flush_every,flush_lag",
                         [(40, 4, 1), (40, 1, 1), (40, 4, 0), (42, 4, 1), (42, 4, 0)])
def test_a_nan_last_batch_under_flush_lag_1_replays_as_in_a_single_process(
        tmp_path: Path, n: int, flush_every: int, flush_lag: int) -> None:
    # before the fix the flush in flight at the end of the data (flush_lag=1) was judged at
    # close(): the rollback ran there, with no batches left to replay, and the run ended at
    # the snapshot's weights on every rank; with 42 batches (no multiple of flush_every) the
    # last two steps were still unflushed there, in a single process too
    spawn_ranks(dw.replay_of_the_last_batch,
                args=(2, str(tmp_path / "store"), str(tmp_path), n, flush_every, flush_lag),
                nprocs=2)
    r0, r1 = _results(tmp_path)
    assert r0["weights"] == r1["weights"]
    for r in (r0, r1):
        assert r["rollbacks"] == 1 and not r["stopped"], r
        assert r["seen"].count(n - 1) == 1
        assert r["equal"], r


def test_the_end_of_a_ranks_data_inside_join_starts_no_collective(tmp_path: Path) -> None:
    # the end of the data judges the flush in flight collectively (above), but not inside
    # DDP's Join, where the last rank's data runs out while the others train: its gather
    # would meet their Join all-reduce (a gloo abort, or a wait until the timeout)
    spawn_ranks(dw.join_with_batches, args=(2, str(tmp_path / "store"), str(tmp_path)),
                nprocs=2)
    r0, r1 = _results(tmp_path)
    for r in (r0, r1):
        assert r["error"] and r["error"].startswith("RuntimeError"), r
        assert r["step"] == 12 and r["flushes"] == r0["flushes"], r
    assert r0["weights"] == r1["weights"]


@pytest.mark.parametrize("bucket_view", [False, True])
def test_a_rollback_under_zero_restores_each_ranks_own_shard(tmp_path: Path,
                                                             bucket_view: bool) -> None:
    # before the fix every snapshot failed (ZeroRedundancyOptimizer.state_dict() needs
    # consolidate_state_dict() on every rank first), so the rollback found no snapshot and
    # stopped the run on every rank
    spawn_ranks(dw.zero_rollback,
                args=(2, str(tmp_path / "store"), str(tmp_path), 40, 22, bucket_view), nprocs=2)
    r0, r1 = _results(tmp_path)
    assert r0["weights"] == r1["weights"]
    for r in (r0, r1):
        assert r["rollbacks"] == 1 and not r["stopped"], r
        assert r["equal"], r


def test_a_zero_shard_is_restored_only_on_the_layout_it_was_taken_on(tmp_path: Path) -> None:
    spawn_ranks(dw.zero_shard_on_another_layout,
                args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    for rank, r in enumerate(_results(tmp_path)):
        swapped, resized = r["errors"]
        assert f"holds the shard of rank {1 - rank} of 2, and this is rank {rank} of 2" in swapped
        assert f"holds the shard of rank {rank} of 2, and this is rank 0 of 1" in resized
        assert "resume on the same number of ranks" in resized
        assert r["kept"]


def test_the_range_tests_run_under_zero(tmp_path: Path) -> None:
    # before the fix the start state could not be captured (ZeRO's state_dict() refused):
    # the start check and lr_check were skipped on every rank, counted as internal errors
    spawn_ranks(dw.zero_range_tests, args=(2, str(tmp_path / "store"), str(tmp_path)),
                nprocs=2)
    r0, r1 = _results(tmp_path)
    assert r0["weights"] == r1["weights"]
    for r in (r0, r1):
        assert r["errors"] == ["lrwatch_internal_errors_total 0.0"], r
        assert any(m.startswith("lrwatch: start check: ") for m in r["checks"]), r["checks"]
        assert any(m.startswith("lrwatch: learning-rate check (") for m in r["checks"]), r
        assert not any("skipped" in m for m in r["checks"]), r["checks"]
