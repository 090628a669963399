"""Real torch.distributed process groups (gloo on CPU): norms, agreed rollbacks, per-rank export."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

import distributed_workers as dw
from ranks import spawn_ranks
from services import PrometheusServer, PushgatewayServer, free_port

pytestmark = pytest.mark.slow


def _spawn(fn: Callable[..., None], world: int, tmp_path: Path, *extra: Any) -> list[dict]:
    spawn_ranks(fn, (world, str(tmp_path / "store"), str(tmp_path), *extra), world)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_grad_norm_equals_single_process_reference(tmp_path: Path, world: int) -> None:
    results = _spawn(dw.ddp_norm, world, tmp_path)
    for r in results:
        assert r["steps"] == list(range(1, 8))
        for got, ref in zip(r["norms"], r["refs"]):
            assert got == pytest.approx(ref, rel=1e-5)
    assert all(r["norms"] == results[0]["norms"] for r in results)  # one view on every rank
    # one run, one name: the default run name is rank 0's on every rank (each drew its own)
    assert len({r["run"] for r in results}) == 1


def test_fsdp2_sharded_grad_norm_equals_unsharded(tmp_path: Path) -> None:
    results = _spawn(dw.fsdp_norm, 2, tmp_path)
    for r in results:
        assert r["sharded"] is True
        for got, ref in zip(r["norms"], r["refs"]):
            assert abs(got - ref) / ref <= 1e-5
    assert results[0]["norms"] == results[1]["norms"]


@pytest.mark.parametrize("world", [2, 3])
def test_nan_on_one_rank_rolls_every_rank_back_to_the_same_step(tmp_path: Path,
                                                                world: int) -> None:
    results = _spawn(dw.nan_rollback, world, tmp_path)
    first = results[0]
    assert first["rollbacks"], "the NaN on the last rank must trigger a rollback"
    assert first["rollbacks"][0][0] == "rollback"
    for r in results:
        assert r["rollbacks"] == first["rollbacks"]  # same decision, same snapshot step
        assert r["finite"]
        assert r["weights"] == first["weights"] and r["weights_sum"] == first["weights_sum"]
        assert r["sched_step"] == first["sched_step"] and r["lr"] == first["lr"]


def test_a_lagged_flush_rolls_every_rank_back_one_step_later_in_lock_step(tmp_path: Path) -> None:
    # flush_lag=1 (the default on CUDA): the flush that sees the NaN is judged one step after
    # its copy was queued, on every rank at the same step; the step trained in between is on
    # the abandoned trajectory and dropped everywhere
    (tmp_path / "now").mkdir()
    (tmp_path / "lagged").mkdir()
    now = _spawn(dw.nan_rollback, 2, tmp_path / "now", "off", 0)
    lagged = _spawn(dw.nan_rollback, 2, tmp_path / "lagged", "off", 1)
    first = lagged[0]
    assert first["rollbacks"] and first["rollbacks"][0][0] == "rollback"
    # the same failure is found at the same step (the snapshots it may go back to can differ:
    # their interval adapts at each flush, which lands one step later)
    assert first["rollbacks"][0][1] == now[0]["rollbacks"][0][1] == 38
    assert first["rollbacks"][0][2] < 38
    for r in lagged:
        assert r["rollbacks"] == first["rollbacks"] and r["finite"]
        assert r["weights"] == first["weights"] and r["weights_sum"] == first["weights_sum"]
        assert r["sched_step"] == first["sched_step"] and r["lr"] == first["lr"]
        assert r["flushes"] == first["flushes"]


def test_nan_on_one_rank_is_held_back_on_every_rank_by_default(tmp_path: Path) -> None:
    results = _spawn(dw.nan_rollback, 2, tmp_path, "auto")
    first = results[0]
    assert first["guard"] == "hold" and first["rollbacks"] == []
    assert first["dropped"] == [38]       # the NaN step (the scheduler's 37th step is step 38)
    for r in results:
        assert r["rollbacks"] == [] and r["dropped"] == first["dropped"]
        assert r["finite"]
        assert r["weights"] == first["weights"] and r["weights_sum"] == first["weights_sum"]


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_the_start_check_takes_the_same_decision_on_every_rank(tmp_path: Path,
                                                               kind: str) -> None:
    results = _spawn(dw.start_check, 2, tmp_path, kind)
    first = results[0]
    assert len(first["checks"]) == 1, first["checks"]
    step, factor, real, shadow, _ = first["checks"][0]
    assert step == 10 and factor == 0.1 and shadow < real   # adopted a tenth
    for r in results:
        assert r["checks"] == first["checks"]              # the same agreed losses
        assert r["weights"] == first["weights"]            # identical parameters after
        assert r["lr"] == first["lr"] == pytest.approx(0.06) and r["step"] == 40
        assert r["probe_steps"] == first["probe_steps"] == 14
    if kind == "fsdp":   # sharded, the same run as under DDP (the same global batches)
        (tmp_path / "ddp").mkdir()
        ddp = _spawn(dw.start_check, 2, tmp_path / "ddp", "ddp")[0]
        assert first["checks"][0][:4] == pytest.approx(ddp["checks"][0][:4], rel=1e-4)
        assert first["weights"] == pytest.approx(ddp["weights"], rel=1e-3, abs=1e-5)
        # a rank's copies hold its shards: the host memory they need is about half DDP's
        assert 0.45 * ddp["need"] <= first["need"] <= 0.6 * ddp["need"]


def test_the_start_checks_gate_decides_alike_on_every_rank(tmp_path: Path) -> None:
    # each rank reads the gate on its own shard's batches; the worst rank decides for all
    results = _spawn(dw.start_check, 2, tmp_path, "ddp", 1.05)
    first = results[0]
    assert len(first["checks"]) == 1 and first["checks"][0][4] is not None, first["checks"]
    for r in results:
        assert r["checks"] == first["checks"] and r["weights"] == first["weights"]
        assert r["probe_steps"] == first["probe_steps"]


def test_a_stall_cuts_the_rate_at_the_same_step_on_every_rank(tmp_path: Path) -> None:
    results = _spawn(dw.stall_cut, 2, tmp_path)
    first = results[0]
    assert first["reductions"] >= 1 and first["cuts"]
    assert first["lr"] == pytest.approx(0.02 * 0.5 ** first["reductions"])
    for r in results:
        assert r["cuts"] == first["cuts"] and r["lr"] == first["lr"]
        assert r["weights"] == first["weights"] and r["weights_sum"] == first["weights_sum"]


def test_ddp_replay_after_a_nan_batch_stays_in_lock_step(tmp_path: Path) -> None:
    results = _spawn(dw.nan_replay, 2, tmp_path)
    first = results[0]
    assert len(first["rollbacks"]) == 1 and first["rollbacks"][0][2] is not None
    seen = first["seen"]
    back = next(i for i in range(1, len(seen)) if seen[i] < seen[i - 1])
    assert 1 <= len([b for b in seen[back:] if b < seen[back - 1]]) <= 3  # rank 0 held 3
    for r in results:
        assert r["rollbacks"] == first["rollbacks"] and r["seen"] == seen
        assert r["finite"] and r["weights"] == first["weights"]


@pytest.mark.prometheus
def test_per_rank_export_scraped_by_prometheus(prometheus_factory: Callable[..., PrometheusServer],
                                               pushgateway: PushgatewayServer,
                                               tmp_path: Path) -> None:
    port = free_port()
    while True:  # need two consecutive free ports
        try:
            import socket
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            break
        except OSError:
            port = free_port()
    prom = prometheus_factory([f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"])
    go = tmp_path / "go"
    errors: list[BaseException] = []

    def run() -> None:
        try:
            spawn_ranks(dw.per_rank_export, (2, str(tmp_path / "store"), str(tmp_path), port,
                                             str(go), pushgateway.url), 2)
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    try:
        res = prom.wait_for('lrwatch_step{job="lrwatch"} == 10',
                            predicate=lambda r: len(r) == 2, timeout=90)
        assert sorted(x["metric"]["rank"] for x in res) == ["0", "1"]
        loss = prom.query("lrwatch_loss")
        assert sorted(x["metric"]["rank"] for x in loss) == ["0", "1"]
        assert all(math.isfinite(float(x["value"][1])) for x in loss)
    finally:
        go.write_text("done")
        t.join(120)
    assert not errors, errors
    urls = [json.loads((tmp_path / f"rank{r}.json").read_text())["url"] for r in range(2)]
    assert urls == [f"http://127.0.0.1:{port}/metrics", f"http://127.0.0.1:{port + 1}/metrics"]
    # each rank's end-of-run summary is its own Pushgateway group (rank in the grouping key):
    # with job + run alone, the second rank's push replaced the first's
    pushed = pushgateway.samples("lrwatch_step")
    assert sorted((s.labels["run"], s.labels["rank"]) for s in pushed) == [
        ("dist", "0"), ("dist", "1")], pushed


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_ddp_divergence_restarts_with_the_same_probe_on_every_rank(tmp_path: Path,
                                                                   kind: str) -> None:
    results = _spawn(dw.probe_restart, 2, tmp_path, kind)
    first = results[0]
    kinds = [e[0] for e in first["events"]]
    assert "rollback" in kinds and "probe" in kinds, first["events"]
    probe = next(e for e in first["events"] if e[0] == "probe")
    assert probe[4] >= 3 and 0 < probe[3] < 1          # steps run; a cut below the failed rate
    for r in results:
        assert r["probed"]                              # every rank ran the probe itself
        assert r["events"] == first["events"]           # same decisions, same measured rate
        assert r["probe_steps"] == first["probe_steps"] > 0
        assert r["finite"] and r["weights"] == first["weights"]   # identical parameters
        assert r["lr"] == first["lr"] < 8.0 and r["step"] == 80



@pytest.mark.parametrize("mode", ["one_short", "shared", "fits"])
def test_the_ranks_agree_on_host_memory(tmp_path: Path, mode: str) -> None:
    """Snapshots in memory and the start check are skipped on every rank or on none: when one
    rank's host runs short, and when each rank's copies fit alone but not those of all the
    ranks sharing the machine. A rollback with no snapshot then stops every rank alike."""
    results = _spawn(dw.memory_guard, 2, tmp_path, mode)
    first = results[0]
    for r in results:
        for key in ("snapshots", "failed", "checks", "actions", "stopped", "step", "weights"):
            assert r[key] == first[key], key
    if mode == "fits":
        assert first["checks"] == [10] and first["failed"] == 0 and first["snapshots"]
        assert ["rollback", 25] in first["actions"] and not first["stopped"]
        return
    assert first["snapshots"] == [] and first["failed"] >= 2 and first["checks"] == []
    assert first["stopped"] and first["step"] == 25
    assert "no snapshot to go back to" in first["reason"]
    said = " ".join(first["said"])
    assert "start check skipped (2 copies" in said and "snapshot at step 0 skipped" in said
    if mode == "shared":   # each rank alone would have fitted
        assert "of the 2 ranks sharing it" in said


@pytest.mark.parametrize("flush_lag", [0, 1])
def test_a_snapshot_one_rank_could_not_take_is_no_target_on_any_rank(tmp_path: Path,
                                                                      flush_lag: int) -> None:
    # before the fix, the last rank (no snapshot of steps 26-47) rolled back to step 10 while
    # rank 0 rolled back to step 32: different weights on every rank from then on
    results = _spawn(dw.snapshot_fails_on_one_rank, 2, tmp_path, flush_lag)
    first = results[0]
    assert results[1]["failed"] >= 1 and first["failed"] == 0
    assert first["actions"] and first["actions"][0][:2] == ["rollback", 48], first["actions"]
    for r in results:
        assert r["actions"] == first["actions"] and r["snapshots"] == first["snapshots"]
        assert r["weights_sum"] == first["weights_sum"] and r["finite"]


def test_a_start_state_one_rank_could_not_save_skips_the_check_on_every_rank(
        tmp_path: Path) -> None:
    # before the fix the other rank ran the check alone: it waited in the check's collectives
    # while the failed rank trained on (a hang, here a 60 s gloo timeout)
    results = _spawn(dw.start_check_fails_on_one_rank, 2, tmp_path, "capture")
    first = results[0]
    assert results[1]["errors"] >= 1
    for r in results:
        assert r["checks"] == [] and r["step"] == 40
        assert r["weights"] == first["weights"] and r["lr"] == first["lr"]


@pytest.mark.parametrize("mode", ["probe", "probe_train"])
def test_a_probe_loss_failing_on_one_rank_gives_the_check_up_on_every_rank(
        tmp_path: Path, mode: str) -> None:
    # before the fix the failed rank left the check while the other waited in the held-out
    # losses' mean or in DDP's gradient reduction: gloo aborted the process (SIGABRT)
    results = _spawn(dw.start_check_fails_on_one_rank, 2, tmp_path, mode)
    first = results[0]
    for r in results:
        assert r["errors"] >= 1                       # counted as an internal error, fail open
        assert r["checks"] == [] and r["step"] == 40
        assert r["weights"] == first["weights"] and r["lr"] == first["lr"]


def test_a_probe_loss_failing_on_one_rank_in_the_range_test_stops_it_on_every_rank(
        tmp_path: Path) -> None:
    # before the fix the failed rank left the range test while the other waited in the
    # loss's mean or in DDP's gradient reduction (a hang, here a 60 s gloo timeout)
    results = _spawn(dw.probe_fails_on_one_rank, 2, tmp_path)
    first = results[0]
    assert any(e[0] == "probe" for e in first["events"]), first["events"]
    assert results[1]["calls"] > 13 and results[1]["errors"] >= 1
    for r in results:
        assert r["events"] == first["events"] and r["step"] == first["step"]
        assert r["weights"] == first["weights"] and r["lr"] == first["lr"]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_the_callbacks_start_check_with_a_state_one_rank_could_not_save(tmp_path: Path,
                                                                        which: int) -> None:
    # the callbacks' path (the framework draws the data): before the fix the other rank ran
    # the check alone and waited in its collectives (a hang, here a 60 s gloo timeout)
    results = _spawn(dw.adapter_start_check_fails_on_one_rank, 2, tmp_path, which)
    first = results[0]
    if which == 0:   # nothing fails: the check runs, on every rank alike
        assert len(first["checks"]) == 1, first
    else:
        assert results[1]["errors"] >= 1 and first["checks"] == []
    for r in results:
        assert r["checks"] == first["checks"] and r["step"] == 30
        assert r["weights"] == first["weights"] and r["lr"] == first["lr"]


def test_a_resume_not_finite_on_one_rank_takes_the_same_decision_on_every_rank(
        tmp_path: Path) -> None:
    # only the last rank's FSDP2 shard is not finite: it drops the run's start, the others
    # keep theirs; the start they hold is no target for them either (agreed at the flush),
    # so every rank stops alike rather than one going back while the other stops (a hang)
    results = _spawn(dw.resume_nonfinite_shard, 2, tmp_path)
    first = results[0]
    assert first["stopped"] and first["actions"] and first["actions"][0][0] == "stop"
    for r in results:
        assert r == first


def test_fsdp2_guard_takes_one_decision_for_a_spike_in_one_shard(tmp_path: Path) -> None:
    # a spike in rank 0's shard only: the guard judged each shard's own norm, so rank 0
    # dropped its half of the step and rank 1 applied its half (a partial step)
    results = _spawn(dw.fsdp_guard_spike_on_one_shard, 2, tmp_path)
    d = results[0]["deltas"]
    assert results[1]["deltas"] == d
    assert d["rows_0_3"] == 0.0 and d["rows_4_7"] == 0.0, d
