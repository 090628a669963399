"""The sixteenth round's audit of lrwatch under torch.distributed (2 gloo ranks on CPU):
each test reproduced a defect on the code before its fix (docs/distributed.md, "Defects found
by the sixteenth round's audit")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dist_audit16_workers as dw
from ranks import spawn_ranks

pytestmark = pytest.mark.slow


def _results(tmp_path: Path, world: int = 2) -> list[dict]:
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("case,says", [
    ("threshold", "different rule settings['flag']['params']['above']: rank 0 0.5, rank 1 5.0"),
    ("replay", "different recovery settings['replay']: rank 0 True, rank 1 False"),
    ("probe_loss", "different probe_loss: rank 0 True, rank 1 False"),
    ("same", None)])
def test_ranks_that_would_decide_apart_are_told_so(tmp_path: Path, case: str,
                                                   says: str | None) -> None:
    # before the fix only the rules' names and recovery on/off were compared: a rule with
    # another threshold rolled rank 0 back alone, replay on one rank trained it more batches,
    # a probe_loss on one rank ran the start check alone; each waited, in the end, until the
    # collective timeout
    spawn_ranks(dw.watchers_deciding_apart,
                args=(2, str(tmp_path / "store"), str(tmp_path), case), nprocs=2)
    r0, r1 = _results(tmp_path)
    assert r0["weights"] == r1["weights"]
    if says is None:   # per-rank snapshot_dir and replay_mb are accepted
        assert "error" not in r0 and r0 == r1, (r0, r1)
        assert r0["rollbacks"] >= 1
        return
    assert r0["error"] == r1["error"], (r0, r1)
    assert says in r0["error"], r0["error"]


def test_a_rank_leaving_its_with_block_on_an_error_starts_no_collective(tmp_path: Path) -> None:
    # before the fix the raising rank's __exit__ ran close(), whose final flush waited in a
    # gather the other ranks were not in (they were in DDP's all-reduce) until the
    # collective timeout; the error it left on was replaced by gloo's timeout
    spawn_ranks(dw.error_inside_with, args=(2, str(tmp_path / "store"), str(tmp_path)),
                nprocs=2)
    r0, r1 = _results(tmp_path)
    assert r1["error"] == "ValueError: the user's error on the last rank", r1
    assert r1["step"] == 9
    # rank 0, in DDP's all-reduce of batch 9, finds rank 1 gone (not a timeout)
    assert r0["error"].startswith("RuntimeError") and "Timed out" not in r0["error"], r0


def test_a_rank_that_cannot_build_its_watcher_takes_every_rank_with_it(tmp_path: Path) -> None:
    # before the fix the last rank raised before the Watcher's first collective and went on
    # without lrwatch, while the others waited in that collective until its timeout
    spawn_ranks(dw.build_error_on_one_rank, args=(2, str(tmp_path / "store"), str(tmp_path)),
                nprocs=2)
    r0, r1 = _results(tmp_path)
    assert r1["error"].startswith("RuleError: ") and "cannot read the file" in r1["error"], r1
    assert r0["error"].startswith("ConfigError: lrwatch: rank 1 could not build its Watcher "
                                  "(RuleError: "), r0
    assert "cannot read the file" in r0["error"]
    assert r0["weights"] == r1["weights"]   # both went on without lrwatch, alike


def test_a_watcher_group_narrower_than_the_models_ranks_is_refused(tmp_path: Path) -> None:
    # before the fix each rank's Watcher on a group of its own judged alone: the last rank
    # rolled its DDP replica back and the other did not, and their weights ended apart
    spawn_ranks(dw.watcher_group_narrower_than_the_model,
                args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    r0, r1 = _results(tmp_path)
    assert r0["weights"] == r1["weights"]
    for rank, r in enumerate((r0, r1)):
        ddp, fsdp, whole = r["errors"]
        assert ddp.startswith("process_group: the model is trained by global ranks [0, 1] "
                              f"(its DistributedDataParallel process group), and the "
                              f"Watcher's group holds ranks [{rank}] only"), ddp
        assert "process_group=model.process_group" in ddp
        assert "(the device mesh of its sharded parameters)" in fsdp, fsdp
        assert whole == r0["errors"][2] and whole.startswith("trained, "), whole
        assert not whole.startswith("trained, 0 ")


def test_a_run_name_given_on_rank_0_only_names_every_ranks_run(tmp_path: Path) -> None:
    # before the fix rank 1 reported rank 0's random id and rank 0 its run_name
    spawn_ranks(dw.run_name_on_rank_0_only, args=(2, str(tmp_path / "store"), str(tmp_path)),
                nprocs=2)
    for r in _results(tmp_path):
        assert r["name"] == "night-run", r
        assert len(r["info"]) == 1 and 'run="night-run"' in r["info"][0], r


def test_an_hsdp_gradient_norm_counts_each_replicated_shard_once(tmp_path: Path) -> None:
    # before the fix the sums of squares of the shards were added over every rank, each
    # replica's too: the norm read sqrt(2) times the single-process one (ratio 1.41421)
    spawn_ranks(dw.hsdp_norm, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    for r in _results(tmp_path):
        assert r["placements"] == "(Replicate(), Shard(dim=0))"
        assert len(r["norms"]) == len(r["refs"]) == 6
        for got, ref in zip(r["norms"], r["refs"]):
            assert got == pytest.approx(ref, rel=1e-5), (r["norms"], r["refs"])
