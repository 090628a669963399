"""The seventeenth round's audit of lrwatch under torch.distributed (real gloo groups on
CPU): a pipeline of two stages under one Watcher (docs/distributed.md, "Defects found by the
seventeenth round's audit")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dist_audit17_workers as dw
from ranks import spawn_ranks

pytestmark = pytest.mark.slow


def _results(tmp_path: Path, world: int) -> list[dict]:
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("world,ddp", [(2, False), (4, True)])
def test_one_watcher_over_pipeline_stages_records_the_whole_models_norm(
        tmp_path: Path, world: int, ddp: bool) -> None:
    """Two pipeline stages (one rank each, plain modules; or two ranks each, DDP over the
    stage's ranks) under one Watcher over every rank: the recorded gradient norm was the
    mean of the ranks' norms, read as replicas (0.88, the mean of the stages' 0.64 and 1.12,
    against the whole model's 1.29 at the first step). Each rank's sum of squares now counts once per stage: the norm
    equals the whole model's in one process, on every rank."""
    spawn_ranks(dw.pipeline_norm, args=(world, str(tmp_path / "store"), str(tmp_path), ddp),
                nprocs=world)
    got = _results(tmp_path, world)
    for r in got:
        assert "error" not in r, r
        assert r["worst"] < 1e-5, r
        assert r["norms"] == got[0]["norms"]
        assert not [s for s in r["said"] if "as replicas" in s], r["said"]


def test_a_probe_loss_over_pipeline_stages_is_refused_on_every_rank(tmp_path: Path) -> None:
    """The start check, range tests and untrained-loss measurement train or score the model
    alone with probe_loss(model, batch), which a stage cannot: every rank is told so, with
    the stages named."""
    spawn_ranks(dw.pipeline_norm, args=(2, str(tmp_path / "store"), str(tmp_path), False, True),
                nprocs=2)
    for r in _results(tmp_path, 2):
        assert "pipeline stages: ranks [0] | ranks [1]" in r.get("error", ""), r
        assert "Pass no probe_loss" in r["error"]


@pytest.mark.parametrize("guard", ["off", "on"])
def test_one_watcher_over_pipeline_stages_rolls_every_stage_back_alike(
        tmp_path: Path, guard: str) -> None:
    """The documented way for stages to agree: one Watcher over every stage's ranks. A NaN
    loss on the last stage (the guard off: rolled back, the batch replayed without it; on:
    the step held on every stage): each stage ends with its layers of the whole model
    trained without that batch."""
    spawn_ranks(dw.pipeline_rollback,
                args=(2, str(tmp_path / "store"), str(tmp_path), False, guard), nprocs=2)
    for r in _results(tmp_path, 2):
        assert r["rollbacks"] == (1 if guard == "off" else 0), r
        assert r["worst"] < 1e-6, r


@pytest.mark.parametrize("ddp", [False, True])
def test_stages_of_the_same_layout_read_as_replicas_are_told_so(tmp_path: Path,
                                                                ddp: bool) -> None:
    """Two stages of the same parameter layout (each its own ``nn.Sequential``), one rank
    each: without a DDP wrapper they read as replicas, and the recorded norm was the mean of
    the stages' norms, silently. Every rank now warns once, at the first flush where the
    ranks' norms differ, naming the way out; wrapped in DDP over each stage's one rank (that
    way), the norm is the whole model's and nothing is said."""
    spawn_ranks(dw.pipeline_norm,
                args=(2, str(tmp_path / "store"), str(tmp_path), ddp, False, True), nprocs=2)
    for r in _results(tmp_path, 2):
        told = [s for s in r["said"] if "reads the ranks' gradients as replicas" in s]
        if ddp:
            assert r["worst"] < 1e-5 and not told, r
        else:
            assert r["worst"] > 0.01, r   # (the mean, not the whole model's norm)
            assert len(told) == 1 and "rank 1's gradient norm at step 1" in told[0], r["said"]
            assert "wrap each stage in DistributedDataParallel" in told[0]


@pytest.mark.parametrize("hooks_only,flush_every", [(False, 1), (False, 4), (True, 4)])
def test_a_pipeline_stage_that_never_logs_fails_fast_and_says_so(
        tmp_path: Path, hooks_only: bool, flush_every: int) -> None:
    """The first stage never calls ``watch.log()``: it flushed a step later than the last
    stage, and each stage waited in its own collective (the last stage's gather, the first
    stage's ``send``) until the collective timeout, both raising gloo's "Timed out waiting"
    with nothing about lrwatch. Now the stage that does not log raises a ``ConfigError``
    naming the fix once it has completed a step without it (at its next batch from
    ``watch.batches()``, or at the end of its next step), before the other stage's flush
    waits for it; a gather that fails says which rank and what to check."""
    spawn_ranks(dw.pipeline_unlogged,
                args=(2, str(tmp_path / "store"), str(tmp_path), hooks_only, flush_every),
                nprocs=2)
    first, last = _results(tmp_path, 2)
    assert first["type"] == "ConfigError", first
    assert "without calling watch.log()" in first["error"], first
    assert "pipeline stages: ranks [0] | ranks [1]" in first["error"]
    assert first["step"] == 1, first   # (raised in step 2: at its draw, or its end)
    assert "Timed out" not in last.get("error", ""), last   # (the peer's exit, at once)
    if flush_every == 1:   # the last stage's gather of step 1 meets the first stage's exit
        assert last["type"] == "RankFailed" and "watch.log() once per step" in last["error"], last
