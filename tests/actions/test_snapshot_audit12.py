"""The twelfth round's audit of lrwatch/actions/ (snapshots, the best state, the rollback):
each test reproduced a defect on the code before its fix (docs/recovery.md, "Defects found by
the twelfth round's audit")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lrwatch
from lrwatch.actions.snapshot import SnapshotStore
from flag_rules import flag_rule, train_step as _step, write_flag_rules


def _rules(tmp_path: Path) -> str:
    # "wobbly": a warning, so that the failure after it is no sudden one
    return write_flag_rules(tmp_path / "rules.yml", flag_rule("poisoned", "poison"),
                            flag_rule("wobbly", "wobble", ["alert"], severity="warning"))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 2))


def _rollback_target(tmp_path: Path, recovery: dict[str, Any], *, fail_at: int,
                     flush_lag: int = 0) -> tuple[int, list[tuple[int, bool]]]:
    """Train a tiny model, poison the step ``fail_at`` (once, after a warning), return the
    step the rollback went to and the snapshots (step, good) held just before the failure."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    went: list[int] = []
    w = lrwatch.Watcher(model, opt, flush_every=1, flush_lag=flush_lag, rules=_rules(tmp_path),
                        recovery={"cooldown": 0, "sudden_hold": 0, "sudden_margin": 0,
                                  "guard": "off", "start_check": "off", **recovery},
                        listeners=[lambda s: went.extend(e["to_step"] for e in s.events
                                                         if e.get("type") == "rollback")])
    held: list[tuple[int, bool]] = []
    for i in w.batches(range(10 ** 6)):
        if w.step >= fail_at + 5:
            break
        if w.step + 1 == fail_at and not went:
            assert w.store is not None
            held = [(s.step, s.good) for s in w.store.snapshots]
        loss = _step(model, opt, i)
        # a warning three steps before: the failure is not sudden, and goes back to the
        # newest known-good snapshot (a sudden one goes to the newest snapshot before it)
        w.log(loss=loss, poison=1.0 if w.step == fail_at and not went else 0.0,
              wobble=1.0 if w.step == fail_at - 3 else 0.0)
    w.close()
    assert w.policy.rollbacks == 1 and len(went) == 1, went
    return went[0], held


# --- 1. a snapshot interval shorter than good_after ------------------------------------------

@pytest.mark.parametrize("flush_lag", [0, 1])
@pytest.mark.parametrize("keep", [2, 3])
def test_an_interval_shorter_than_good_after_still_rolls_back_to_a_recent_snapshot(
        tmp_path: Path, flush_lag: int, keep: int) -> None:
    # min_interval 3 < good_after 5: every snapshot is pending when the next one is taken
    to_step, held = _rollback_target(
        tmp_path, {"min_interval": 3, "max_interval": 3, "good_after": 5, "keep": keep},
        fail_at=60, flush_lag=flush_lag)
    # a snapshot becomes good 5 (+1 with the lag) steps after it is taken, and they are
    # taken every 3 to 6 steps: the newest known-good one is at most ~12 steps back
    assert to_step >= 60 - 14, (to_step, held)
    assert any(good and step >= 40 for step, good in held), held


def _store_run(store: SnapshotStore, steps: int, lag: int = 0) -> tuple[set[int], int]:
    """Drive ``store`` as the Watcher does with nothing ever firing; the steps that became
    known good and the most snapshots held at once (the pinned start not counted)."""
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    store.pending_slack = lag
    store.take(0, 0, model, opt, good=True, pinned=True)
    good: set[int] = set()
    most = 0
    for step in range(1, steps):
        store.promote(step - lag)
        good |= {s.step for s in store.snapshots if s.good and not s.pinned}
        if store.due(step):
            store.take(step, step, model, opt)
        most = max(most, sum(1 for s in store.snapshots if not s.pinned))
    return good, most


@pytest.mark.parametrize("lag", [0, 1])
@pytest.mark.parametrize("keep,interval,good_after", [(3, 3, 5), (2, 3, 5), (3, 1, 5),
                                                      (2, 50, 50), (3, 10, 50), (3, 50, 50),
                                                      (5, 2, 9)])
def test_every_pending_snapshot_lives_until_it_is_judged_and_memory_stays_bounded(
        keep: int, interval: int, good_after: int, lag: int) -> None:
    store = SnapshotStore(keep=keep, good_after=good_after, min_interval=interval,
                          max_interval=interval)
    good, most = _store_run(store, 400, lag)
    # snapshots keep coming and keep becoming known good: the newest one is recent, and one
    # becomes good at least every good_after + interval (+ the lag) steps
    spacing = max(interval, good_after + lag + 1)
    assert max(good) >= 400 - good_after - lag - 2 * spacing, sorted(good)
    assert len(good) >= 400 // (good_after + interval + lag + 1) - 1, sorted(good)
    # the bound the docstring gives: keep - 1 pending and the two newest known-good ones
    assert most <= keep + 1, most


# --- 2. a param group added after the snapshot (progressive unfreezing) ----------------------

def test_a_rollback_to_before_a_param_group_was_added_is_carried_out(tmp_path: Path) -> None:
    # the backbone is frozen, then unfrozen and added to the optimizer at step 25 (once: a
    # flag); a failure at step 30 rolls back to step 20, before the group existed
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(model[2].parameters(), lr=0.05, momentum=0.9)
    went: list[int] = []
    w = lrwatch.Watcher(model, opt, flush_every=1, rules=_rules(tmp_path),
                        recovery={"cooldown": 0, "sudden_hold": 0, "sudden_margin": 0,
                                  "guard": "off", "start_check": "off", "min_interval": 10,
                                  "max_interval": 10, "good_after": 10},
                        listeners=[lambda s: went.extend(e["to_step"] for e in s.events
                                                         if e.get("type") == "rollback")])
    at: dict[int, dict[str, Any]] = {}
    unfrozen, checked = False, False
    for i in w.batches(range(60)):
        if went and not checked:   # just rolled back: what the snapshot held
            checked = True
            assert all(torch.equal(v, at[20]["model"][k])
                       for k, v in model.state_dict().items())
            assert all(torch.equal(opt.state[p]["momentum_buffer"], m)
                       for p, m in zip(model[2].parameters(), at[20]["momentum"]))
            # the group added since is kept (its parameters are back at the snapshot's
            # values, where the optimizer held no state for them)
            assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.01
            assert all(not opt.state.get(p) for p in model[0].parameters())
        if w.step == 25 and not unfrozen:
            unfrozen = True
            for p in model[0].parameters():
                p.requires_grad_(True)
            opt.add_param_group({"params": list(model[0].parameters()), "lr": 0.01})
        if w.step == 20 and not w.policy.rollbacks:
            at[20] = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                      "momentum": [opt.state[p]["momentum_buffer"].clone()
                                   for p in model[2].parameters()]}
        loss = _step(model, opt, i)
        w.log(loss=loss, poison=1.0 if w.step == 30 and not w.policy.rollbacks else 0.0)
    w.close()
    assert went == [20] and checked and w.exit_status == 0 and w.policy.rollbacks == 1
    # training went on with both groups: the backbone moved after the rollback
    assert not torch.equal(model[0].weight, at[20]["model"]["0.weight"])
    assert opt.state[model[0].weight]["momentum_buffer"] is not None


# --- 3. the best evaluated state with a snapshot_dir that cannot be written ------------------

def test_the_best_state_is_kept_in_memory_when_snapshot_dir_is_full(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("/dev/full is needed for a real disk-full error")
    snapdir = tmp_path / "full"
    snapdir.mkdir()
    (snapdir / "best-eval.pt.tmp").symlink_to("/dev/full")
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = lrwatch.Watcher(model, opt, flush_every=1,
                        recovery={"snapshot_dir": str(snapdir), "start_check": "off"})
    kept = {}
    with caplog.at_level("WARNING", logger="lrwatch"):
        for i in range(30):
            g = torch.Generator().manual_seed(i)
            x, y = torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            evaluation = {}
            if i % 5 == 4:
                evaluation = {"eval_loss": 1.0 / (i + 1)}
                kept[w.step] = {k: v.clone() for k, v in model.state_dict().items()}
            w.log(loss=loss.detach(), **evaluation)
    best = w.best_eval
    assert best is not None and best.where == "memory" and best.step == 30
    w.restore_best()
    assert all(torch.equal(v, kept[30][k]) for k, v in model.state_dict().items())
    w.close()
    said = [r for r in caplog.records if "evaluated state" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]   # said once, not at every eval
    assert not (snapdir / "best-eval.json").exists()


# --- 4. tied weights ------------------------------------------------------------------------

class _TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(500, 32)
        self.out = nn.Linear(32, 500, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(x))


def _storage_bytes(state: dict[str, Any]) -> int:
    seen = {}
    for v in state.values():
        if isinstance(v, torch.Tensor):
            seen[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_snapshot_holds_tied_weights_once(tmp_path: Path, on_disk: bool) -> None:
    torch.manual_seed(0)
    model = _TiedLM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    store = SnapshotStore(keep=2, directory=tmp_path if on_disk else None)
    snap = store.take(1, 0, model, opt)
    assert snap is not None
    saved = snap.load()["model"]
    weights = 500 * 32 * 4
    assert _storage_bytes(saved) == weights   # one copy of the tied matrix, not two
    if on_disk:
        assert Path(snap.path or "").stat().st_size < 2 * weights   # no Adam state yet
    # and the rollback still restores it, tied
    before = model.emb.weight.detach().clone()
    x = torch.randint(0, 500, (4, 8))
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()
    from lrwatch.actions.snapshot import restore_state
    restore_state(snap.load(), model, opt)
    assert model.out.weight is model.emb.weight and torch.equal(model.emb.weight, before)


def test_a_best_state_whose_directory_cannot_be_made_is_kept_in_memory(tmp_path: Path) -> None:
    from lrwatch.actions.best import BestState
    (tmp_path / "a-file").write_text("")
    errors: list[int] = []
    best = BestState("eval_loss", directory=tmp_path / "a-file" / "best",
                     on_error=lambda: errors.append(1))
    model = nn.Linear(2, 1)
    best.offer(10, 0.5, model.state_dict)
    with torch.no_grad():
        model.weight.add_(1.0)
    best.offer(20, 0.4, model.state_dict)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    record = best.restore(model)
    assert record is not None and record.step == 20 and record.where == "memory"
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    assert errors == [1] and best.copies == 2
    assert best.state_dict()["best"]["where"] == "memory"


def test_the_best_state_holds_tied_weights_once(tmp_path: Path) -> None:
    from lrwatch.actions.best import BestState
    torch.manual_seed(0)
    model = _TiedLM()
    weights = 500 * 32 * 4
    best = BestState("eval_loss")
    best.offer(10, 0.5, model.state_dict)        # a number: copied at once
    kept = best.load()
    assert kept is not None and _storage_bytes(kept) == weights
    with torch.no_grad():
        model.emb.weight.add_(1.0)
    best.offer(20, torch.tensor(0.4), model.state_dict)   # a tensor: cloned until the flush
    best.offer(21, torch.tensor(0.3), model.state_dict)
    assert best._pending is not None and _storage_bytes(best._pending) == weights
    record = best.decide_at_flush([0.4, 0.3])
    assert record is not None and record.step == 21
    kept = best.load()
    assert kept is not None and _storage_bytes(kept) == weights
    assert torch.equal(kept["out.weight"], model.emb.weight)
    with torch.no_grad():
        model.emb.weight.zero_()
    best.restore(model)
    assert model.out.weight is model.emb.weight and torch.equal(model.emb.weight,
                                                                 kept["emb.weight"])


# --- 5. ranks sharing a snapshot_dir ---------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("fail_at", [3, 37])
def test_ranks_sharing_a_snapshot_dir_each_roll_back_to_their_own_snapshot(
        tmp_path: Path, fail_at: int) -> None:
    # 3: back to the run's start (step 0); 37: to a snapshot taken since
    import json

    from actions import snapshot_audit12_workers as workers
    from ranks import spawn_ranks

    spawn_ranks(workers.shared_snapshot_dir,
                args=(2, str(tmp_path / "store"), str(tmp_path), fail_at), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert [a[0] for a in r["actions"]] == ["rollback"], r
        assert r["exit_status"] == 0 and r["fallbacks"] == 0 and r["on_disk"], r
    assert results[0]["actions"] == results[1]["actions"]
    files = results[0]["files"]
    assert files and all(".rank0." in f or ".rank1." in f for f in files), files
